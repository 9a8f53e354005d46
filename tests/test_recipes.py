from pathlib import Path

import pytest
import yaml
from PIL import Image

from hf_siamese import SiameseConfig
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.views import MultiViewTransform

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
MODEL_FIELDS = set(SiameseConfig.__dataclass_fields__)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_cites_its_source_and_every_key_parses(path):
    text = path.read_text()
    assert "Source" in text.split("\n\n")[0], f"{path.name} must cite where its numbers come from"
    recipe = yaml.safe_load(text)
    config, data_args, train_args = parse_pretraining_args(["--config", str(path)])  # unknown keys raise
    assert config.framework == recipe["framework"]
    assert train_args.learning_rate == recipe["learning_rate"]
    assert (data_args.dataset_name, data_args.data_files) == (recipe.get("dataset_name"), recipe.get("data_files"))


def test_ladder_recipes():
    ladder, _, ladder_args = parse_pretraining_args(["--config", str(CONFIGS / "ladder_byol_r50.yaml")])
    plain, _, plain_args = parse_pretraining_args(["--config", str(CONFIGS / "byol_r50.yaml")])
    assert list(ladder.ladder_levels) == [1, 2, 3, 4] and plain.ladder_levels is None
    assert (ladder_args.optimizer, ladder_args.learning_rate, ladder_args.weight_decay) == ("lars", 0.2, 1.5e-6)
    assert ladder_args.warmup_epochs == plain_args.warmup_epochs == 10
    assert (ladder.momentum, ladder.projector_hidden_dim, ladder.projector_dim) == (0.996, 4096, 256)
    vit, _, _ = parse_pretraining_args(["--config", str(CONFIGS / "ladder_byol_vits16.yaml")])
    assert vit.backbone == "vit_small_patch16_224" and list(vit.ladder_levels) == [3, 6, 9, 12]


@pytest.mark.parametrize(
    "name, published",
    [
        ("asym_moco_baseline_r50.yaml", "65.8"), ("asym_moco_multicrop_r50.yaml", "69.9"),
        ("asym_moco_scalemix_r50.yaml", "67.6"), ("asym_moco_asymaug_r50.yaml", "67.2"),
        ("asym_moco_asymbn_r50.yaml", "66.3"), ("asym_moco_meanenc_r50.yaml", "67.7"),
    ],
)
def test_asym_siam_recipes_state_the_published_top1(name, published):
    text = (CONFIGS / name).read_text()
    assert f"Published ImageNet linear top-1: {published}" in text
    recipe = yaml.safe_load(text)
    assert (recipe["learning_rate"], recipe["weight_decay"], recipe["num_train_epochs"]) == (0.03, 1e-4, 100)
    config = SiameseConfig(**{k: v for k, v in recipe.items() if k in MODEL_FIELDS})
    assert (config.queue_size, config.temperature, config.momentum) == (65536, 0.2, 0.999)


@pytest.mark.parametrize("framework", ["byol", "simsiam", "mocov3"])
def test_another_framework_on_a_recipe_keeps_its_scale_and_views_and_takes_the_framework_defaults(framework, caplog):
    demo = CONFIGS / "demo_fashion_mnist.yaml"
    recipe = yaml.safe_load(demo.read_text())
    config, _, train_args = parse_pretraining_args(["--config", str(demo), "--framework", framework])
    reference = SiameseConfig(framework=framework)
    assert config.framework == framework
    for name in ("queue_size", "temperature", "momentum", "momentum_final", "symmetric_loss", "shuffle_bn"):
        assert getattr(config, name) == getattr(reference, name), name
    for name in ("projector_hidden_dim", "projector_dim", "augmentation", "image_mean", "small_image_stem"):
        assert getattr(config, name) == recipe[name], name
    assert train_args.learning_rate == recipe["learning_rate"]
    assert "queue_size" in caplog.text and "--framework" in caplog.text


def test_an_explicit_value_survives_a_framework_override():
    demo = CONFIGS / "demo_fashion_mnist.yaml"
    config, _, _ = parse_pretraining_args(["--config", str(demo), "--framework", "mocov3", "--temperature", "0.2"])
    assert config.temperature == 0.2 and config.queue_size == 0


def test_another_channel_count_on_a_recipe_drops_its_per_channel_statistics():
    demo = CONFIGS / "demo_fashion_mnist.yaml"
    config, _, _ = parse_pretraining_args(["--config", str(demo), "--num_channels", "3"])
    assert config.num_channels == 3 and config.image_mean is None and config.image_std is None  # ImageNet's
    assert MultiViewTransform.from_config(config)(Image.new("L", (28, 28)))["source_pixel_values"][0].shape[0] == 3
    same, _, _ = parse_pretraining_args(["--config", str(demo), "--framework", "moco", "--num_channels", "1"])
    assert same.queue_size == yaml.safe_load(demo.read_text())["queue_size"] and same.image_mean == [0.2860]
