"""bench/dense.py: the supervised encoder's augmentation, the probes each encoder gets, and the report's pairing."""

import argparse

import torch
from PIL import Image

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
    records = [{"encoder": encoder, "steps": steps, "seed": seed, "protocol": "linear", "level": "2", "miou": miou}
               for encoder, steps, seed, miou in (
                   ("byol", 500, 0, 40.0), ("byol", 500, 1, 42.0), ("ladder_byol", 500, 0, 41.0),
                   ("ladder_byol", 500, 1, 45.0), ("random_init", 0, 0, 20.0), ("byol", 1600, 0, 50.0))]
    table = dense.report(records)
    assert "| byol | 500 | 41.00 ± 1.41 (2) |" in table and "| random_init | 0 | 20.00 (1 seed) |" in table
    assert "| byol | 1600 | 50.00 (1 seed) |" in table  # another budget is another row, never averaged in
    assert "| ladder_byol - byol | 500 | +2.00 ± 12.71 (n=2) |" in table  # differences 1 and 3: t(1) = 12.706
    # the untrained floor pairs with every budget; a baseline with no shared seed gives no row
    assert "| byol - random_init | 500 | +20.00 (1 seed) |" in table
    assert "| byol - random_init | 1600 | +30.00 (1 seed) |" in table
    assert "supervised" not in table


def test_the_sweep_skips_recorded_probes_but_not_those_of_another_budget_or_other_scenes(monkeypatch, tmp_path):
    args = argparse.Namespace(seeds="0", encoders="random_init,moco_baseline", upernet=True, linear_epochs=20,
                              linear_learning_rate=3e-2, upernet_epochs=3, upernet_learning_rate=1e-3, steps=500,
                              work_dir=tmp_path, results=tmp_path / "dense.jsonl", keep_encoders=True,
                              validation=False, train_scenes=2, eval_scenes=2, scenes_seed=0)
    recorded = [{"encoder": encoder, "steps": steps, "seed": 0, "protocol": protocol, "level": level,
                 "learning_rate": dense.learning_rate(protocol, args), "probe_epochs": dense.epochs(protocol, args),
                 **dense.settings(args)}
                for encoder, steps in (("random_init", 0), ("moco_baseline", 500))
                for protocol, level in dense.probes(args)]
    probed = []
    monkeypatch.setattr(dense, "train_encoder", lambda name, seed, args, directory: {"steps": args.steps})
    monkeypatch.setattr(dense, "probe", lambda directory, seed, protocol, level, args: probed.append(
        (directory.name, protocol, level)) or {"miou": 1.0})
    assert dense.sweep(recorded, args) == [] and probed == []
    args.steps = 1600  # the untrained floor stays recorded; MoCo at 1,600 steps is a new encoder
    assert dense.sweep(recorded, args) == []
    assert probed == [("moco_baseline-seed0-steps1600", protocol, level) for protocol, level in dense.probes(args)]
    probed.clear()
    args.steps, args.eval_scenes = 500, 3  # other evaluation scenes: every probe again
    assert dense.sweep(recorded, args) == [] and len(probed) == 2 * len(dense.probes(args))


def test_the_plot_draws_encoders_that_miss_some_probes(tmp_path):
    records = [{"encoder": encoder, "steps": 500, "seed": seed, "protocol": protocol, "level": level, "miou": 30.0}
               for encoder, seed in (("byol", 0), ("byol", 1), ("supervised", 0))
               for protocol, level in (("linear", "1"), ("linear", "multi"))]
    records.append({"encoder": "byol", "steps": 500, "seed": 0, "protocol": "upernet", "level": "multi", "miou": 25.})
    assert Image.open(dense.plot(records, tmp_path / "dense.png")).size == (800, 450)
