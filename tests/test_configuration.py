import ast
import json
import sys
from pathlib import Path

import pytest
from transformers import AutoConfig

from hf_siamese import FRAMEWORK_DEFAULTS, FRAMEWORKS, SiameseConfig, frameworks
from hf_siamese.frameworks import get_framework

# The papers' ResNet-50 recipes, written out so that a change to the framework table shows here.
PAPERS_DEFAULTS = {
    "moco": {
        "projector_num_layers": 3, "projector_hidden_dim": 2048, "projector_dim": 128, "predictor_num_layers": 0,
        "predictor_hidden_dim": None, "queue_size": 65536, "temperature": 0.2, "momentum": 0.999,
        "momentum_final": 0.999, "symmetric_loss": False, "augmentation": "mocov2", "shuffle_bn": True,
    },
    "mocov3": {
        "projector_num_layers": 2, "projector_hidden_dim": 4096, "projector_dim": 256, "predictor_num_layers": 2,
        "predictor_hidden_dim": 4096, "queue_size": 0, "temperature": 1.0, "momentum": 0.99,
        "momentum_final": 1.0, "symmetric_loss": True, "augmentation": "byol", "shuffle_bn": False,
    },
    "byol": {
        "projector_num_layers": 2, "projector_hidden_dim": 4096, "projector_dim": 256, "predictor_num_layers": 2,
        "predictor_hidden_dim": 4096, "queue_size": 0, "temperature": None, "momentum": 0.996,
        "momentum_final": 1.0, "symmetric_loss": True, "augmentation": "byol", "shuffle_bn": False,
    },
    "simsiam": {
        "projector_num_layers": 3, "projector_hidden_dim": 2048, "projector_dim": 2048, "predictor_num_layers": 2,
        "predictor_hidden_dim": 512, "queue_size": 0, "temperature": None, "momentum": None,
        "momentum_final": None, "symmetric_loss": True, "augmentation": "mocov2", "shuffle_bn": False,
    },
}


def test_the_table_holds_the_four_frameworks_in_order():
    assert list(FRAMEWORKS) == ["moco", "mocov3", "byol", "simsiam"]
    assert all(FRAMEWORKS[name].name == name for name in FRAMEWORKS)


@pytest.mark.parametrize("framework", list(PAPERS_DEFAULTS))
def test_framework_defaults_are_the_papers_and_fill_unset_fields(framework):
    assert dict(get_framework(framework).defaults) == PAPERS_DEFAULTS[framework]
    assert dict(FRAMEWORK_DEFAULTS[framework]) == PAPERS_DEFAULTS[framework]  # the former name still reads them
    config = SiameseConfig(framework=framework)
    for name, value in PAPERS_DEFAULTS[framework].items():
        assert getattr(config, name) == value, name


def test_framework_defaults_are_read_only():
    with pytest.raises(TypeError):
        get_framework("byol").defaults["momentum"] = 0.5
    assert SiameseConfig(framework="byol").momentum == 0.996


@pytest.mark.parametrize("name", ["simclr", "MoCo", "", None])
def test_unknown_framework_names_the_field_and_the_allowed_names(name):
    with pytest.raises(ValueError, match=r"`framework` must be one of \('moco', 'mocov3', 'byol', 'simsiam'\)"):
        get_framework(name)


@pytest.mark.parametrize(
    "field, value, framework, users",
    [
        ("queue_size", 4096, "mocov3", "moco"),
        ("temperature", 0.5, "simsiam", "moco, mocov3"),
        ("momentum", 0.5, "simsiam", "moco, mocov3, byol"),
        ("momentum_final", 0.5, "simsiam", "moco, mocov3, byol"),
    ],
)
def test_framework_only_field_names_the_frameworks_that_use_it(field, value, framework, users):
    with pytest.raises(ValueError, match=rf"`{field}` does not apply to framework '{framework}' \(only to {users}\)"):
        SiameseConfig(framework=framework, **{field: value})


def test_framework_table_imports_only_the_standard_library():
    """It is read by the torch-free config and copied next to checkpoints for trust_remote_code."""
    tree = ast.parse(Path(frameworks.__file__).read_text())
    imported = [alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names]
    imported += [node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and not node.level]
    assert imported and all(name.split(".")[0] in sys.stdlib_module_names for name in imported), imported


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
