import json

import pytest
import torch
from conftest import FRAMEWORK_NAMES, global_views, tiny_config
from isolation import run_without_hf_siamese
from transformers import AutoModel, AutoModelForImageClassification, AutoModelForPreTraining

from hf_siamese import SiameseForImageClassification, SiameseForPreTraining, SiameseModel

REMOTE_CODE_FILES = {
    "configuration_siamese.py", "modeling_siamese.py", "backbones.py", "heads.py", "losses.py", "distributed.py",
}


def trained_a_little(framework, backbone="resnet18", steps=2):
    """A pretraining model whose source and target differ and whose BN statistics moved."""
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config(framework, backbone=backbone)).train()
    source, target = global_views(model.config)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    for _ in range(steps):
        model(source, target).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        model.momentum_update(0.5)
    return model.eval()


@pytest.mark.parametrize("framework", FRAMEWORK_NAMES)
def test_pretraining_round_trip_gives_same_outputs_and_loss(tmp_path, framework):
    model = trained_a_little(framework)
    model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").exists()
    assert REMOTE_CODE_FILES <= {path.name for path in tmp_path.iterdir()}
    loaded = AutoModelForPreTraining.from_pretrained(tmp_path).eval()
    assert isinstance(loaded, SiameseForPreTraining)
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    source, target = global_views(model.config, seed=1)
    with torch.no_grad():
        assert torch.equal(model(source, target).loss, loaded(source, target).loss)


def test_round_trip_twice_for_vit(tmp_path):
    model = trained_a_little("mocov3", backbone="vit_tiny_patch16_224", steps=1)
    model.save_pretrained(tmp_path / "first")
    once = SiameseForPreTraining.from_pretrained(tmp_path / "first")
    once.save_pretrained(tmp_path / "second")
    twice = SiameseForPreTraining.from_pretrained(tmp_path / "second").eval()
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model.siamese(pixels).pooler_output, twice.siamese(pixels).pooler_output)


def test_automodel_on_a_pretraining_checkpoint_is_the_trained_source_encoder(tmp_path):
    model = trained_a_little("byol")
    model.save_pretrained(tmp_path)
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(encoder, SiameseModel)
    assert info["missing_keys"] == set() or not info["missing_keys"]
    assert not info["unexpected_keys"]
    for key, tensor in model.siamese.state_dict().items():
        assert torch.equal(tensor, encoder.state_dict()[key]), key
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(encoder.eval()(pixels).pooler_output, model.siamese(pixels).pooler_output)


def test_pretraining_from_an_encoder_checkpoint_starts_target_as_source(tmp_path):
    encoder = trained_a_little("byol").siamese
    encoder.save_pretrained(tmp_path)
    model = SiameseForPreTraining.from_pretrained(tmp_path)
    for key, tensor in encoder.state_dict().items():
        assert torch.equal(model.siamese.state_dict()[key], tensor), key
        assert torch.equal(model.target_encoder.state_dict()[key], tensor), key
    for target, source in zip(model.heads["4"].target_projector.parameters(), model.heads["4"].projector.parameters()):
        assert torch.equal(target, source)


def test_image_classification_from_a_pretraining_checkpoint(tmp_path):
    model = trained_a_little("simsiam")
    model.config.num_labels = 3
    model.save_pretrained(tmp_path)
    classifier = AutoModelForImageClassification.from_pretrained(tmp_path)
    assert isinstance(classifier, SiameseForImageClassification)
    for key, tensor in model.siamese.state_dict().items():
        assert torch.equal(classifier.siamese.state_dict()[key], tensor), key
    assert classifier.eval()(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)


def test_saved_config_names_all_three_classes(tmp_path):
    trained_a_little("moco", steps=1).save_pretrained(tmp_path)
    auto_map = json.loads((tmp_path / "config.json").read_text())["auto_map"]
    assert auto_map["AutoModel"] == "modeling_siamese.SiameseModel"
    assert auto_map["AutoModelForPreTraining"] == "modeling_siamese.SiameseForPreTraining"
    assert auto_map["AutoModelForImageClassification"] == "modeling_siamese.SiameseForImageClassification"


def test_trust_remote_code_loads_where_hf_siamese_cannot_be_imported(tmp_path):
    model = trained_a_little("byol")
    model.save_pretrained(tmp_path / "ckpt")
    pixels = torch.randn(2, 3, 32, 32)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        torch.save(model.siamese(pixels).pooler_output, tmp_path / "expected.pt")
    stdout = run_without_hf_siamese(
        f"""
        import torch
        from transformers import AutoModel, AutoModelForPreTraining
        encoder = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert type(encoder).__name__ == "SiameseModel", type(encoder)
        assert "transformers_modules" in type(encoder).__module__, type(encoder).__module__
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(encoder(pixels).pooler_output, expected)
        full = AutoModelForPreTraining.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True)
        assert type(full).__name__ == "SiameseForPreTraining"
        print("remote code OK")
        """,
        tmp_path,
    )
    assert "remote code OK" in stdout
