"""The Hub side: the generated model card and the timm-format export, loaded where hf_siamese is not importable."""

import json

import datasets
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from images import structured_images
from isolation import run_without_hf_siamese

from hf_siamese import SiameseForPreTraining
from hf_siamese.model_card import loss_curve_svg, write_model_card
from hf_siamese.timm_export import export_timm


@pytest.mark.parametrize("backbone,channels", [("resnet18", 1), ("vit_tiny_patch16_224", 3)])
def test_timm_export_loads_without_hf_siamese_with_the_encoders_features(tmp_path, backbone, channels):
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config(backbone=backbone, num_channels=channels)).eval()
    model.save_pretrained(tmp_path / "ckpt")
    export_timm(tmp_path / "ckpt", tmp_path / "timm")  # from a pretraining checkpoint on disk
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert "num_classes" not in config["model_args"] and config["model_args"]["in_chans"] == channels
    pixels = torch.randn(2, channels, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(model.siamese(pixels).pooler_output, tmp_path / "expected.pt")
    stdout = run_without_hf_siamese(
        f"""
        import timm, torch
        from transformers import AutoModel
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        backbone = timm.create_model("local-dir:" + {str(tmp_path / "timm")!r}, pretrained=True).eval()
        wrapped = AutoModel.from_pretrained({str(tmp_path / "timm")!r}).eval()
        assert type(wrapped).__name__ == "TimmWrapperModel", type(wrapped)
        with torch.no_grad():
            assert torch.allclose(backbone(pixels), expected, atol=1e-5)
            assert torch.allclose(wrapped(pixels).pooler_output, expected, atol=1e-5)
        print("timm export OK", backbone.pretrained_cfg["input_size"])
        """,
        tmp_path,
    )
    assert f"timm export OK ({channels}, 32, 32)" in stdout


def test_model_card_is_generated_from_the_run_files(tmp_path):
    config = tiny_config(framework="moco", multicrop=True, multicrop_local_size=16, asym_aug=True,
                         ladder_levels=[3, 4])
    SiameseForPreTraining(config).save_pretrained(tmp_path)
    (tmp_path / "metrics.jsonl").write_text("".join(
        json.dumps({"step": step, "loss": 5.0 - step / 10}) + "\n" for step in range(1, 11)))
    records = [
        {"metric": "top1_accuracy", "value": 0.8123, "protocol": "cached", "level": "last", "dataset": "me/data",
         "split": "test"},
        {"metric": "top1_accuracy", "value": 0.75, "protocol": "knn", "level": "last", "k": 20, "dataset": "me/data",
         "split": "test"},
    ]
    (tmp_path / "eval_results.json").write_text(json.dumps({"results": records}))
    write_model_card(tmp_path, model_id="me/siamese-moco")

    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.model_name == "me/siamese-moco" and card.data.license == "apache-2.0"
    assert {"self-supervised", "moco", "multicrop", "asym-aug", "ladder-siamese"} <= set(card.data.tags)
    assert {r.metric_name: r.metric_value for r in card.data.eval_results} == {
        "Top1 accuracy, Linear probe": 0.8123, "Top1 accuracy, kNN (k=20)": 0.75}
    assert "| Linear probe | last | top1_accuracy | 81.23% | me/data | test |" in card.text
    assert "MultiCrop (6 x 16 px local crops), AsymAug" in card.text and "levels [3, 4]" in card.text
    assert 'AutoModel.from_pretrained("me/siamese-moco", trust_remote_code=True)' in card.text
    assert "wang2022asym" in card.text and "yoshihashi2023ladder" in card.text
    assert (tmp_path / "loss_curve.svg").read_text().count("<polyline") == 1


def test_loss_curve_maps_first_and_last_steps_and_the_loss_range_to_the_plot_edges():
    svg = loss_curve_svg([(0, 4.0), (50, 2.0), (100, 1.0)], width=400, height=300)
    points = svg.split('points="')[1].split('"')[0].split()
    # margin 48: x from 48 to 352; the highest loss at y = 48, the lowest at y = 300 - 48.
    assert points == ["48.0,48.0", "200.0,184.0", "352.0,252.0"]


class FakeHub:
    """Stands in for the Hub at HfApi's boundary: records repositories and commits instead of sending them."""

    def __init__(self, fail: bool = False):
        self.repos, self.commits, self.fail = [], [], fail

    def create_repo(self, api, repo_id, **kwargs):
        self.repos.append((repo_id, kwargs.get("private")))

    def create_commit(self, api, repo_id, operations, *, commit_message, **kwargs):
        if self.fail:
            raise ConnectionError("the Hub is unreachable")
        self.commits.append((commit_message, sorted(op.path_in_repo for op in operations)))


@pytest.fixture
def fake_hub(monkeypatch):
    from huggingface_hub import HfApi, constants

    hub = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the fake answers instead
    monkeypatch.setattr(HfApi, "whoami", lambda api, *args, **kwargs: {"name": "me"})
    monkeypatch.setattr(HfApi, "create_repo", lambda api, repo_id, **kw: hub.create_repo(api, repo_id, **kw))
    monkeypatch.setattr(HfApi, "create_commit", lambda api, repo_id, operations, **kw: hub.create_commit(
        api, repo_id, operations, **kw))
    return hub


def tiny_run(tmp_path, *extra):
    from hf_siamese.cli import parse_pretraining_args
    from hf_siamese.training import train

    features = datasets.Features({"image": datasets.Image()})
    datasets.Dataset.from_dict({"image": structured_images(16)}, features=features).to_parquet(tmp_path / "train.parquet")
    return train(*parse_pretraining_args([
        "--data_files", str(tmp_path / "train.parquet"), "--output_dir", str(tmp_path / "out"),
        "--per_device_train_batch_size", "8", "--report_to", "none", "--backbone", "resnet18", "--image_size", "32",
        "--projector_hidden_dim", "32", "--projector_dim", "16", "--predictor_hidden_dim", "32",
        "--framework", "simsiam", "--max_steps", "2", *extra,
    ]))


def test_push_uploads_the_whole_model_directory_and_checkpoints(tmp_path, fake_hub):
    tiny_run(tmp_path, "--push_to_hub", "true", "--hub_model_id", "me/tiny-simsiam", "--hub_private", "true",
             "--push_checkpoints", "true", "--checkpointing_steps", "1")
    assert fake_hub.repos == [("me/tiny-simsiam", True)] * 2
    (checkpoint_message, checkpoint_files), (final_message, final_files) = fake_hub.commits
    assert checkpoint_message == "hf_siamese: checkpoint at step 1"
    assert checkpoint_files and all(path.startswith("last-checkpoint/") for path in checkpoint_files)
    assert "last-checkpoint/trainer_state.json" in checkpoint_files
    assert final_message == "hf_siamese: model after 2 steps"
    expected = {"README.md", "config.json", "model.safetensors", "preprocessor_config.json", "training_run.json",
                "loss_curve.svg", "metrics.jsonl", "modeling_siamese.py", "configuration_siamese.py"}
    assert expected <= set(final_files)
    assert not any(path.startswith(("checkpoint-", ".tmp-", "runs/")) for path in final_files)
    assert ModelCard.load(tmp_path / "out" / "README.md").data.model_name == "me/tiny-simsiam"


def test_a_failed_push_keeps_the_model_and_says_so(tmp_path, fake_hub):
    fake_hub.fail = True
    with pytest.raises(RuntimeError, match="'me/tiny' failed .*ConnectionError.*intact in .*hf upload"):
        tiny_run(tmp_path, "--push_to_hub", "true", "--hub_model_id", "me/tiny", "--push_checkpoints", "true",
                 "--checkpointing_steps", "1")
    assert (tmp_path / "out" / "model.safetensors").is_file() and (tmp_path / "out" / "checkpoint-1").is_dir()


def test_export_timm_from_the_training_script(tmp_path):
    tiny_run(tmp_path, "--export_timm", str(tmp_path / "timm"))
    assert json.loads((tmp_path / "timm" / "config.json").read_text())["architecture"] == "resnet18"


@pytest.fixture
def one_channel_dir(tmp_path):
    from hf_siamese.hub import save_image_processor

    torch.manual_seed(0)
    config = tiny_config(num_channels=1, image_mean=[0.3], image_std=[0.4])
    model = SiameseForPreTraining(config).eval()
    model.save_pretrained(tmp_path / "model")
    save_image_processor(config, tmp_path / "model")
    return tmp_path / "model"


def test_image_processor_gives_the_evaluation_view_in_the_models_channels(one_channel_dir):
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor

    from hf_siamese import SiameseImageProcessor
    from hf_siamese.views import eval_transform

    processor = AutoImageProcessor.from_pretrained(one_channel_dir)
    assert isinstance(processor, SiameseImageProcessor)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (28, 28), dtype=np.uint8), "L")
    pixels = processor(image.convert("RGB"), return_tensors="pt")["pixel_values"]  # RGB in, one channel out
    assert pixels.shape == (1, 1, 32, 32)
    expected = eval_transform(32, 1, [0.3], [0.4], crop_pct=0.875)(image)  # run_linear_probe's view
    assert (pixels[0] - expected).abs().mean() < 0.02  # same geometry and normalisation; resamplers differ slightly
    with pytest.raises(ValueError, match="one-channel images"):
        processor(np.zeros((28, 28, 3), dtype=np.uint8))


