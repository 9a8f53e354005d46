"""bench/designs.py: every run is the recipe with its design on, and the analysis pairs seeds correctly."""

import argparse
import math
import shlex
from pathlib import Path

import pytest
from PIL import Image

from bench import designs
from hf_siamese.cli import parse_pretraining_args

ROOT = Path(__file__).resolve().parents[2]
SWITCHES = {"moco_multicrop": ["multicrop"], "moco_scalemix": ["scalemix"], "moco_asymaug": ["asym_aug"],
            "moco_asymbn": ["asym_bn"], "moco_meanenc": ["mean_encoding"],
            "moco_combined": ["multicrop", "scalemix", "asym_aug", "mean_encoding"]}
SWITCHES.update({f"moco_combined_without_{left_out}": [f for f in SWITCHES["moco_combined"] if f != field]
                 for left_out, field in (("multicrop", "multicrop"), ("scalemix", "scalemix"),
                                         ("asymaug", "asym_aug"), ("meanenc", "mean_encoding"))})


@pytest.mark.parametrize("name", list(designs.RUNS))
def test_every_run_is_its_recipe_with_its_design_on_and_measures_the_variance(name):
    framework, _, baseline = designs.RUNS[name]
    run = designs.run_args(name, seed=1, args=argparse.Namespace(
        steps=500, eval_every=100, eval_every_ladder=50, checkpoint_every=100, probe_epochs=90))
    config, _, train_args = parse_pretraining_args(
        ["--config", str(ROOT / f"configs/fashion_mnist_{framework}.yaml"), *shlex.split(run.set)])
    assert config.framework == framework and train_args.variance_steps == 500
    for field in SWITCHES.get(name, []):
        assert getattr(config, field), field
    others = set().union(*SWITCHES.values()) - set(SWITCHES.get(name, []))
    assert not any(getattr(config, field) for field in others)
    assert (len(config.ladder_levels or [4]) == 4) == (name == "ladder_byol")
    assert baseline is None or designs.RUNS[baseline][0] == framework


def record(run: str, seed: int, knn: float, linear: float, ratio: float = 0.9) -> dict:
    return {"run": run, "seed": seed, "knn20_top1": knn, "linear_top1": linear, "variance_ratio": ratio,
            "pretrain_seconds": 600.0, "knn_curve": [[50, 10.0, knn - 0.1], [100, 20.0, knn]],
            "levels": {"1": {"knn20_top1": 0.5, "linear_top1": 0.6}}}


def test_differences_are_paired_by_seed_with_a_t_interval():
    records = [record("moco_baseline", s, 0.80 + 0.01 * s, 0.85) for s in range(3)]
    records += [record("moco_scalemix", s, 0.81 + 0.01 * s + 0.001 * s, 0.84) for s in range(3)]
    rows = {row["run"]: row for row in designs.summary_rows(records, "knn20_top1")}
    scalemix = rows["moco_scalemix"]
    # paired differences 1.0, 1.1, 1.2 points: mean 1.1, std 0.1, half-width 4.303 * 0.1 / sqrt(3)
    assert scalemix["difference"] == pytest.approx(1.1)
    assert scalemix["interval"] == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert "difference" not in rows["moco_baseline"]
    unpaired = [r for r in records if not (r["run"] == "moco_baseline" and r["seed"] == 2)]
    assert designs.summary_rows(unpaired, "knn20_top1")[1]["seeds"] == [0, 1, 2]
    assert designs.summary_rows(unpaired, "knn20_top1")[1]["difference"] == pytest.approx(1.05)  # seeds 0 and 1
    table = designs.markdown_table(records).splitlines()
    assert table[3] == "| moco_scalemix | 3 | 10.0 | 82.10 ± 1.10 | +1.10 ± 0.25 | 84.00 ± 0.00 | -1.00 ± 0.00 | 0.900 |"


