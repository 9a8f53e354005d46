"""kill -9 a pretraining run at random moments and during checkpoint saves; resume each time; compare the end.

A reference run trains ``--steps`` steps uninterrupted (deterministic mode, a checkpoint every
``--checkpointing_steps``, all kept). Then the same run, keeping only the last 2 checkpoints, is started with
``--resume_from_checkpoint latest`` and killed with SIGKILL, ``--trials`` times, in turn: at a random time, as a
save starts (``.tmp-checkpoint-N`` appears), at a random time, and once a save is complete but not yet renamed
(its ``trainer_state.json`` appears; the rename and the pruning of old checkpoints follow). After every kill, each
``checkpoint-N`` directory must be complete (``trainer_state.json``, every file loadable with
``weights_only=True``) and hold the same weights as the reference's ``checkpoint-N``. Finally the run is resumed to
the end, and its weights must equal the reference's.

    python bench/kill_resume.py [--trials 10] [--steps 12] [--seed 0]

A run that finishes before its kill is compared with the reference and the next trial interrupts a fresh run.
Prints one JSON line: trials (kills), killed_during_save (a temporary checkpoint or deletion directory existed),
killed_after_resuming (the killed process had loaded a checkpoint), crashed (a process that exited with an error
by itself: must be 0), torn_checkpoints (must be empty), metrics_steps_once (the last run's metrics.jsonl
logs each step once, whatever the killed runs logged), runs, identical_runs, identical (every run's final weights
equal the reference's).
"""

import argparse
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hf_siamese.checkpointing import (  # noqa: E402
    CHECKPOINT_PREFIX, TRAINER_STATE, checkpoint_step, completed_checkpoints, verify_checkpoint_files,
)

RESUMED = "Resumed from"


def write_data(directory: Path, count: int = 64) -> str:
    """``count`` 32 px images of random coloured blocks, in two parquet shards."""
    rng = np.random.default_rng(0)
    blocks = rng.integers(0, 256, (count, 4, 4, 3), dtype=np.uint8)
    images = [Image.fromarray(np.kron(block, np.ones((8, 8, 1), dtype=np.uint8))) for block in blocks]
    features = datasets.Features({"image": datasets.Image()})
    dataset = datasets.Dataset.from_dict({"image": images}, features=features)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(2):
        dataset.shard(2, index, contiguous=True).to_parquet(str(directory / f"train-{index}.parquet"))
    return str(directory / "*.parquet")


def command(data_files: str, output_dir: Path, steps: int, checkpointing_steps: int, *extra: str) -> list[str]:
    return [
        sys.executable, str(ROOT / "run_pretraining.py"), "--data_files", data_files, "--output_dir", str(output_dir),
        "--framework", "moco", "--queue_size", "64", "--scalemix", "true", "--per_device_train_batch_size", "16",
        "--backbone", "resnet18", "--image_size", "32", "--projector_hidden_dim", "64", "--projector_dim", "32",
        "--max_steps", str(steps), "--checkpointing_steps", str(checkpointing_steps), "--deterministic", "true",
        "--report_to", "none", "--logging_steps", "1", "--resume_from_checkpoint", "latest", *extra,
    ]


def same_weights(first: Path, second: Path) -> bool:
    expected, actual = load_file(first), load_file(second)
    return expected.keys() == actual.keys() and all(torch.equal(expected[k], actual[k]) for k in expected)


def torn_checkpoints(run_dir: Path, reference_dir: Path) -> list[str]:
    """Names of ``checkpoint-N`` directories that are incomplete, unloadable or differ from the reference's."""
    torn = []
    complete = set(completed_checkpoints(run_dir))
    for path in sorted(run_dir.glob(f"{CHECKPOINT_PREFIX}*")):
        if path not in complete:
            torn.append(f"{path.name} (no {TRAINER_STATE})")
            continue
        try:
            verify_checkpoint_files(path)
        except ValueError as error:
            torn.append(f"{path.name} ({error})")
            continue
        reference = reference_dir / path.name / "model.safetensors"
        if not same_weights(reference, path / "model.safetensors"):
            torn.append(f"{path.name} (weights differ from the reference at step {checkpoint_step(path)})")
    return torn


