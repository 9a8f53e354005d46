"""The papers' claims at CPU scale: every asymmetric design and the ladder against its baseline, over seeds.

Each run is a small-track recipe of Fashion-MNIST (``configs/fashion_mnist_moco.yaml`` or
``configs/fashion_mnist_byol.yaml``) with one design switched on, pretrained for ``--steps`` on the 60,000 training
images and probed once on the 10,000 test images (kNN k = 20 and 200, linear probe); the source/target variance
(Wang et al. 2022, Sec. 3.3) of the views each design trains on is measured at the last step, the online kNN
along the way (2,000 queries of train[50000:] against a bank of train[:50000]: labels the pretraining never
reads, images it does), and BYOL and Ladder-BYOL are probed at every stage. Runs of one seed share the data order
and the encoder's initial weights, so a design's difference to its baseline is paired by seed. One JSON line per
(run, seed) in ``--results``; finished runs are skipped and an unfinished one resumes from its checkpoint, and a
failing run is reported at the end without stopping the others, so the sweep runs in parts and in the background:

    nohup python bench/designs.py --seeds 0,1,2 > designs.log 2>&1 &
    python bench/designs.py --runs moco_baseline,moco_multicrop --seeds 0
    python bench/designs.py --report     # the table (mean, std, paired 95% intervals) and the plot
    python bench/designs.py --runs moco_combined_without_multicrop,moco_combined_without_scalemix --seeds 0

Design settings follow configs/asym_moco_*_r50.yaml, scaled to 28 px images: MultiCrop's local crops are 2 of
14 px at scale (0.05, 0.25) with global crops at (0.2, 1) (the small-track validation run of MultiCrop), MeanEnc
averages 2 target views. Ladder-BYOL puts a loss at every stage with equal weights (Yoshihashi et al. 2022).
"""

import argparse
import datetime
import json
import logging
import math
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import fashion_mnist as track  # noqa: E402

MULTICROP = ("--multicrop true --multicrop_num_local 2 --multicrop_local_size 14 "
             "--multicrop_local_scale '[0.05, 0.25]' --multicrop_global_scale '[0.2, 1.0]'")
MEANENC = "--mean_encoding true --mean_encoding_views 2"
# The designs of the combined recipe (Wang et al.'s MoCo v3 combination without AsymBN), in its command-line order.
COMBINED = {"multicrop": MULTICROP, "scalemix": "--scalemix true", "asymaug": "--asym_aug true", "meanenc": MEANENC}
# name -> (recipe framework, recipe overrides, the baseline it is compared with)
DESIGNS: dict[str, tuple[str, str, str | None]] = {
    "moco_baseline": ("moco", "", None),
    "moco_multicrop": ("moco", MULTICROP, "moco_baseline"),
    "moco_scalemix": ("moco", "--scalemix true", "moco_baseline"),
    "moco_asymaug": ("moco", "--asym_aug true", "moco_baseline"),
    "moco_asymbn": ("moco", "--asym_bn true", "moco_baseline"),
    "moco_meanenc": ("moco", MEANENC, "moco_baseline"),
    "moco_combined": ("moco", " ".join(COMBINED.values()), "moco_baseline"),
    "byol": ("byol", "", None),
    "ladder_byol": ("byol", "--ladder_levels '[1, 2, 3, 4]'", "byol"),
}
# Leave-one-out of the combined recipe, compared with it: which design's removal recovers what the combination loses.
# Not in the default sweep (``--runs moco_combined_without_multicrop,...``).
ABLATIONS: dict[str, tuple[str, str, str | None]] = {
    f"moco_combined_without_{left_out}": ("moco", " ".join(v for k, v in COMBINED.items() if k != left_out),
                                          "moco_combined") for left_out in COMBINED}
RUNS = {**DESIGNS, **ABLATIONS}
STAGE_PROBED = ("byol", "ladder_byol")
# Two-sided 95% quantiles of Student's t by degrees of freedom (paired differences over n seeds: n - 1).
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def run_args(name: str, seed: int, args: argparse.Namespace) -> argparse.Namespace:
    """The small track's arguments for one design run."""
    _, overrides, _ = RUNS[name]
    every = args.eval_every_ladder if name in STAGE_PROBED else args.eval_every
    return argparse.Namespace(split="test", set=f"{overrides} --variance_steps {args.steps}".strip(),
                              steps=args.steps, seed=seed, eval_every=every, checkpoint_every=args.checkpoint_every,
                              probe_epochs=args.probe_epochs)