def test_the_variance_ordering_is_a_rank_correlation_over_the_moco_designs():
    ratios = {"moco_multicrop": 0.5, "moco_scalemix": 0.7, "moco_asymaug": 0.9, "moco_asymbn": 1.1}
    records = [record("moco_baseline", 0, 0.80, 0.85, ratio=1.0), record("byol", 0, 0.7, 0.7, ratio=0.1),
               record("ladder_byol", 0, 0.9, 0.9, ratio=9.0)]
    # accuracy falls as the ratio rises, as the paper says, except that scalemix and asymaug swap places
    gains = {"moco_multicrop": 0.04, "moco_scalemix": 0.02, "moco_asymaug": 0.03, "moco_asymbn": 0.01}
    records += [record(name, 0, 0.80 + gains[name], 0.85 - gains[name], ratio) for name, ratio in ratios.items()]
    assert designs.ratio_ordering(records, "knn20_top1") == pytest.approx(-0.8)  # 1 - 6 * 18 / (4 * 15)
    assert designs.ratio_ordering(records, "linear_top1") == pytest.approx(0.8)
    assert designs._ranks([3.0, 1.0, 3.0, 2.0]) == [3.5, 1.0, 3.5, 2.0]
    assert math.isnan(designs.ratio_ordering(records[:5], "knn20_top1"))  # two designs: no ordering to read


def test_the_compute_line_counts_untimed_probes_at_the_median_timed_one():
    records = [{**record("moco_baseline", s, 0.8, 0.85), "cpu_threads": 2} for s in range(3)]
    assert designs.compute_line(records) == "3 runs: 0.50 h of pretraining on 2 cores (probes not timed)"
    records[1]["probe_seconds"], records[2]["probe_seconds"] = 360.0, 180.0
    # pretraining 1,800 s; probes 360 + 180 + the median 270 for the untimed one = 810 s
    assert designs.compute_line(records) == ("3 runs: 0.50 h of pretraining + 0.23 h of probes, 1 of them at the "
                                             "median timed probe = 0.72 h on 2 cores (1.4 CPU-hours)")


def test_the_report_draws_the_differences_and_the_ladder_curves(tmp_path):
    records = [record(run, s, 0.8, 0.85) for run in ("moco_baseline", "moco_asymbn", "byol", "ladder_byol")
               for s in range(2)]
    path = designs.plot(records, tmp_path / "designs.png")
    assert Image.open(path).size == (1200, 450)
    assert "| 1 | 50.00 ± 0.00 | 50.00 ± 0.00 | +0.00 ± 0.00 | 60.00 ± 0.00 | 60.00 ± 0.00 | +0.00 ± 0.00 |" in (
        designs.stage_table(records))


def test_the_stage_table_pairs_the_ladder_with_byol_by_seed_at_each_stage():
    def probes(knn: float, linear: float) -> dict:
        return {"knn20_top1": knn, "linear_top1": linear}

    records = [{"run": "byol", "seed": s, "levels": {"1": probes(0.50 + 0.02 * s, 0.60)}} for s in range(2)]
    records += [{"run": "ladder_byol", "seed": s, "levels": {"1": probes(0.53 + 0.03 * s, 0.61), "2": probes(0.7, 0.8)}}
                for s in range(2)]
    rows = designs.stage_table(records).splitlines()[2:]
    # stage 1 kNN: byol 50, 52; ladder 53, 56; paired differences 3, 4: mean 3.5, half-width 12.706 * 0.707 / sqrt(2)
    assert rows[0] == "| 1 | 51.00 ± 1.41 | 54.50 ± 2.12 | +3.50 ± 6.35 | 60.00 ± 0.00 | 61.00 ± 0.00 | +1.00 ± 0.00 |"
    assert rows[1] == "| 2 | - | 70.00 ± 0.00 | - | - | 80.00 ± 0.00 | - |"  # only the ladder probed stage 2


