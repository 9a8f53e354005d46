"""bench/dense.py: the supervised encoder's augmentation, the probes each encoder gets, and the report's pairing."""

import argparse

import torch

from bench import dense


def test_every_encoder_gets_each_stage_multi_and_upernet():
    assert dense.probes(argparse.Namespace(upernet=True)) == [
        ("linear", "1"), ("linear", "2"), ("linear", "3"), ("linear", "4"), ("linear", "multi"), ("upernet", "multi")]
    assert ("upernet", "multi") not in dense.probes(argparse.Namespace(upernet=False))


def test_supervised_augmentation_crops_28_px_windows_of_the_padded_images_and_flips_some():
    images = torch.arange(4 * 28 * 28, dtype=torch.float32).reshape(4, 28, 28)
    crops = dense.augmented(images, torch.Generator().manual_seed(0))
    assert crops.shape == (4, 1, 28, 28)
    padded = torch.nn.functional.pad(images[:, None], (4, 4, 4, 4), mode="reflect")
    for crop, image in zip(crops, padded):  # each crop is a window of its padded image, flipped or not
        windows = image.unfold(1, 28, 1).unfold(2, 28, 1).reshape(1, -1, 28, 28)[0]
        assert any(torch.equal(crop[0], window) or torch.equal(crop[0].flip(-1), window) for window in windows)


def test_the_report_pairs_ladder_byol_with_byol_by_seed():
    records = [{"encoder": encoder, "seed": seed, "protocol": "linear", "level": "2", "miou": miou}
               for encoder, seed, miou in (("byol", 0, 40.0), ("byol", 1, 42.0), ("ladder_byol", 0, 41.0),
                                           ("ladder_byol", 1, 45.0), ("random_init", 0, 20.0))]
    table = dense.report(records)
    assert "| byol | 41.00 ± 1.41 (2) |" in table and "| random_init | 20.00 (1 seed) |" in table
    assert "| ladder_byol - byol | +2.00 ± 12.71 (n=2) |" in table  # differences 1 and 3: t(1) = 12.706
