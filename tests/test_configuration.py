import json

import pytest
from transformers import AutoConfig

from hf_siamese import FRAMEWORK_DEFAULTS, SiameseConfig


@pytest.mark.parametrize("framework", list(FRAMEWORK_DEFAULTS))
def test_framework_defaults_fill_unset_fields(framework):
    config = SiameseConfig(framework=framework)
    for name, value in FRAMEWORK_DEFAULTS[framework].items():
        assert getattr(config, name) == value, name


def test_papers_numbers_for_each_framework():
    moco, mocov3 = SiameseConfig(framework="moco"), SiameseConfig(framework="mocov3")
    byol, simsiam = SiameseConfig(framework="byol"), SiameseConfig(framework="simsiam")
    assert (moco.queue_size, moco.temperature, moco.momentum, moco.projector_dim) == (65536, 0.2, 0.999, 128)
    assert not moco.symmetric_loss and moco.predictor_num_layers == 0
    assert (mocov3.temperature, mocov3.momentum, mocov3.momentum_final) == (1.0, 0.99, 1.0)
    assert (byol.projector_hidden_dim, byol.projector_dim, byol.momentum) == (4096, 256, 0.996)
    assert (simsiam.projector_dim, simsiam.predictor_hidden_dim, simsiam.momentum) == (2048, 512, None)


def test_explicit_values_override_framework_defaults():
    config = SiameseConfig(framework="byol", projector_dim=64, momentum=0.99, symmetric_loss=False)
    assert (config.projector_dim, config.momentum, config.symmetric_loss) == (64, 0.99, False)
    assert config.projector_hidden_dim == 4096


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"framework": "simclr"}, "framework"),
        ({"backbone": "resnet_does_not_exist"}, "backbone"),
        ({"image_size": -32}, "image_size"),
        ({"num_channels": 0}, "num_channels"),
        ({"projector_dim": -1}, "projector_dim"),
        ({"predictor_num_layers": -1, "framework": "byol"}, "predictor_num_layers"),
        ({"queue_size": 4096, "framework": "byol"}, "queue_size"),
        ({"queue_size": 0, "framework": "moco"}, "queue_size"),
        ({"momentum": 0.99, "framework": "simsiam"}, "momentum"),
        ({"temperature": 0.2, "framework": "byol"}, "temperature"),
        ({"temperature": -0.1, "framework": "mocov3"}, "temperature"),
        ({"momentum": 1.5, "framework": "byol"}, "momentum"),
        ({"momentum": 0.99, "momentum_final": 0.9, "framework": "byol"}, "momentum_final"),
    ],
)
def test_invalid_values_raise_value_error_naming_the_field(fields, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        SiameseConfig(**fields)


def test_save_and_load_round_trip(tmp_path):
    config = SiameseConfig(backbone="resnet18", framework="mocov3", projector_dim=64, image_size=32)
    config.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "siamese"
    assert saved["auto_map"]["AutoModel"] == "modeling_siamese.SiameseModel"
    assert saved["auto_map"]["AutoModelForPreTraining"] == "modeling_siamese.SiameseForPreTraining"
    assert saved["auto_map"]["AutoModelForImageClassification"] == "modeling_siamese.SiameseForImageClassification"
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, SiameseConfig)
    assert loaded.to_diff_dict() | {"_name_or_path": ""} == config.to_diff_dict() | {"_name_or_path": ""}


def test_simsiam_round_trip_keeps_momentum_unset(tmp_path):
    SiameseConfig(framework="simsiam").save_pretrained(tmp_path)
    loaded = SiameseConfig.from_pretrained(tmp_path)
    assert loaded.momentum is None and not loaded.uses_momentum_target
