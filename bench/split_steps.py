"""Training images/s of a recipe with the colour steps in the DataLoader workers (``host``) and in batch in the
training process (``device_split``, ``--augment_on_device``), end to end on this machine's cores, no accelerator.

Each repeat runs ``run_pretraining.py --config RECIPE --max_steps STEPS`` once each way, in fresh processes, the
order alternating between repeats; a run's speed is its median logged images/s after the first logging interval
(which holds start-up), as ``hf_siamese.monitoring.median_images_per_second`` reads it from ``metrics.jsonl``.
``ratio`` is the median over repeats of split / host in the same repeat (above 1: the split is faster), with a
distribution-free interval. Keep the cores free while it runs: the two ways share them in turns.

    python bench/split_steps.py [--recipe configs/demo_fashion_mnist.yaml] [--steps 60] [--repeats 6]
        [--results bench/results/split_steps.jsonl] [-- extra run_pretraining.py arguments]
"""

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.data_pipeline import median_interval  # noqa: E402
from hf_siamese.monitoring import median_images_per_second  # noqa: E402

BENCH = "split_steps"
MODES = {"host": "false", "device_split": "true"}


def images_per_second(recipe: str, mode: str, steps: int, extra: list[str], workdir: Path) -> float:
    """One training run's median images/s after its first logging interval."""
    output_dir = workdir / mode
    command = [sys.executable, str(ROOT / "run_pretraining.py"), "--config", str(ROOT / recipe),
               "--output_dir", str(output_dir), "--overwrite_output_dir", "true", "--max_steps", str(steps),
               "--logging_steps", str(max(1, steps // 6)), "--report_to", "none",
               "--augment_on_device", MODES[mode], *extra]
    subprocess.run(command, check=True, cwd=ROOT, env={**os.environ, "HF_HUB_OFFLINE": "1"},
                   stdout=subprocess.DEVNULL)
    rate = median_images_per_second(output_dir)
    if rate is None:
        raise RuntimeError(f"{mode}: no images/s logged after the first interval; raise --steps")
    return rate


def measure(args: argparse.Namespace) -> dict:
    rates = {mode: [] for mode in MODES}
    with tempfile.TemporaryDirectory() as workdir:
        for repeat in range(args.repeats):
            order = list(MODES) if repeat % 2 == 0 else list(reversed(MODES))
            for mode in order:
                rates[mode].append(images_per_second(args.recipe, mode, args.steps, args.extra, Path(workdir)))
    ratios = [split / host for split, host in zip(rates["device_split"], rates["host"])]
    interval, coverage = median_interval(ratios)
    return {"bench": BENCH, "recipe": args.recipe, "steps": args.steps, "repeats": args.repeats,
            "extra_args": args.extra,
            **{f"{mode}_images_per_s": round(statistics.median(values), 1) for mode, values in rates.items()},
            "ratio": round(statistics.median(ratios), 3),
            "ratio_interval": [round(v, 3) for v in interval] if interval else None,
            "ratio_interval_coverage": round(coverage, 3) if coverage else None,
            "ratio_repeats": [round(r, 3) for r in ratios],
            **{f"{mode}_repeats": values for mode, values in rates.items()},
            "machine": f"{platform.machine()}, {os.cpu_count()} threads", "date": datetime.date.today().isoformat()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    argv = sys.argv[1:] if argv is None else argv
    extra = argv[argv.index("--") + 1:] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipe", default="configs/demo_fashion_mnist.yaml")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--repeats", type=int, default=6)
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/split_steps.jsonl")
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    args.extra = extra
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    line = measure(args)
    print(json.dumps(line))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    with args.results.open("a") as stream:
        stream.write(json.dumps(line) + "\n")
    return line


if __name__ == "__main__":
    main()
