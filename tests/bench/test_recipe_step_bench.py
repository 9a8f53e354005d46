"""bench/recipe_step.py times each recipe's own step on views of its own shape, as a ratio to the first recipe."""

import pytest

from bench.recipe_step import measure, recipe_step
from bench.train_step import new_accelerator

MOCO, MOCOV3 = "configs/fashion_mnist_moco.yaml", "configs/fashion_mnist_mocov3.yaml"


def test_each_recipe_steps_on_views_of_its_own_layout():
    accelerator = new_accelerator("bf16")
    _, moco_views, moco_batch = recipe_step(MOCO, accelerator)
    _, mocov3_views, _ = recipe_step(MOCOV3, accelerator)
    assert moco_batch == 256
    assert [v.shape for v in moco_views["source_pixel_values"]] == [(256, 1, 28, 28)]
    assert [v.shape for v in moco_views["target_pixel_values"]] == [(256, 1, 28, 28)]  # MoCo: one view a branch
    assert len(mocov3_views["source_pixel_values"]) == 2 and "target_pixel_values" not in mocov3_views


def test_records_give_images_per_second_and_the_ratio_to_the_first_recipe():
    first, second = measure([MOCO, MOCOV3], repeats=1, warmup=0)
    assert (first["recipe"], second["recipe"]) == (MOCO, MOCOV3)
    assert first["step_time_vs_first"] == 1.0 and first["precision"] == "bf16"
    assert second["step_time_vs_first"] == pytest.approx(second["median_step_s"] / first["median_step_s"], abs=2e-3)
    assert second["images_per_s"] == pytest.approx(256 / second["median_step_s"], rel=1e-2)


def test_recipes_of_different_precisions_are_refused_before_any_model_is_built():
    with pytest.raises(ValueError, match="mixed_precision.*'bf16'"):
        measure([MOCO, "configs/fashion_mnist_imagenet_stem_moco.yaml"], repeats=1, warmup=0)
