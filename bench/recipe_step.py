"""Step speed of the small-image recipes, as a ratio to the first one, measured in one process.

Each recipe's own model, precision, memory format and batch; random views of its shape (no data loading), the
library's step (bench/train_step.py's ``OursStep``), the recipes' order rotated every repeat. One JSON line per
recipe: median seconds per step, images/s and the ratio of its step time to the first recipe's.

    python bench/recipe_step.py [--recipes configs/fashion_mnist_moco.yaml,...] [--repeats 5] [--warmup 2]
"""

import argparse
import datetime
import json
import platform
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.train_step import OursStep, interleaved_times, make_views, new_accelerator  # noqa: E402
from hf_siamese.cli import parse_pretraining_args  # noqa: E402

SMALL_TRACK = [f"configs/fashion_mnist_{name}.yaml" for name in ("moco", "mocov3", "byol", "simsiam")]


def recipe_step(recipe: str, accelerator) -> tuple[OursStep, dict, int]:
    """The recipe's step, random views of its shape and its batch size."""
    config, _, train_args = parse_pretraining_args(["--config", str(ROOT / recipe)])
    return _step_views_batch(config, train_args, accelerator)


def _step_views_batch(config, train_args, accelerator) -> tuple[OursStep, dict, int]:
    batch = train_args.per_device_train_batch_size
    step = OursStep(config, accelerator, channels_last=train_args.channels_last)
    return step, make_views(config, batch), batch


def measure(recipes: list[str], repeats: int, warmup: int) -> list[dict]:
    parsed = {recipe: parse_pretraining_args(["--config", str(ROOT / recipe)]) for recipe in recipes}
    precisions = {train_args.mixed_precision or "no" for _, _, train_args in parsed.values()}
    if len(precisions) != 1:
        raise ValueError(f"the recipes must share one mixed_precision to run in one process, got {precisions}")
    accelerator = new_accelerator(precisions.pop())
    built = {recipe: _step_views_batch(config, train_args, accelerator)
             for recipe, (config, _, train_args) in parsed.items()}
    # Each step closes over its own views: interleaved_times passes one shared views argument, unused here.
    steps = {recipe: (lambda _, step=step, views=views: step(views)) for recipe, (step, views, _) in built.items()}
    times = interleaved_times(steps, None, accelerator.device, warmup, repeats)
    baseline = statistics.median(times[recipes[0]])
    records = []
    for recipe, (_, _, batch) in built.items():
        seconds = statistics.median(times[recipe])
        records.append({
            "bench": "recipe_step", "recipe": recipe, "median_step_s": round(seconds, 4),
            "images_per_s": round(batch / seconds, 1), "step_time_vs_first": round(seconds / baseline, 3),
            "repeats": repeats, "precision": accelerator.mixed_precision,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads", "torch": torch.__version__,
            "date": datetime.date.today().isoformat(),
        })
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--recipes", default=",".join(SMALL_TRACK))
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=2)
    args = parser.parse_args()
    for record in measure(args.recipes.split(","), args.repeats, args.warmup):
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