def model_dir(name: str, seed: int, args: argparse.Namespace) -> Path:
    return args.work_dir / f"{name}-seed{seed}-steps{args.steps}"


def measure(name: str, seed: int, args: argparse.Namespace) -> dict:
    """Pretrain and probe one design run; its record."""
    framework = RUNS[name][0]
    run, directory = run_args(name, seed, args), model_dir(name, seed, args)
    record = {"bench": "designs", "run": name, "seed": seed, "steps": args.steps, "set": run.set,
              "probe_epochs": args.probe_epochs}
    record.update(track.pretrain_recipe(ROOT / f"configs/fashion_mnist_{framework}.yaml", run, directory))
    record.update(last_variance(directory / "metrics.jsonl"))
    started = time.perf_counter()
    record.update(track.probe_split(directory, run, "1,2,3,4,last" if name in STAGE_PROBED else "last"))
    record["probe_seconds"] = round(time.perf_counter() - started, 1)
    return record


def last_variance(metrics: Path) -> dict:
    records = [json.loads(line) for line in metrics.read_text().splitlines()]
    last = [record for record in records if "variance/ratio" in record][-1]
    return {key.replace("/", "_"): round(last[key], 5) for key in ("variance/source", "variance/target", "variance/ratio")}


def paired_interval(differences: list[float]) -> tuple[float, float]:
    """Mean of paired differences and the half-width of its 95% t-interval (``nan`` with one pair)."""
    mean = statistics.fmean(differences)
    if len(differences) < 2:
        return mean, math.nan
    return mean, T95[len(differences) - 1] * statistics.stdev(differences) / math.sqrt(len(differences))


def summary_rows(records: list[dict], metric: str, runs: dict = DESIGNS) -> list[dict]:
    """Per run: mean and std of ``metric`` over seeds, and its paired difference to the run it is compared with."""
    by_run: dict[str, dict[int, dict]] = {}
    for record in records:
        by_run.setdefault(record["run"], {})[record["seed"]] = record
    rows = []
    for name, (_, _, baseline) in runs.items():
        seeds = by_run.get(name, {})
        if not seeds:
            continue
        row = {"run": name, "seeds": sorted(seeds), **_spread([100 * seeds[s][metric] for s in sorted(seeds)]),
               "ratio": statistics.fmean(seeds[s]["variance_ratio"] for s in seeds),
               "minutes": statistics.fmean(seeds[s]["pretrain_seconds"] for s in seeds) / 60}
        paired = sorted(set(seeds) & set(by_run.get(baseline, {}))) if baseline else []
        row.update(_paired([100 * (seeds[s][metric] - by_run[baseline][s][metric]) for s in paired]))
        rows.append(row)
    return rows


def _spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else math.nan}


def _paired(differences: list[float]) -> dict:
    """The paired difference and its interval, or nothing when no seed is paired."""
    if not differences:
        return {}
    difference, interval = paired_interval(differences)
    return {"difference": difference, "interval": interval}


def markdown_table(records: list[dict], runs: dict = DESIGNS, versus: str = "baseline") -> str:
    knn, linear = summary_rows(records, "knn20_top1", runs), summary_rows(records, "linear_top1", runs)
    lines = [f"| run | seeds | min | kNN k=20 | vs {versus} | linear | vs {versus} | V_t / V_s |",
             "|---|---|---|---|---|---|---|---|"]
    for k_row, l_row in zip(knn, linear):
        lines.append(f"| {k_row['run']} | {len(k_row['seeds'])} | {k_row['minutes']:.1f} | {_mean_std(k_row)} | "
                     f"{_difference(k_row)} | {_mean_std(l_row)} | {_difference(l_row)} | {k_row['ratio']:.3f} |")
    return "\n".join(lines)


def _mean_std(row: dict) -> str:
    return f"{row['mean']:.2f}" + ("" if math.isnan(row["std"]) else f" ± {row['std']:.2f}")


def _difference(row: dict) -> str:
    if "difference" not in row:
        return "-"
    interval = "" if math.isnan(row["interval"]) else f" ± {row['interval']:.2f}"
    return f"{row['difference']:+.2f}{interval}"


def ratio_ordering(records: list[dict], metric: str) -> float:
    """Spearman correlation, over the designs, of V_t/V_s with the paired difference (the paper expects < 0)."""
    rows = [row for row in summary_rows(records, metric) if "difference" in row and DESIGNS[row["run"]][0] == "moco"]
    if len(rows) < 3:
        return math.nan
    return statistics.correlation(_ranks([row["ratio"] for row in rows]), _ranks([row["difference"] for row in rows]))


