"""Training checkpoints: ``output_dir/checkpoint-{step}``, each one complete or absent, never unpickled.

A save is written under ``.tmp-checkpoint-{step}``, synced to disk, marked complete by ``trainer_state.json`` and
renamed once every process has finished; a deletion renames before it removes. So a run killed at any moment
(kill -9, preemption, a full disk, a host crash) leaves whole checkpoints and temporary directories, which are
ignored and cleaned up.

Loading refuses pickles. The learning-rate schedule is kept as JSON in ``trainer_state.json`` instead of
accelerate's ``custom_checkpoint_*.pkl`` (which accelerate reads with ``weights_only=False``), and every torch file
of a checkpoint is opened with ``weights_only=True`` before accelerate or DeepSpeed reads it: accelerate would
silently skip a refused random-state file, and DeepSpeed unpickles its own files in full.
"""

import json
import logging
import os
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils.other import TORCH_SAFE_GLOBALS
from safetensors import safe_open

logger = logging.getLogger(__name__)

CHECKPOINT_PREFIX = "checkpoint-"
TEMPORARY_PREFIX = ".tmp-"
TRAINER_STATE = "trainer_state.json"
TORCH_FILE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl")


class UnsafeCheckpointError(ValueError):
    """A checkpoint file that is not plain tensors and numbers (possibly a pickle that would run code)."""


@dataclass
class ResumePoint:
    """Where a run continues: the optimizer step, the position in the data stream of this process, and the
    training seconds spent so far (so that a resumed run's clock continues)."""

    step: int = 0
    epoch: int = 0
    batches_done: int = 0
    seconds: float = 0.0
    checkpoint: str | None = None  # the checkpoint it continues from


def save_checkpoint(accelerator: Accelerator, output_dir: Path, point: ResumePoint, scheduler,
                    total_limit: int | None = None, run_settings: dict | None = None) -> Path:
    """Write ``output_dir/checkpoint-{step}`` (collective: every process calls it) and prune to ``total_limit``.

    ``run_settings`` (schedule length, learning rate, batch) let a resume check that it continues the same run.
    """
    final = output_dir / f"{CHECKPOINT_PREFIX}{point.step}"
    temporary = output_dir / f"{TEMPORARY_PREFIX}{final.name}"
    if accelerator.is_main_process and temporary.exists():
        shutil.rmtree(temporary)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    data_state = {"epoch": point.epoch, "batches_done": point.batches_done}
    (temporary / f"data_state_{accelerator.process_index}.json").write_text(json.dumps(data_state))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        state = {"global_step": point.step, "lr_scheduler": scheduler.state_dict(), "train_seconds": point.seconds,
                 "run_settings": run_settings or {}}
        _sync_files(temporary)  # on disk before the marker, so that a host crash cannot leave empty files
        (temporary / TRAINER_STATE).write_text(json.dumps(state))  # written last: marks the save complete
        _sync_files(temporary, TRAINER_STATE)
        if final.exists():  # saved before by a run resumed from an earlier checkpoint
            _remove(final)
        temporary.rename(final)
        _sync_directory(output_dir)
        if total_limit:
            for old in completed_checkpoints(output_dir)[:-total_limit]:
                _remove(old)
    accelerator.wait_for_everyone()
    return final


def completed_checkpoints(output_dir: Path) -> list[Path]:
    """Finished checkpoints, oldest first (temporary directories of interrupted saves are ignored)."""
    found = [
        path for path in Path(output_dir).glob(f"{CHECKPOINT_PREFIX}*")
        if path.is_dir() and (path / TRAINER_STATE).exists() and path.name[len(CHECKPOINT_PREFIX):].isdigit()
    ]
    return sorted(found, key=checkpoint_step)


def checkpoint_step(path: Path) -> int:
    return int(Path(path).name[len(CHECKPOINT_PREFIX):])


def set_aside_checkpoints(output_dir: Path, from_step: int, prefix: str = "diverged-") -> list[Path]:
    """Rename the finished checkpoints of step >= ``from_step`` to ``{prefix}checkpoint-N``: kept for a look, never
    resumed from by 'latest'. Returns the new paths."""
    moved = []
    for path in reversed(completed_checkpoints(output_dir)):  # newest first: 'latest' is never a diverged one
        if checkpoint_step(path) >= from_step:
            target = path.with_name(prefix + path.name)
            if target.exists():
                shutil.rmtree(target)
            moved.append(path.rename(target))
    return moved


