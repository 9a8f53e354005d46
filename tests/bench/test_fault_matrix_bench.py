"""The bad-input matrix of bench/fault_matrix.py: every case gets its expected outcome (converted and used,
skipped and counted, or an error naming the culprit; a diverged run stops with its last good checkpoint)."""

import pytest

from bench.fault_matrix import CASES, run_case


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.key)
def test_fault_matrix(case, tmp_path):
    record = run_case(case, tmp_path)
    assert record["ok"], record


def test_the_matrix_covers_every_surface_of_every_image():
    keys = {case.key for case in CASES}
    from bench.fault_matrix import IMAGES

    assert all(f"{image}/{surface}" in keys for image in IMAGES for surface in ("train", "probe", "api"))
