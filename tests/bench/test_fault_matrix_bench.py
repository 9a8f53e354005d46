"""The bad-input matrix of bench/fault_matrix.py: every case gets its expected outcome (converted and used,
skipped and counted, or an error naming the culprit; a diverged run stops with its last good checkpoint)."""

from pathlib import Path

import pytest

from bench import fault_matrix
from bench.fault_matrix import CASES, IMAGES, run_case

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.key)
def test_fault_matrix(case, tmp_path):
    record = run_case(case, tmp_path)
    assert record["ok"], record


@pytest.mark.parametrize("case", [case for case in CASES if case.surface == "train" and case.name in IMAGES],
                         ids=lambda case: case.key)
def test_the_image_cases_through_a_recipe_read_the_users_files(case, tmp_path, monkeypatch):
    # Before, the recipe's Fashion-MNIST replaced the case's file, and every case "trained".
    monkeypatch.setattr(fault_matrix, "TRAINING_RECIPE", ["--config", str(ROOT / "configs/demo_fashion_mnist.yaml")])
    record = run_case(case, tmp_path)
    assert record["ok"], record


def test_the_matrix_covers_every_surface_of_every_image():
    keys = {case.key for case in CASES}
    assert all(f"{image}/{surface}" in keys for image in IMAGES for surface in ("train", "probe", "api"))