def remove_unfinished(output_dir: Path) -> list[str]:
    """Delete what interrupted saves and deletions left behind; returns the removed names."""
    removed = []
    for leftover in sorted(Path(output_dir).glob(f"{TEMPORARY_PREFIX}*")):
        if leftover.is_dir():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
        removed.append(leftover.name)
    return removed


def find_checkpoint(output_dir: Path, which: str) -> Path | None:
    """The checkpoint ``which`` names ('latest': the newest complete one in ``output_dir``, ``None`` if there is
    none; else a path, which must be a complete checkpoint)."""
    if which == "latest":
        checkpoints = completed_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(which)
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {TRAINER_STATE}).")
    return path


def load_checkpoint(accelerator: Accelerator, output_dir: Path, path: Path, scheduler) -> ResumePoint:
    """Restore model, optimizer, schedule and random states from the checkpoint at ``path``."""
    saved_processes = len(list(path.glob("data_state_*.json")))
    if saved_processes != accelerator.num_processes:
        raise ValueError(f"{path} was saved by {saved_processes} process(es); this run has {accelerator.num_processes}. "
                         "Resume with the same number of processes (the data position is per process).")
    state = json.loads((path / TRAINER_STATE).read_text())
    if "lr_scheduler" not in state:
        raise ValueError(f"{path} was written by an older hf_siamese (no learning-rate schedule in {TRAINER_STATE}); "
                         "start from its weights with `model_name_or_path` instead.")
    verify_checkpoint_files(path)
    accelerator.load_state(str(path))
    scheduler.load_state_dict(state["lr_scheduler"])
    data_state = json.loads((path / f"data_state_{accelerator.process_index}.json").read_text())
    step = state["global_step"]
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # Resuming from an earlier checkpoint abandons the later ones: out of the way of 'latest' and of pruning.
        for later in set_aside_checkpoints(output_dir, step + 1, prefix="abandoned-"):
            logger.warning("Set aside %s: the run continues from the earlier %s.", later, path.name)
    accelerator.wait_for_everyone()
    logger.info("Resumed from %s at step %d", path, step)
    return ResumePoint(step, data_state["epoch"], data_state["batches_done"], state.get("train_seconds", 0.0),
                       str(path))


def verify_checkpoint_files(path: Path) -> None:
    """Raise :class:`UnsafeCheckpointError` naming the first file of ``path`` that is not plain tensors.

    Torch files must load with ``weights_only=True``, allowing only what accelerate allows (numpy random states)
    and the plain DeepSpeed classes of its ZeRO optimizer files; safetensors files must have a readable header.
    """
    allowed = TORCH_SAFE_GLOBALS + _deepspeed_safe_globals()
    for file in sorted(Path(path).rglob("*")):
        if file.suffix in TORCH_FILE_SUFFIXES:
            try:
                with torch.serialization.safe_globals(allowed):
                    torch.load(file, map_location="cpu", weights_only=True)
            except Exception as error:
                raise UnsafeCheckpointError(
                    f"Refusing to load {file}: it is not plain tensors ({type(error).__name__}: "
                    f"{str(error).splitlines()[0]}). It may be a pickle that runs code when loaded; hf_siamese only "
                    "loads checkpoint files with torch.load(weights_only=True)."
                ) from error
        elif file.suffix == ".safetensors":
            try:
                with safe_open(file, framework="pt"):
                    pass
            except Exception as error:
                raise UnsafeCheckpointError(f"{file} is not a readable safetensors file ({error}).") from error


def _deepspeed_safe_globals() -> list:
    """The data-only DeepSpeed classes that ZeRO-1/2 optimizer state files hold (when running under DeepSpeed): the
    loss scalers (fp16 runs hold the dynamic one), the stage and the fp32 fragments' addresses."""
    if "deepspeed" not in sys.modules:  # not a DeepSpeed run: do not pay for importing it
        return []
    try:
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        return []
    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


def _sync_files(directory: Path, name: str | None = None) -> None:
    """fsync ``directory/name``, or every file under ``directory``."""
    for file in [directory / name] if name else [f for f in directory.rglob("*") if f.is_file()]:
        with open(file, "rb") as stream:
            os.fsync(stream.fileno())


def _sync_directory(directory: Path) -> None:
    """fsync a directory, so that a rename in it survives a host crash."""
    descriptor = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _remove(path: Path) -> None:
    """Delete a checkpoint so that no half-deleted directory ever looks complete: rename, then remove."""
    doomed = path.with_name(f"{TEMPORARY_PREFIX}deleting-{path.name}")
    if doomed.exists():
        shutil.rmtree(doomed)
    path.rename(doomed)
    shutil.rmtree(doomed)
