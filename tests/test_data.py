"""Pretraining data: each sample's views are a function of (seed, epoch, rank, worker, position) alone."""

import random

import numpy as np
import torch
from conftest import tiny_config
from images import structured_images

import datasets
from hf_siamese.data import PretrainingData, seeded_randomness
from hf_siamese.views import MultiViewTransform


def first_batch(dataset, transform, global_seed: int) -> dict:
    # Scramble every global generator the augmentations could draw from: torch (torchvision), Python's random
    # (timm's RandAugment magnitudes) and numpy (timm's RandAugment op choice).
    torch.manual_seed(global_seed), random.seed(global_seed), np.random.seed(global_seed)
    data = PretrainingData(dataset, transform, batch_size=4, num_channels=3, seed=7)
    return next(data.batches())[2]


def test_views_do_not_depend_on_the_global_random_state():
    # What makes a resumed run replay the same views, whatever the model did with the global generators.
    images = structured_images(8)
    dataset = datasets.Dataset.from_dict({"image": images}, features=datasets.Features({"image": datasets.Image()}))
    transform = MultiViewTransform.from_config(tiny_config("byol", asym_aug=True, scalemix=True))
    first, second = first_batch(dataset, transform, 0), first_batch(dataset, transform, 1)
    for key in ("source_pixel_values", "target_pixel_values"):
        assert all(torch.equal(a, b) for a, b in zip(first[key], second[key], strict=True)), key


def test_seeded_randomness_restores_the_global_generators():
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    expected = torch.rand(()), random.random(), np.random.random()
    torch.manual_seed(0), random.seed(0), np.random.seed(0)
    with seeded_randomness(1, 2, 3):
        inside = torch.rand(()), random.random(), np.random.random()
    assert (torch.rand(()), random.random(), np.random.random()) == expected
    with seeded_randomness(1, 2, 3):
        assert (torch.rand(()), random.random(), np.random.random()) == inside
