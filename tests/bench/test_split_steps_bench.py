"""bench/split_steps.py trains the recipe both ways, pairs the repeats and appends one line."""

import json

from bench.split_steps import main


def test_both_ways_train_and_the_ratio_pairs_them(tmp_path):
    results = tmp_path / "split_steps.jsonl"
    line = main(["--steps", "4", "--repeats", "1", "--results", str(results), "--",
                 "--per_device_train_batch_size", "16", "--dataloader_num_workers", "0"])
    assert json.loads(results.read_text()) == line
    assert line["host_images_per_s"] > 0 and line["device_split_images_per_s"] > 0
    assert line["ratio"] == round(line["device_split_repeats"][0] / line["host_repeats"][0], 3)
    assert line["extra_args"][-1] == "0" and line["steps"] == 4
