"""The Hub side: the generated model card and the timm-format export, loaded where hf_siamese is not importable."""

import json

import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from isolation import run_without_hf_siamese

from hf_siamese import SiameseForPreTraining
from hf_siamese.hub import export_timm, loss_curve_svg, write_model_card


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
