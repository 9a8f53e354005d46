"""Where a training step's time goes: our step (views batched, per-view BatchNorm), ours with one pass per view,
and the plain loop that concatenates the views, profiled on the same weights and views of one bench/train_step.py
case. One JSON line per step kind: the step's median seconds and the operators with the most self CPU time.

    python bench/profile_step.py --case byol/r50_64/base [--steps 3] [--top 12]
"""

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.train_step import Case, OursStep, ReferenceStep, make_views, new_accelerator, plain_parts  # noqa: E402


def step_kinds(case: Case, batch: int | None, seed: int = 0) -> tuple[dict, dict]:
    """The three steps from one set of weights, and the views they take."""
    from bench.train_step import SCALES

    config = case.config()
    torch.manual_seed(seed)
    accelerator = new_accelerator()
    views = make_views(config, batch or SCALES[case.scale]["batch"], seed)
    ours = OursStep(config, accelerator)
    separate_config = copy.deepcopy(config)
    separate_config.batch_views = False
    separate = OursStep(separate_config, accelerator)
    separate.unwrapped.load_state_dict(ours.unwrapped.state_dict())
    concat = ReferenceStep(config, plain_parts(), accelerator.device, concat_views=True)
    concat.copy_from(ours.unwrapped)
    return {"ours": ours, "ours_one_pass_per_view": separate, "plain_concat": concat}, views


def profiled(step, views: dict, steps: int, top: int) -> dict:
    """Median step seconds over ``steps`` unprofiled steps, then the top operators of ``steps`` profiled ones."""
    seconds = []
    for _ in range(steps):
        start = time.perf_counter()
        float(step(views))
        seconds.append(time.perf_counter() - start)
    with profile(activities=[ProfilerActivity.CPU]) as trace:
        for _ in range(steps):
            float(step(views))
    table = sorted(trace.key_averages(), key=lambda event: event.self_cpu_time_total, reverse=True)
    total = sum(event.self_cpu_time_total for event in table)
    operators = [{"op": event.key, "calls": event.count // steps,
                  "self_ms_per_step": round(event.self_cpu_time_total / 1000 / steps, 1),
                  "share": round(event.self_cpu_time_total / total, 3)} for event in table[:top]]
    return {"median_step_s": round(statistics.median(seconds), 4), "operators": operators}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--case", default="byol/r50_64/base")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    framework, scale, variant = args.case.split("/")
    steps, views = step_kinds(Case(framework, scale, variant), args.batch)
    for step in steps.values():
        float(step(views))  # warm-up: lazy state, allocator
    for name, step in steps.items():
        print(json.dumps({"bench": "profile_step", "case": args.case, "step": name, **profiled(step, views,
                                                                                            args.steps, args.top)}))


if __name__ == "__main__":
    main()
