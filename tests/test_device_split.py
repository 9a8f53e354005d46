"""The colour steps on the device: the workers ship uint8 views and parameter rows, ``finish_views`` colours and
normalises them in batch, and the result is the host's view of the same draws (up to the blur's rounding)."""

import random

import numpy as np
import pytest
import torch
from conftest import tiny_config
from PIL import Image

from hf_siamese.device_augment import finish_views
from hf_siamese.photometric_params import PHOTOMETRIC_FIELDS
from hf_siamese.views import MultiViewTransform, channel_stats, collate_views

DESIGNS = {
    "byol": ("byol", {}),
    "mocov2": ("moco", {}),
    "small_gray": ("byol", {"augmentation": "small_gray", "num_channels": 1, "image_size": 28,
                            "small_image_stem": True}),
    "multicrop": ("moco", {"multicrop": True, "multicrop_num_local": 3, "multicrop_local_size": 16}),
    "meanenc": ("moco", {"mean_encoding": True, "mean_encoding_views": 2}),
    "asymaug": ("byol", {"asym_aug": True}),
    "scalemix": ("byol", {"scalemix": True, "scalemix_probability": 0.5}),  # mixed and unmixed views
}
# The device reproduces PIL's arithmetic step for step (tests/test_device_augment.py); the blur's float sums may
# round apart: on these 16 images per design, at most this fraction of the values one grey level off.
BLUR_MISMATCH_FRACTION = 1e-3


def photographs(count: int, mode: str) -> list[Image.Image]:
    """Smooth colour gradients with texture, so that every colour step changes something."""
    generator = np.random.default_rng(0)
    y, x = np.mgrid[0:48, 0:40] / 48.0
    images = []
    for index in range(count):
        base = np.stack([x, y, (x + y) / 2], axis=-1) * 200 + generator.normal(0, 18, (48, 40, 3)) + index * 5
        images.append(Image.fromarray(np.clip(base, 0, 255).astype(np.uint8)).convert(mode))
    return images


def views_of(transform: MultiViewTransform, images: list[Image.Image]) -> dict:
    """The batch of ``images``' views, each image's draws seeded by its index (as the data loader seeds them)."""
    samples = []
    for index, image in enumerate(images):
        torch.manual_seed(index)
        random.seed(index)  # timm's RandAugment
        np.random.seed(index)
        samples.append(transform(image))
    return collate_views(samples)


@pytest.mark.parametrize("design", list(DESIGNS))
def test_device_coloured_views_equal_the_host_views_of_the_same_draws(design):
    framework, fields = DESIGNS[design]
    config = tiny_config(framework, **fields)
    images = photographs(16, "L" if config.num_channels == 1 else "RGB")
    host = views_of(MultiViewTransform.from_config(config), images)
    shipped = views_of(MultiViewTransform.from_config(config, augment_on_device=True), images)
    device = finish_views(shipped, config)
    assert list(device) == list(host)
    _, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    scale = torch.tensor(std).view(1, -1, 1, 1) * 255
    grey_levels = torch.cat([((actual - expected) * scale).abs().flatten()
                             for name in host for expected, actual in zip(host[name], device[name])])
    assert grey_levels.max() <= 1.001
    assert (grey_levels > 1e-3).float().mean() <= BLUR_MISMATCH_FRACTION


def test_the_workers_ship_uint8_views_and_one_parameter_row_per_view():
    config = tiny_config("moco", multicrop=True, multicrop_num_local=2, multicrop_local_size=16)
    shipped = views_of(MultiViewTransform.from_config(config, augment_on_device=True), photographs(4, "RGB"))
    assert set(shipped) == {"source_pixel_values", "source_photometric", "target_pixel_values", "target_photometric"}
    for branch in ("source", "target"):
        views, rows = shipped[f"{branch}_pixel_values"], shipped[f"{branch}_photometric"]
        assert len(views) == len(rows) and all(view.dtype == torch.uint8 for view in views)
        assert all(row.shape == (4, len(PHOTOMETRIC_FIELDS)) for row in rows)
    finished = finish_views(shipped, config)
    assert set(finished) == {"source_pixel_values", "target_pixel_values"}
    assert all(view.dtype == torch.float32 for view in finished["source_pixel_values"])


def test_scalemix_ships_each_global_source_views_partner_and_box():
    config = tiny_config("byol", scalemix=True, scalemix_probability=0.5)
    shipped = views_of(MultiViewTransform.from_config(config, augment_on_device=True), photographs(8, "RGB"))
    partners, boxes = shipped["source_mix_pixel_values"], shipped["source_mix_box"]
    assert len(partners) == len(boxes) == len(shipped["source_pixel_values"]) == 2
    empty = torch.stack([(box[:, 1] <= box[:, 0]) | (box[:, 3] <= box[:, 2]) for box in boxes])
    assert empty.any() and not empty.all()  # probability 0.5: some views mixed, some not
    assert all(partner.dtype == torch.uint8 and partner.shape == view.shape
               for partner, view in zip(partners, shipped["source_pixel_values"]))
    assert set(finish_views(shipped, config)) == {"source_pixel_values", "target_pixel_values"}


UINT8_DESIGNS = {**DESIGNS, "scalemix_always": ("byol", {"scalemix": True, "scalemix_probability": 1.0})}


@pytest.mark.parametrize("design", list(UINT8_DESIGNS))
def test_uint8_views_normalised_on_the_device_are_the_host_views(design):
    """Without the device's colour steps, views travel as uint8 and ``finish_views`` only normalises: the same
    tensors as the host's float views, for every design (ScaleMix's mix and AsymAug's RandAugment included)."""
    framework, fields = UINT8_DESIGNS[design]
    config = tiny_config(framework, **fields)
    images = photographs(8, "L" if config.num_channels == 1 else "RGB")
    host = views_of(MultiViewTransform.from_config(config), images)
    shipped = views_of(MultiViewTransform.from_config(config, uint8_views=True), images)
    assert all(view.dtype == torch.uint8 for name in shipped if name.endswith("pixel_values") for view in shipped[name])
    finished = finish_views(shipped, config)
    assert list(finished) == list(host)
    for name in host:
        assert all(torch.equal(actual, expected) for actual, expected in zip(finished[name], host[name])), name


def test_float_views_pass_through_finish_views_unchanged():
    config = tiny_config("byol")
    host = views_of(MultiViewTransform.from_config(config), photographs(2, "RGB"))
    finished = finish_views(host, config)
    assert all(actual is expected for name in host for actual, expected in zip(finished[name], host[name]))
