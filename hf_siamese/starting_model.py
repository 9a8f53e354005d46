"""What continued pretraining (``model_name_or_path``) starts from: an hf_siamese model, loaded whole.

A folder of another kind (a timm export, a training checkpoint, another library's model) would otherwise load with
a report of missing keys and train a freshly initialised model; so it is refused, saying what it is and what to
use, and every weight of the model must come from the starting model.
"""

from pathlib import Path

from transformers import PreTrainedConfig

from .checkpointing import TRAINER_STATE
from .configuration_siamese import SiameseConfig
from .modeling_siamese import SiameseForPreTraining

SHOWN_KEYS = 5


def check_starting_model(model_name_or_path: str) -> None:
    """Raise ``ValueError`` saying what ``model_name_or_path`` is, when it is not an hf_siamese model."""
    folder = Path(model_name_or_path)
    if (folder / TRAINER_STATE).is_file():
        raise ValueError(
            f"`model_name_or_path` {model_name_or_path} is a training checkpoint, not a saved model: continue its run "
            f"with `--resume_from_checkpoint {model_name_or_path} --output_dir {folder.parent}`."
        )
    if folder.is_dir() and not (folder / "config.json").is_file():
        raise ValueError(f"`model_name_or_path` {model_name_or_path} has no config.json: it is not a saved hf_siamese "
                         "model (a pretraining output folder or a `save_pretrained` folder).")
    config, _ = PreTrainedConfig.get_config_dict(model_name_or_path)
    model_type = config.get("model_type")
    if model_type != SiameseConfig.model_type:
        found = (f"a timm model ({config['architecture']})" if "architecture" in config
                 else f"a {model_type!r} model" if model_type else "not a transformers model")
        raise ValueError(
            f"`model_name_or_path` {model_name_or_path} is {found}; continued pretraining starts only from an "
            "hf_siamese model (model_type 'siamese'). A timm export is an output, not a starting point: train from "
            "scratch with `--backbone`, or start from the hf_siamese folder it was exported from."
        )


def load_starting_model(model_name_or_path: str, config: SiameseConfig) -> SiameseForPreTraining:
    """The model of ``model_name_or_path`` (safetensors only), every weight loaded; else an error naming the keys."""
    check_starting_model(model_name_or_path)
    model, info = SiameseForPreTraining.from_pretrained(model_name_or_path, config=config, use_safetensors=True,
                                                        output_loading_info=True)
    problems = {kind: sorted(info.get(kind) or ()) for kind in ("missing_keys", "unexpected_keys", "mismatched_keys")}
    problems = {kind: keys for kind, keys in problems.items() if keys}
    if problems:
        listed = "; ".join(f"{len(keys)} {kind.replace('_', ' ')} ({', '.join(map(str, keys[:SHOWN_KEYS]))}"
                           f"{', ...' if len(keys) > SHOWN_KEYS else ''})" for kind, keys in problems.items())
        raise ValueError(
            f"`model_name_or_path` {model_name_or_path} does not fit the model to train: {listed}. A model field "
            "set on the command line or in the recipe (framework, widths, levels, queue) changes the architecture; "
            "leave those to the starting model's config.json."
        )
    return model.train()  # from_pretrained returns a model in eval mode
