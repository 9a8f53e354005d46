"""bench/fashion_mnist.py: its design runs are the configs they name, and its tables state each run's budget."""

import json
from pathlib import Path

from bench import fashion_mnist as bench
from hf_siamese import SiameseConfig
from hf_siamese.cli import parse_pretraining_args

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_every_fashion_mnist_bench_run_is_a_valid_config_with_its_design_on():
    configs = {name: SiameseConfig(**fields) for name, fields in bench.RUNS.items()}
    assert len(configs) == 11
    assert configs["moco_baseline"].to_dict() == parse_pretraining_args(
        ["--config", str(CONFIGS / "fashion_mnist_imagenet_stem_moco.yaml")])[0].to_dict()  # the ImageNet-stem recipe
    designs = {"multicrop": "multicrop", "scalemix": "scalemix", "asymaug": "asym_aug", "asymbn": "asym_bn",
               "meanenc": "mean_encoding"}
    for suffix, field in designs.items():
        assert getattr(configs[f"moco_{suffix}"], field) and not getattr(configs["moco_baseline"], field)
    combined = configs["moco_combined"]
    assert combined.multicrop and combined.scalemix and combined.asym_aug and combined.mean_encoding
    assert [configs[name].framework for name in ("byol", "simsiam", "mocov3")] == ["byol", "simsiam", "mocov3"]
    assert list(configs["ladder_byol"].ladder_levels) == [1, 2, 3, 4]


def test_the_bench_table_states_each_runs_budget_and_thins_its_curve(tmp_path):
    record = {"run": "small_moco", "split": "test", "set": "", "steps": 1600, "seed": 0, "epochs": 6.83,
              "pretrain_seconds": 1830,
              "images_per_s": 224.0, "knn_curve": [[100 * i, 114.0 * i, 0.7 + 0.005 * i] for i in range(1, 17)],
              "knn20_top1": 0.8512, "knn200_top1": 0.8234, "linear_top1": 0.8701}
    results = tmp_path / "results.jsonl"
    results.write_text(json.dumps(record) + "\n")
    row = bench.small_table(results).splitlines()[-1]
    # 16 points thinned to every 4th, the last kept; minutes from the clock's seconds
    assert row == ("| small_moco | test | - | 1600 | 0 | 6.83 | 30.5 | 224.0 | 7.6: 72.0, 15.2: 74.0, 22.8: 76.0, "
                   "30.4: 78.0 | 85.12 | 82.34 | 87.01 |")
    assert bench._curve_by_minute([[100, 60, 0.5], [200, 120, 0.6], [300, 180, 0.7]], points=2) == "2.0: 60.0, 3.0: 70.0"
    # The README's table: test-set runs with a probe only, validation runs and proxies left out.
    validation = {**record, "split": "validation", "run": "small_byol"}
    proxy = {**record, "probe": False, "run": "small_simsiam"}
    results.write_text("".join(json.dumps(r) + "\n" for r in (record, validation, proxy)))
    assert bench.results_table(results).splitlines()[2:] == [
        "| moco | 1600 | 0 | 6.83 | 30.5 | 224.0 | 85.12 | 82.34 | 87.01 |"]