PRUNING = ("--checkpoints_total_limit", "2")  # the interrupted runs also delete old checkpoints (the reference keeps all)
SAVE_MOMENTS = {
    "started": ".tmp-checkpoint-*",  # accelerate is writing the state
    "marked": f".tmp-checkpoint-*/{TRAINER_STATE}",  # complete, not yet renamed (then the rename and pruning)
}


def run_trial(argv: list[str], log: Path, run_dir: Path, save_moment: str | None, deadline: float) -> dict:
    """Start ``argv``; kill it at ``save_moment`` of its first save (see SAVE_MOMENTS) or at ``deadline`` seconds."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with log.open("w") as stream:
        process = subprocess.Popen(argv, stdout=stream, stderr=subprocess.STDOUT, env=env, cwd=run_dir.parent)
        started = time.monotonic()
        while process.poll() is None:
            at_moment = save_moment is not None and run_dir.exists() and any(run_dir.glob(SAVE_MOMENTS[save_moment]))
            if at_moment or time.monotonic() - started > deadline:
                process.send_signal(signal.SIGKILL)
                break
            time.sleep(0.002)
        code = process.wait()
    text = log.read_text()
    return {
        "killed": code == -signal.SIGKILL,
        "during_save": code == -signal.SIGKILL and any(run_dir.glob(".tmp-*checkpoint-*")),  # a save or deletion
        "resumed": RESUMED in text,
        "crashed": code not in (0, -signal.SIGKILL),
        "log": text[-2000:] if code not in (0, -signal.SIGKILL) else "",
    }


def kill_resume(trials: int, steps: int, checkpointing_steps: int, seed: int, work: Path) -> dict:
    rng = random.Random(seed)
    data_files = write_data(work / "data")
    reference, run_dir = work / "reference", work / "run"
    started = time.monotonic()
    subprocess.run(command(data_files, reference, steps, checkpointing_steps), check=True, capture_output=True,
                   env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=work)
    run_seconds = time.monotonic() - started

    results, torn, finished = [], [], []
    run_dir = work / "run-0"
    while sum(r["killed"] for r in results) < trials and len(results) < 3 * trials:
        kills = sum(r["killed"] for r in results)
        save_moment = (None, "started", None, "marked")[kills % 4]
        # A run waiting for a save is not killed early: when it resumed past its last save it finishes, and the
        # next attempt starts a fresh run with the same moment. The long deadline only guards against a hang.
        deadline = run_seconds * 10 if save_moment else rng.uniform(0.3, 1.0) * run_seconds
        result = run_trial(command(data_files, run_dir, steps, checkpointing_steps, *PRUNING),
                           work / f"attempt-{len(results)}.log", run_dir, save_moment, deadline)
        results.append(result)
        torn += [f"{run_dir.name}: {name}" for name in torn_checkpoints(run_dir, reference)]
        if result["crashed"]:
            print(result["log"], file=sys.stderr)
        if not result["killed"] or (run_dir / "training_run.json").is_file():
            # It finished before the kill (a finished run is not resumed): compare it, interrupt a fresh run next.
            finished.append(result["crashed"] is False and same_weights(reference / "model.safetensors",
                                                                       run_dir / "model.safetensors"))
            run_dir = work / f"run-{len(finished)}"

    final = subprocess.run(command(data_files, run_dir, steps, checkpointing_steps, *PRUNING), capture_output=True,
                           text=True, env={**os.environ, "HF_HUB_OFFLINE": "1"}, cwd=work)
    finished.append(final.returncode == 0 and same_weights(reference / "model.safetensors", run_dir / "model.safetensors"))
    logged = [json.loads(line)["step"] for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    killed = [r for r in results if r["killed"]]
    return {
        "bench": "kill_resume", "trials": len(killed), "killed_during_save": sum(r["during_save"] for r in killed),
        "killed_after_resuming": sum(r["resumed"] for r in killed), "crashed": sum(r["crashed"] for r in results),
        "torn_checkpoints": torn, "metrics_steps_once": logged == list(range(1, steps + 1)), "runs": len(finished), "identical_runs": sum(finished), "identical": all(finished),
        "steps": steps, "checkpointing_steps": checkpointing_steps, "reference_seconds": round(run_seconds, 1),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--checkpointing_steps", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        record = kill_resume(args.trials, args.steps, args.checkpointing_steps, args.seed, Path(work))
    print(json.dumps(record))
    ok = record["identical"] and record["metrics_steps_once"] and not record["crashed"] and not record["torn_checkpoints"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
