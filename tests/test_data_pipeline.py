"""bench/data_pipeline.py feeds both pipelines the same images and gives both the same views."""

from pathlib import Path

import torch

from bench.data_pipeline import DESIGNS, baseline_batches, make_jpegs, ours_batches, write_both
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
