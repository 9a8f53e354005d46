"""bench/data_pipeline.py feeds both pipelines the same images and gives both the same views."""

from pathlib import Path

import torch

from bench.data_pipeline import DESIGNS, baseline_batches, make_jpegs, median_interval, ours_batches, write_both
from hf_siamese import SiameseConfig
from hf_siamese.views import MultiViewTransform


def test_ours_and_the_imagefolder_baseline_give_the_same_view_layout(tmp_path: Path):
    pattern, folder = write_both(make_jpegs(16), tmp_path)
    assert len(list(folder.rglob("*.jpg"))) == 16
    config = SiameseConfig(backbone="resnet50", framework="moco", **DESIGNS["multicrop"])
    transform = MultiViewTransform.from_config(config)
    ours = next(ours_batches(pattern, transform, batch=4, workers=0))
    baseline = next(baseline_batches(folder, transform, batch=4, workers=0))
    for batch in (ours, baseline):
        assert [tuple(v.shape) for v in batch["source_pixel_values"]] == [(4, 3, 224, 224)] + [(4, 3, 96, 96)] * 6
        assert [tuple(v.shape) for v in batch["target_pixel_values"]] == [(4, 3, 224, 224)]
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in batch["source_pixel_values"])


def test_both_pipelines_draw_the_same_augmentations_in_the_same_order(tmp_path: Path):
    # With one image repeated, the same draws must give the same views: the comparison is paired.
    pattern, folder = write_both(make_jpegs(1) * 8, tmp_path)
    config = SiameseConfig(backbone="resnet50", framework="moco", **DESIGNS["randaugment"])
    transform = MultiViewTransform.from_config(config)
    ours = next(ours_batches(pattern, transform, batch=4, workers=0, seed=3))
    baseline = next(baseline_batches(folder, transform, batch=4, workers=0, seed=3))
    other_seed = next(baseline_batches(folder, transform, batch=4, workers=0, seed=4))
    for key in ("source_pixel_values", "target_pixel_values"):
        assert all(torch.equal(a, b) for a, b in zip(ours[key], baseline[key], strict=True))
    assert not torch.equal(baseline["source_pixel_values"][0], other_seed["source_pixel_values"][0])


def test_median_interval_takes_order_statistics_with_their_binomial_coverage():
    interval, coverage = median_interval([1.0, 0.9, 1.2, 0.95, 1.1, 1.05, 0.97, 1.02])
    assert interval == (0.95, 1.1) and abs(coverage - (1 - 2 * 9 / 256)) < 1e-12
    assert median_interval([1.0, 1.1, 0.9]) == (None, None)  # too few repeats for 90%
