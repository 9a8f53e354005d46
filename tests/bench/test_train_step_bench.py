"""bench/train_step.py compares like with like: from the same weights and views, our training step, the plain
PyTorch loop and the loop built from lightly's parts compute the same loss, for every framework and variant."""

import pytest
import torch

import bench.train_step as train_step
from bench.train_step import FRAMEWORKS, VARIANTS, Case, lightly_unsupported, run_case

CASES = [Case(framework, "r18_32", variant) for framework in FRAMEWORKS for variant in VARIANTS]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_ours_plain_and_lightly_compute_the_same_loss(case):
    record = run_case(case, repeats=1, warmup=0, batch=8)
    expected = {"ours", "plain", "plain_concat"} | ({"lightly"} if lightly_unsupported(case) is None else set())
    assert set(record["first_loss"]) == expected
    assert record["loss_match"], record["first_loss"]
    if case.variant == "multicrop" or case.framework != "moco":  # several views of one size share a pass
        concat = record["first_loss"]["plain_concat"]
        assert abs(concat - record["first_loss"]["plain"]) > 1e-5 * abs(concat)  # joint statistics differ
    assert all(speed > 0 for speed in record["images_per_s"].values())
    assert record["step_gflop"] > 0 and record["memory_mb"]["ours"]["activations"] > 0


def test_lightly_is_compared_wherever_it_has_the_method():
    # The bench extra installs lightly; a missing peer must not pass silently as "not comparable".
    assert lightly_unsupported(Case("byol", "r18_32", "base")) is None
    assert "ladder" in lightly_unsupported(Case("byol", "r18_32", "ladder"))


def test_a_different_loss_is_caught(monkeypatch):
    plain_loss = train_step.plain_loss

    def off_by_a_little(config, dim):
        loss = plain_loss(config, dim)
        return lambda prediction, target: loss(prediction, target) * 1.01

    monkeypatch.setattr(train_step, "plain_loss", off_by_a_little)
    record = run_case(Case("byol", "r18_32", "base"), repeats=1, warmup=0, batch=8, with_lightly=False)
    assert not record["loss_match"]


def test_ours_variants_run_and_are_compared():
    record = run_case(Case("simsiam", "r18_32", "base"), repeats=2, warmup=0, batch=8, with_lightly=False,
                      variants=("channels_last", "bf16"))
    assert {"ours+channels_last", "ours+bf16"} <= set(record["images_per_s"])
    assert record["ratio_best_ours_plain"] >= record["ratio_ours_plain"]  # the best of ours includes ours
    assert torch.get_default_dtype() == torch.float32