def test_feature_extraction_pipeline_with_hf_siamese_and_with_remote_code(one_channel_dir, tmp_path):
    import numpy as np
    from PIL import Image
    from transformers import AutoImageProcessor, AutoModel, pipeline

    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (28, 28), dtype=np.uint8), "L")
    image.save(tmp_path / "image.png")
    encoder = AutoModel.from_pretrained(one_channel_dir).eval()
    with torch.no_grad():
        expected = encoder(**AutoImageProcessor.from_pretrained(one_channel_dir)(image, return_tensors="pt"))
    expected = expected.pooler_output[0]
    torch.save(expected, tmp_path / "expected.pt")
    features = pipeline("image-feature-extraction", model=str(one_channel_dir), pool=True)(image)
    assert torch.allclose(torch.tensor(features[0]), expected, atol=1e-5)
    stdout = run_without_hf_siamese(
        f"""
        import torch
        from transformers import pipeline
        extractor = pipeline("image-feature-extraction", model={str(one_channel_dir)!r}, pool=True,
                             trust_remote_code=True)
        assert "transformers_modules" in type(extractor.image_processor).__module__
        features = torch.tensor(extractor({str(tmp_path / "image.png")!r})[0])
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        assert torch.allclose(features, expected, atol=1e-5), (features - expected).abs().max()
        print("pipeline OK")
        """,
        tmp_path,
    )
    assert "pipeline OK" in stdout
