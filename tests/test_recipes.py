from pathlib import Path

import pytest
import yaml

from hf_siamese import SiameseConfig

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
RECIPES = sorted(CONFIGS.glob("*.yaml"))
MODEL_FIELDS = set(SiameseConfig.__dataclass_fields__)


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_cites_its_source_and_builds_a_config(path):
    text = path.read_text()
    assert "Source" in text.split("\n\n")[0], f"{path.name} must cite where its numbers come from"
    recipe = yaml.safe_load(text)
    model_fields = {k: v for k, v in recipe.items() if k in MODEL_FIELDS}
    config = SiameseConfig(**model_fields)
    assert config.framework == recipe["framework"]


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
