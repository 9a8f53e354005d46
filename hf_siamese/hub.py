"""What goes to the Hub with the weights: the whole model directory in one commit, and the image processor."""

import json
import logging
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, constants
from huggingface_hub.utils import filter_repo_objects

from .configuration_siamese import SiameseConfig
from .image_processing_siamese import SiameseImageProcessor
from .views import EVAL_CROP_PCT, channel_stats

logger = logging.getLogger(__name__)

# Not part of a model repository: local checkpoints (pushed on their own), temporary saves, tracker logs.
PUSH_IGNORE = ["checkpoint-*", ".tmp-*", "runs/*", "*.lock"]


def push_folder(folder: str | Path, repo_id: str, *, commit_message: str, token: str | None = None,
                private: bool = False, path_in_repo: str | None = None):
    """Create ``repo_id`` if needed and commit every file of ``folder`` (but :data:`PUSH_IGNORE`) at once.

    Our own card, processor and code go up as they are; ``PreTrainedModel.push_to_hub`` would replace the card.
    """
    folder = Path(folder)
    files = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    prefix = f"{path_in_repo.strip('/')}/" if path_in_repo else ""
    operations = [
        CommitOperationAdd(path_in_repo=prefix + name, path_or_fileobj=str(folder / name))
        for name in filter_repo_objects(files, ignore_patterns=PUSH_IGNORE)
    ]
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.create_commit(repo_id, operations, commit_message=commit_message)


def push_model(output_dir: Path, repo_id: str, *, step: int, token: str | None = None, private: bool = False) -> None:
    """Push a finished model directory; a failure leaves it intact and says how to push it later."""
    try:
        push_folder(output_dir, repo_id, token=token, private=private,
                    commit_message=f"hf_siamese: model after {step} steps")
    except Exception as error:
        raise RuntimeError(
            f"Pushing {output_dir} to the Hub repository {repo_id!r} failed ({type(error).__name__}: {error}). "
            f"The trained model is intact in {output_dir}; push it later with "
            f"`hf upload {repo_id} {output_dir}`."
        ) from error
    logger.info("Pushed %s to %s", output_dir, repo_id)


def check_hub_access(token: str | None = None) -> None:
    """Fail before training, not after it, when the Hub cannot take the model: offline, unreachable or no token."""
    later = "or train without `--push_to_hub` and upload the output folder later with `hf upload <user/name> <folder>`."
    if constants.HF_HUB_OFFLINE:
        raise RuntimeError(f"`--push_to_hub` needs the Hub, but HF_HUB_OFFLINE is set: unset it, {later}")
    try:
        HfApi(token=token).whoami()
    except Exception as error:
        raise RuntimeError(f"`--push_to_hub`: the Hub cannot be reached or no token is set ({type(error).__name__}: "
                           f"{error}). Log in with `hf auth login` or pass `--hub_token`, {later}") from error


def push_checkpoint(checkpoint: Path, repo_id: str, *, step: int, token: str | None = None,
                    private: bool = False) -> None:
    """Push a checkpoint to ``last-checkpoint/``; a failure is logged and training goes on."""
    try:
        push_folder(checkpoint, repo_id, token=token, private=private,
                    commit_message=f"hf_siamese: checkpoint at step {step}", path_in_repo="last-checkpoint")
    except Exception as error:
        logger.error("Pushing %s to %s failed (%s: %s); training continues, the checkpoint is kept locally.",
                     checkpoint, repo_id, type(error).__name__, error)


def image_processor_for(config: SiameseConfig, crop_pct: float = EVAL_CROP_PCT):
    """What a downstream user needs to feed the encoder: the evaluation view of ``run_linear_probe`` (short side to
    ``image_size / crop_pct``, centre crop to ``image_size``), the training normalisation, the model's channels."""
    mean, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    return SiameseImageProcessor(
        size={"shortest_edge": round(config.image_size / crop_pct)},
        crop_size={"height": config.image_size, "width": config.image_size},
        image_mean=list(mean), image_std=list(std), num_channels=config.num_channels,
    )


def save_image_processor(config: SiameseConfig, output_dir: str | Path) -> None:
    """Write ``preprocessor_config.json`` and the processor's code into a model directory.

    The processor is found through ``config.json``'s ``auto_map``, not one in ``preprocessor_config.json``: there,
    ``AutoVideoProcessor`` (which ``pipeline`` tries for every image task) derives a remote video processor from it
    and asks whether to trust remote code even when hf_siamese is installed.
    """
    image_processor_for(config).save_pretrained(output_dir)
    path = Path(output_dir) / "preprocessor_config.json"
    saved = json.loads(path.read_text())
    for key in ("auto_map", "image_processor_type"):
        saved.pop(key, None)
    path.write_text(json.dumps(saved, indent=2, sort_keys=True) + "\n")
