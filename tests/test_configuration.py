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


@pytest.mark.parametrize(
    "fields, named",
    [
        ({"augmentation": "simclr"}, "augmentation"),
        ({"crop_min_scale": 1.5}, "crop_min_scale"),
        ({"image_mean": [0.5, 0.5]}, "image_mean"),
        ({"multicrop_local_scale": (0.3, 0.1)}, "multicrop_local_scale"),
        ({"multicrop_global_scale": (0.1, 0.5, 1.0)}, "multicrop_global_scale"),
        ({"multicrop_num_local": 0}, "multicrop_num_local"),
        ({"scalemix_probability": 2.0}, "scalemix_probability"),
        ({"mean_encoding_views": 0}, "mean_encoding_views"),
        ({"asym_bn_group_size": 0}, "asym_bn_group_size"),
        ({"asym_bn": True, "framework": "simsiam"}, "asym_bn"),
    ],
)
def test_invalid_design_values_name_the_field(fields, named):
    with pytest.raises(ValueError, match=f"`{named}`"):
        SiameseConfig(**fields)


def test_design_fields_round_trip_through_json(tmp_path):
    config = SiameseConfig(
        framework="byol", multicrop=True, multicrop_local_scale=(0.05, 0.2), scalemix=True, asym_aug=True,
        asym_bn=True, asym_bn_group_size=8, mean_encoding=True, mean_encoding_views=3, image_mean=[0.1, 0.2, 0.3],
    )
    config.save_pretrained(tmp_path)
    loaded = SiameseConfig.from_pretrained(tmp_path)
    assert list(loaded.multicrop_local_scale) == [0.05, 0.2]
    assert (loaded.asym_bn_group_size, loaded.mean_encoding_views, loaded.augmentation) == (8, 3, "byol")
    assert loaded.multicrop and loaded.scalemix and loaded.asym_aug and loaded.asym_bn and loaded.mean_encoding