def _ranks(values: list[float]) -> list[float]:
    """Ranks from 1, ties sharing their mean rank."""
    order = sorted(values)
    return [order.index(value) + (order.count(value) + 1) / 2 for value in values]


def compute_line(records: list[dict]) -> str:
    """The sweep's total compute; probes that predate their timing are counted at the median probe's time."""
    pretrain = sum(record["pretrain_seconds"] for record in records) / 3600
    timed = [record["probe_seconds"] for record in records if "probe_seconds" in record]
    untimed = len(records) - len(timed)
    threads = max((record.get("cpu_threads", 1) for record in records), default=1)
    if not timed:
        return f"{len(records)} runs: {pretrain:.2f} h of pretraining on {threads} cores (probes not timed)"
    probe = (sum(timed) + untimed * statistics.median(timed)) / 3600
    estimated = f", {untimed} of them at the median timed probe" if untimed else ""
    return (f"{len(records)} runs: {pretrain:.2f} h of pretraining + {probe:.2f} h of probes{estimated} = "
            f"{pretrain + probe:.2f} h on {threads} cores ({threads * (pretrain + probe):.1f} CPU-hours)")


def stage_table(records: list[dict]) -> str:
    """BYOL and Ladder-BYOL probed at every stage: mean ± std over seeds and the ladder's paired difference."""
    byol, ladder = (_stage_probes(records, name) for name in STAGE_PROBED)
    lines = ["| stage | kNN byol | kNN ladder_byol | ladder - byol | linear byol | linear ladder_byol | ladder - byol |",
             "|---|---|---|---|---|---|---|"]
    for level in sorted({level for probes in (*byol.values(), *ladder.values()) for level in probes}, key=int):
        cells = []
        for metric in ("knn20_top1", "linear_top1"):
            by_seed = ({seed: probes[level][metric] for seed, probes in run.items() if level in probes}
                       for run in (byol, ladder))
            cells += _ladder_versus_byol(*by_seed)
        lines.append(f"| {level} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _stage_probes(records: list[dict], name: str) -> dict[int, dict[str, dict[str, float]]]:
    """A run's per-stage probes (percent) by seed and stage."""
    return {r["seed"]: {level: {metric: 100 * value for metric, value in probes.items()}
                        for level, probes in r["levels"].items()}
            for r in records if r["run"] == name and "levels" in r}


def curve_table(records: list[dict]) -> str:
    """BYOL and Ladder-BYOL online kNN by step: mean ± std over seeds and the ladder's paired difference."""
    byol, ladder = (_knn_curves(records, name) for name in STAGE_PROBED)
    lines = ["| step | byol | ladder_byol | ladder - byol |", "|---|---|---|---|"]
    for step in _steps(byol, ladder):
        cells = _ladder_versus_byol(_at(byol, step), _at(ladder, step))
        lines.append(f"| {step} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _ladder_versus_byol(byol: dict[int, float], ladder: dict[int, float]) -> list[str]:
    """One measurement by seed of each run: their mean ± std cells ("-" without a seed) and the paired difference."""
    spreads = [_spread(list(values.values())) if values else {} for values in (byol, ladder)]
    paired = _paired([ladder[seed] - byol[seed] for seed in sorted(set(byol) & set(ladder))])
    return [*(_mean_std(spread) if spread else "-" for spread in spreads), _difference(paired)]


def _knn_curves(records: list[dict], name: str) -> dict[int, dict[int, float]]:
    """A run's online kNN (percent) by seed and step."""
    return {r["seed"]: {step: 100 * top1 for step, _, top1 in r["knn_curve"]} for r in records if r["run"] == name}


def _steps(*runs: dict[int, dict[int, float]]) -> list[int]:
    return sorted({step for curves in runs for curve in curves.values() for step in curve})


def _at(curves: dict[int, dict[int, float]], step: int) -> dict[int, float]:
    """The curves' values at ``step`` by seed, for the seeds that reached it."""
    return {seed: curve[step] for seed, curve in curves.items() if step in curve}


def _spread_at(curves: dict[int, dict[int, float]], step: int) -> dict:
    """Mean and std over the seeds that reached ``step``; empty when none did."""
    values = list(_at(curves, step).values())
    return _spread(values) if values else {}


def plot(records: list[dict], path: Path) -> Path:
    """Paired differences to the baseline with their intervals, and BYOL vs Ladder-BYOL online kNN."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    figure, (differences, curves) = pyplot.subplots(1, 2, figsize=(12, 4.5))
    for offset, (metric, label) in enumerate((("knn20_top1", "kNN k=20"), ("linear_top1", "linear"))):
        rows = [row for row in summary_rows(records, metric) if "difference" in row]
        positions = [index + 0.2 * (2 * offset - 1) for index in range(len(rows))]
        errors = [0 if math.isnan(row["interval"]) else row["interval"] for row in rows]
        differences.errorbar(positions, [row["difference"] for row in rows], yerr=errors, fmt="o", capsize=3,
                             label=label)
        differences.set_xticks(range(len(rows)), [row["run"] for row in rows], rotation=30, ha="right", fontsize=8)
    differences.axhline(0, color="grey", linewidth=0.8)
    differences.set_ylabel("difference to the baseline (points, 95% paired interval)")
    differences.legend(fontsize=8)
    for name in STAGE_PROBED:
        runs = _knn_curves(records, name)
        if runs:
            steps = _steps(runs)
            mean, std = zip(*((at["mean"], at["std"]) for at in (_spread_at(runs, step) for step in steps)))
            line, = curves.plot(steps, mean, marker="o", label=f"{name} ({len(runs)} seeds, ± std)")
            if len(runs) > 1:
                curves.fill_between(steps, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                                    color=line.get_color(), alpha=0.2)
    curves.set_xlabel("step")
    curves.set_ylabel("online kNN top-1 (train[50000:] queries)")
    if curves.lines:  # BYOL and Ladder-BYOL may not have run yet
        curves.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join(DESIGNS),
                        help=f"Comma-separated subset of {', '.join(RUNS)} (default: all but the ablations).")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500)
    parser.add_argument("--eval_every", type=int, default=100, help="Online kNN every N steps.")
    parser.add_argument("--eval_every_ladder", type=int, default=50, help="Online kNN of BYOL and Ladder-BYOL.")
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--probe_epochs", type=int, default=90)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs/bench_designs")
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/designs.jsonl")
    parser.add_argument("--report", action="store_true", help="Only print the tables and draw the plot.")
    args = parser.parse_args()
    records = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    records = [r for r in records if (r["steps"], r["probe_epochs"]) == (args.steps, args.probe_epochs)]
    if args.report:
        report(records, args.results.with_suffix(".png"))
        return
    unknown = set(args.runs.split(",")) - set(RUNS)
    if unknown:
        parser.error(f"unknown run(s) {sorted(unknown)}; choose from {', '.join(RUNS)}")
    failed = sweep(records, args)
    if failed:
        sys.exit("Failed runs (kept for resuming):\n" + "\n".join(failed))


def report(records: list[dict], plot_path: Path) -> None:
    """Print the tables, the rank correlations and the compute, and draw the plot."""
    print(json.dumps({"plot": str(plot(records, plot_path))}))
    tables = [markdown_table(records), stage_table(records), curve_table(records)]
    if any(record["run"] in ABLATIONS for record in records):
        tables.append(markdown_table(records, ABLATIONS, versus="combined"))
    print("\n\n".join(tables) + "\n")
    for metric in ("knn20_top1", "linear_top1"):
        print(f"Spearman(V_t/V_s, {metric} difference) over the MoCo designs: {ratio_ordering(records, metric):+.2f}")
    print(compute_line(records))


def sweep(records: list[dict], args: argparse.Namespace) -> list[str]:
    """Run every (seed, design) not yet in ``records``, appending each record; the runs that failed."""
    done = {(r["run"], r["seed"], r["set"]) for r in records}
    failed = []
    for seed in (int(s) for s in args.seeds.split(",")):  # seed-major: every design gets seed 0 first
        for name in args.runs.split(","):
            if (name, seed, run_args(name, seed, args).set) in done:
                continue
            try:
                record = measure(name, seed, args)
            except Exception as error:  # a diverging design must not stop the others; it is retried next time
                logging.exception("%s, seed %d failed", name, seed)
                failed.append(f"{name}/seed{seed}: {type(error).__name__}: {error}")
                continue
            record.update(machine=f"{platform.machine()}, {torch.get_num_threads()} threads",
                          date=datetime.date.today().isoformat())
            args.results.parent.mkdir(parents=True, exist_ok=True)
            with args.results.open("a") as stream:
                stream.write(json.dumps(record) + "\n")
            shutil.rmtree(model_dir(name, seed, args))  # recorded: the record holds what it showed
            print(json.dumps({k: v for k, v in record.items() if not k.endswith("_curve")}), flush=True)
    return failed


if __name__ == "__main__":
    main()
