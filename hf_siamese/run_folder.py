"""One run per output folder: a folder that holds an earlier run is refused, cleared on request, or resumed.

Two runs in one folder mix their ``metrics.jsonl``, loss curves and checkpoints, and ``--resume_from_checkpoint
latest`` then continues the other run's checkpoint; so a run starts only in a folder without a run in it, unless it
resumes, and a resume continues only a checkpoint of the same run (same schedule, learning rate and batch) that has
not already finished.
"""

import json
import logging
import shutil
from pathlib import Path

from .checkpointing import CHECKPOINT_PREFIX, TRAINER_STATE, completed_checkpoints

logger = logging.getLogger(__name__)

# What a pretraining run writes into its folder: any of these means a run has been there.
RUN_FILES = ("metrics.jsonl", "training_run.json", "model.safetensors", "config.json")
RUN_FOLDER_PATTERNS = (f"diverged-{CHECKPOINT_PREFIX}*", f"abandoned-{CHECKPOINT_PREFIX}*")
FINISHED_RUN = "training_run.json"  # written last, once the model is saved
# A checkpoint's settings that decide the result: resuming with other values would not continue the same run.
RUN_SETTINGS = ("total_steps", "learning_rate", "global_batch")


def earlier_run(output_dir: Path) -> list[str]:
    """The names in ``output_dir`` that an earlier run left (empty when there are none)."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [name for name in RUN_FILES if (output_dir / name).exists()]
    found += [path.name for path in completed_checkpoints(output_dir)]  # an unfinished save is only cleaned up
    for pattern in RUN_FOLDER_PATTERNS:
        found += sorted(path.name for path in output_dir.glob(pattern))
    return found


def check_new_run(output_dir: Path, logging_dir: Path, *, resuming: bool, overwrite: bool) -> bool:
    """Refuse to start in a folder with an earlier run in it (unless resuming); whether it should be cleared."""
    left = earlier_run(output_dir)
    if not left or resuming:
        return bool(left) and overwrite and not resuming
    if overwrite:
        return True
    shown = ", ".join(left[:5]) + (f" and {len(left) - 5} more" if len(left) > 5 else "")
    raise FileExistsError(
        f"The output folder {output_dir} holds an earlier run ({shown}). Choose another `--output_dir`, continue "
        f"that run with `--resume_from_checkpoint latest`, or pass `--overwrite_output_dir` to delete it (and "
        f"{logging_dir}) first."
    )


def clear(output_dir: Path, logging_dir: Path) -> None:
    """Delete an earlier run: the output folder's contents and its tracker logs."""
    for path in sorted(Path(output_dir).iterdir()):
        shutil.rmtree(path) if path.is_dir() else path.unlink()
    if Path(logging_dir).is_dir():
        shutil.rmtree(logging_dir)
    logger.warning("--overwrite_output_dir: deleted the earlier run in %s and its logs in %s.", output_dir, logging_dir)


def check_resumable(output_dir: Path, checkpoint: Path | None, settings: dict) -> None:
    """Refuse a resume that would replace a finished run's model, or would not continue ``checkpoint``'s run (its
    step beyond this run's length, or other :data:`RUN_SETTINGS` than ``settings``; checkpoints written before they
    were recorded are not compared)."""
    finished = Path(output_dir) / FINISHED_RUN
    if finished.is_file():
        steps = json.loads(finished.read_text()).get("steps")
        raise ValueError(
            f"The run in {output_dir} has finished ({steps} steps; its model is saved there): there is nothing to "
            "resume, and resuming would replace that model with an older state grown again. Start a new run from it "
            f"with `--model_name_or_path {output_dir}` and another `--output_dir`."
        )
    if checkpoint is None:
        return
    state = json.loads((Path(checkpoint) / TRAINER_STATE).read_text())
    if state["global_step"] > settings["total_steps"]:
        raise ValueError(f"{checkpoint} is at step {state['global_step']}, beyond this run's {settings['total_steps']} "
                         "steps (`max_steps` or `num_train_epochs`): resume with the run's own length.")
    saved = state.get("run_settings", {})
    changed = [f"{name} {saved[name]} -> {settings[name]}" for name in RUN_SETTINGS
               if name in saved and saved[name] != settings[name]]
    if changed:
        raise ValueError(
            f"{checkpoint} belongs to a run with other settings ({', '.join(changed)}): resuming would not continue "
            "it. Resume with that run's settings, or start a new run in another `--output_dir`."
        )