def test_stage_probed_runs_are_probed_at_every_stage_and_at_the_pooled_output(monkeypatch, tmp_path):
    asked = {}

    def probe_split(directory, run, levels):
        asked[directory.name] = levels
        return {}

    monkeypatch.setattr(designs.track, "pretrain_recipe", lambda recipe, run, directory: {})
    monkeypatch.setattr(designs, "last_variance", lambda metrics: {})
    monkeypatch.setattr(designs.track, "probe_split", probe_split)
    args = argparse.Namespace(steps=500, eval_every=100, eval_every_ladder=50, checkpoint_every=100,
                              probe_epochs=90, work_dir=tmp_path)
    for name in ("moco_baseline", "ladder_byol"):
        assert designs.measure(name, 0, args)["probe_seconds"] >= 0
    assert asked == {"moco_baseline-seed0-steps500": "last", "ladder_byol-seed0-steps500": "1,2,3,4,last"}


def test_a_failing_run_is_reported_and_the_sweep_goes_on(monkeypatch, tmp_path):
    def measure(name, seed, args):
        if name == "moco_scalemix":
            raise FloatingPointError("loss is nan")
        designs.model_dir(name, seed, args).mkdir(parents=True)  # the checkpoint directory of a finished run
        return {"run": name, "seed": seed, "steps": args.steps, "probe_epochs": args.probe_epochs,
                "set": designs.run_args(name, seed, args).set}

    results = tmp_path / "designs.jsonl"
    monkeypatch.setattr(designs, "measure", measure)
    monkeypatch.setattr("sys.argv", ["designs.py", "--runs", "moco_baseline,moco_scalemix,moco_asymbn", "--seeds", "0",
                                     "--results", str(results), "--work_dir", str(tmp_path / "work")])
    with pytest.raises(SystemExit, match="moco_scalemix/seed0: FloatingPointError: loss is nan"):
        designs.main()
    assert [line.count('"moco_') for line in results.read_text().splitlines()] == [1, 1]
    assert not any((tmp_path / "work").iterdir())  # recorded runs' checkpoints are removed, after the record
    monkeypatch.setattr("sys.argv", ["designs.py", "--runs", "moco_baseline,moco_asymbn", "--seeds", "0",
                                     "--results", str(results), "--work_dir", str(tmp_path / "work")])
    designs.main()  # both recorded: nothing runs again
    assert len(results.read_text().splitlines()) == 2


def test_the_curve_table_gives_each_step_over_seeds_and_the_ladders_paired_difference():
    def curve(run, seed, points):
        return {**record(run, seed, 0.8, 0.8), "knn_curve": [[step, 1.0, top1] for step, top1 in points]}

    records = [curve("byol", 0, [(50, 0.70), (100, 0.74)]), curve("byol", 1, [(50, 0.72), (100, 0.76)]),
               curve("ladder_byol", 0, [(50, 0.71), (100, 0.74)]), curve("ladder_byol", 1, [(50, 0.74)]),
               curve("moco_baseline", 0, [(50, 0.10)])]
    lines = designs.curve_table(records).splitlines()
    # step 50: differences +1 and +2 points, half-width 12.706 * 0.7071 / sqrt(2) = 6.35
    assert lines[2] == "| 50 | 71.00 ± 1.41 | 72.50 ± 2.12 | +1.50 ± 6.35 |"
    assert lines[3] == "| 100 | 75.00 ± 1.41 | 74.00 | +0.00 |"  # seed 1 of the ladder has no step 100
    assert len(lines) == 4


def test_the_ablations_leave_one_design_out_of_the_combined_run_and_are_compared_with_it():
    assert set(designs.ABLATIONS).isdisjoint(designs.DESIGNS)  # not in the default sweep
    assert all(baseline == "moco_combined" for _, _, baseline in designs.ABLATIONS.values())
    records = [record("moco_baseline", 0, 0.81, 0.85), record("moco_combined", 0, 0.78, 0.83),
               record("moco_combined_without_asymaug", 0, 0.805, 0.84)]
    assert "without" not in designs.markdown_table(records)
    table = designs.markdown_table(records, designs.ABLATIONS, versus="combined").splitlines()
    assert table[0].count("vs combined") == 2
    assert table[2] == "| moco_combined_without_asymaug | 1 | 10.0 | 80.50 | +2.50 | 84.00 | +1.00 | 0.900 |"
