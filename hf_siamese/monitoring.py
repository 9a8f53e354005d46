"""What watches a run: the divergence guard that stops it before anything non-finite is saved, and the metrics
log (progress bar, trackers, ``metrics.jsonl``) with its training clock."""

import contextlib
import json
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from tqdm.auto import tqdm

from .checkpointing import checkpoint_step, completed_checkpoints, set_aside_checkpoints

logger = logging.getLogger(__name__)


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN or infinite loss or weights): it stops, nothing after the last good checkpoint saved."""


class DivergenceGuard:
    """Stops a diverged run before it logs, checkpoints or saves anything non-finite.

    ``observe`` notes the first step whose loss is not finite on the device, so the training step never waits for
    it; ``check`` (collective) raises :class:`NonFiniteLossError` on every process once any process saw one, and
    with ``tensors`` (weights and buffers) also when an update turned one non-finite (a finite loss can precede that). A loss that
    is not finite at step ``s`` was computed from the weights of step ``s - 1``: a checkpoint saved there is set
    aside as ``diverged-checkpoint-{s-1}``, so that resuming from 'latest' takes the last good one.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.first_bad_step = torch.tensor(-1, device=accelerator.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def check(self, step: int, tensors=None) -> None:
        weights_bad = torch.tensor(False, device=self.first_bad_step.device)
        # ZeRO-3 empties partitioned parameters: check this process's partition (ds_tensor) instead.
        local = [getattr(t, "ds_tensor", t).detach() for t in tensors or ()]
        local = [t for t in local if t.numel() and t.is_floating_point()]
        if local:
            weights_bad = ~torch.stack([torch.isfinite(t).all() for t in local]).all()
        flags = torch.stack([self.first_bad_step, torch.where(weights_bad, step, -1)])
        gathered = self.accelerator.gather(flags[None]).reshape(-1, 2)
        loss_steps, weight_steps = ([int(v) for v in column.tolist() if v >= 0] for column in gathered.T)
        if not loss_steps and not weight_steps:
            return
        if loss_steps:
            bad_weights_step = min(loss_steps) - 1
            what = (f"the loss became NaN or infinite at step {min(loss_steps)} (computed from the weights after "
                    f"step {bad_weights_step})")
        else:
            bad_weights_step = min(weight_steps)
            what = f"a weight became NaN or infinite at step {bad_weights_step}"
        good = [path for path in completed_checkpoints(self.output_dir) if checkpoint_step(path) < bad_weights_step]
        if self.accelerator.is_main_process:
            for path in set_aside_checkpoints(self.output_dir, bad_weights_step):
                logger.error("Set aside %s: its weights diverged.", path)
        self.accelerator.wait_for_everyone()  # no process exits (and gets the launcher to stop the rest) before that
        where = (f"The last good checkpoint is {good[-1]}; resume from it with a lower `learning_rate` or a "
                 "`max_grad_norm`." if good else
                 "No checkpoint from before it remains; lower `learning_rate` or set `max_grad_norm`.")
        raise NonFiniteLossError(f"Training diverged: {what}. It stopped without saving the model. {where}")


class MetricsLogger:
    """Step metrics to the progress bar, the trackers and ``metrics.jsonl`` (one JSON line per record)."""

    def __init__(self, accelerator: Accelerator, path: Path, total_steps: int, initial_step: int, resuming: bool,
                 seconds_before: float = 0.0):
        self.accelerator = accelerator
        self.path = path
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="pretraining",
                             disable=not accelerator.is_local_main_process)
        self.started = self.since = time.time()
        self.paused_seconds = 0.0
        self.paused_since: float | None = None
        self.seconds_before = seconds_before  # a resumed run's clock continues from its checkpoint's
        self.images = 0
        if resuming and accelerator.is_main_process and path.exists():
            # A resumed run replays the steps after its checkpoint (all of them when there was none): drop what
            # the interrupted run logged for them.
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= initial_step]
            temporary = path.with_name(f".tmp-{path.name}")
            temporary.write_text("".join(f"{line}\n" for line in kept))
            os.replace(temporary, path)

    @property
    def elapsed(self) -> float:
        """Training seconds: since the start (and before it, for a resumed run), without the paused ones."""
        now = self.paused_since if self.paused_since is not None else time.time()
        return self.seconds_before + now - self.started - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        """The clock stops in this block: its time counts neither in ``elapsed`` nor in the next throughput."""
        self.paused_since = time.time()
        try:
            yield
        finally:
            pause = time.time() - self.paused_since
            self.paused_seconds += pause
            self.since += pause
            self.paused_since = None

    def count_images(self, count: int) -> None:
        self.images += count

    def advance(self) -> None:
        self.progress.update(1)

    def log(self, record: dict) -> None:
        """Log ``record`` (with ``step``) and the training seconds so far; records with a loss also get the
        throughput since the last one."""
        record["seconds"] = round(self.elapsed, 2)
        if "loss" in record:
            now = time.time()
            record["images_per_s"] = self.images / max(now - self.since, 1e-9)
            self.images, self.since = 0, now
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                      img_s=f"{record['images_per_s']:.0f}")
        self.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.progress.close()


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def median_images_per_second(output_dir: Path) -> float | None:
    """A finished run's median training throughput over its logged intervals (the first includes start-up)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [record["images_per_s"] for record in records if "images_per_s" in record][1:]
    return round(statistics.median(rates), 1) if rates else None
