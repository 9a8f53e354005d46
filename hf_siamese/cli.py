"""Command-line arguments of the scripts: a YAML recipe, then ``--field value`` overrides.

Every field of :class:`SiameseConfig` (the model), :class:`DataArguments` and :class:`PretrainingArguments` can
be set in the recipe or on the command line; an unknown key is an error that names it and the file. With
``--model_name_or_path`` the model fields start from the checkpoint's ``config.json``, and the recipe and the
command line override them, as in the transformers examples.

Recipes compose with overrides: a command-line ``--framework`` other than the recipe's drops the recipe's values
of the fields that define a framework's loss and target (:data:`FRAMEWORK_FIELDS`), which then take the new
framework's defaults, while widths, views and optimizer settings stay; a different ``--num_channels`` drops the
recipe's per-channel ``image_mean`` / ``image_std``. A data source on the command line (``--dataset_name``,
``--train_dir`` or ``--data_files``) replaces the recipe's training data as a whole, and ``--eval_split``,
``--eval_dir`` or ``--eval_data_files`` its held-out data (:data:`SOURCE_GROUPS`). Each drop is logged.
"""

import argparse
import difflib
import logging
import types
import typing
from pathlib import Path

import yaml
from huggingface_hub.errors import StrictDataclassError
from transformers import HfArgumentParser

from .configuration_siamese import SiameseConfig
from .data import DataArguments
from .sources import check_one_source
from .starting_model import check_starting_model
from .training_args import PretrainingArguments

logger = logging.getLogger(__name__)

# The model's own fields (not PreTrainedConfig's generic ones): what a recipe may set about the model.
MODEL_FIELDS = tuple(name for name in SiameseConfig.__annotations__ if not name.startswith("_"))
ARGUMENT_TYPES = {name: annotation for cls in (DataArguments, PretrainingArguments)
                  for name, annotation in typing.get_type_hints(cls).items()}
ARGUMENT_FIELDS = frozenset(ARGUMENT_TYPES)
# What a framework's loss and target are made of; widths, views and optimizer settings are choices of scale and data.
FRAMEWORK_FIELDS = ("projector_num_layers", "predictor_num_layers", "queue_size", "temperature", "momentum",
                    "momentum_final", "symmetric_loss", "shuffle_bn")
# Recipe fields chosen for the value of another field: dropped when the command line changes that field.
DEPENDENT_FIELDS = {"framework": FRAMEWORK_FIELDS, "num_channels": ("image_mean", "image_std")}
# Where a split's images come from: (the fields that name a source, the fields that describe the recipe's one). A
# source on the command line replaces the recipe's group whole; `eval_split` and `knn_bank_split` are splits of
# the recipe's `dataset_name`, so they go with it.
SOURCE_GROUPS = {
    "training data": (("dataset_name", "train_dir", "data_files"),
                      ("dataset_config", "split", "knn_bank_split", "eval_split")),
    "held-out data": (("eval_split", "eval_dir", "eval_data_files"), ()),
}
_UNSET = object()


class _Parser(HfArgumentParser):
    """An argument error is one line naming the problem, not the usage of every field."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (`--help` lists every field)\n")


def pretraining_parser() -> HfArgumentParser:
    parser = _Parser((DataArguments, PretrainingArguments), description="Pretrain a Siamese encoder.",
                     usage="%(prog)s [--config RECIPE.yaml] [--field value ...]")
    parser.add_argument("--config", type=Path, help="YAML recipe (configs/*.yaml); command-line values override it.")
    model = parser.add_argument_group("model (SiameseConfig fields; values are read as YAML, lists also as 1,2,3)")
    for name in MODEL_FIELDS:
        default = SiameseConfig.__dataclass_fields__[name].default
        value_type = _yaml_list if name in LIST_FIELDS else yaml.safe_load
        model.add_argument(f"--{name}", type=value_type, default=argparse.SUPPRESS,
                           help=f"default: {default!r} (framework default when None)")
    return parser


# Model fields that hold a list: on the command line `1,2,3` reads as `[1, 2, 3]`.
LIST_FIELDS = frozenset(name for name in MODEL_FIELDS if "list[" in str(SiameseConfig.__annotations__[name]))


def _yaml_list(text: str):
    """A YAML value, where a bare comma-separated ``1,2,3`` is the list ``[1, 2, 3]``."""
    value = yaml.safe_load(text)
    if isinstance(value, str) and "," in value:
        return [yaml.safe_load(item) for item in value.split(",")]
    return value


def parse_pretraining_args(argv: list[str] | None = None) -> tuple[SiameseConfig, DataArguments, PretrainingArguments]:
    """``(model config, data arguments, training arguments)`` from a recipe and overrides."""
    parser = pretraining_parser()
    known, _ = parser.parse_known_args(argv)  # to find --config first
    recipe = load_recipe(known.config) if known.config else {}
    recipe = _recipe_without_replaced_sources(recipe, _given_arguments(argv), known.config)
    parser.set_defaults(**{k: v for k, v in recipe.items() if k in ARGUMENT_FIELDS})
    # Returns the two dataclasses, then a namespace of the other options (--config, the model fields) when any
    # is set, then the unrecognised strings.
    *outputs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}{_nearest_flag(rest[0], parser)}")
    data_args, train_args = outputs[:2]
    namespace = outputs[2] if len(outputs) > 2 else argparse.Namespace()
    overrides = {k: getattr(namespace, k) for k in MODEL_FIELDS if hasattr(namespace, k)}
    model_fields = {**_recipe_fields_kept(recipe, overrides, known.config), **overrides}
    if train_args.model_name_or_path:  # continued pretraining: the checkpoint's model, with explicit overrides
        model_fields = {**checkpoint_model_fields(train_args.model_name_or_path), **model_fields}
    try:
        config = SiameseConfig(**model_fields)
    except StrictDataclassError as error:  # a value of the wrong type; the message names the field
        where = f" (recipe {known.config})" if known.config else ""
        raise ValueError(f"Invalid model field{where}: {' '.join(str(error).split())}") from error
    return config, data_args, train_args


def _recipe_fields_kept(recipe: dict, overrides: dict, path: Path | None) -> dict:
    """The recipe's model fields, without those it chose for a value that ``overrides`` changes."""
    fields = {k: v for k, v in recipe.items() if k in MODEL_FIELDS}
    dropped = []
    for field, dependents in DEPENDENT_FIELDS.items():
        recipe_value = fields.get(field, SiameseConfig.__dataclass_fields__[field].default)
        if field in overrides and overrides[field] != recipe_value:
            changed = [name for name in dependents if name in fields and name not in overrides]
            dropped += changed
            if changed:
                logger.warning("--%s %s overrides recipe %s's %r: its %s take the new value's defaults (set them on "
                               "the command line to choose).", field, overrides[field], path, recipe_value,
                               ", ".join(changed))
    return {k: v for k, v in fields.items() if k not in dropped}


def _given_arguments(argv: list[str] | None) -> dict:
    """The data and training arguments set on the command line (not by a recipe or a default), with their values."""
    parser = pretraining_parser()
    parser.set_defaults(**dict.fromkeys(ARGUMENT_FIELDS, _UNSET))
    namespace, _ = parser.parse_known_args(argv)
    return {name: getattr(namespace, name) for name in ARGUMENT_FIELDS if getattr(namespace, name) is not _UNSET}


def _recipe_without_replaced_sources(recipe: dict, given: dict, path: Path | None) -> dict:
    """The recipe without the data sources the command line replaces; two sources at one level are an error."""
    dropped = set()
    for what, (sources, companions) in SOURCE_GROUPS.items():
        check_one_source({name: recipe.get(name) for name in sources}, f"Recipe {path}'s {what}")
        check_one_source({name: given.get(name) for name in sources}, f"The command line's {what}")
        chosen = [name for name in sources if given.get(name)]
        replaced = [name for name in (*sources, *companions) if name in recipe and given.get(name) != recipe[name]]
        if chosen and replaced:
            logger.warning("--%s on the command line replaces recipe %s's %s (%s).", chosen[0], path, what,
                           ", ".join(f"{name}={recipe[name]!r}" for name in replaced))
            dropped.update(name for name in replaced if name not in given)
    return {name: value for name, value in recipe.items() if name not in dropped}


def _nearest_flag(flag: str, parser: argparse.ArgumentParser) -> str:
    close = difflib.get_close_matches(flag.split("=")[0], parser._option_string_actions, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


def checkpoint_model_fields(model_name_or_path: str) -> dict:
    """The model fields of a saved model's ``config.json`` (local directory or Hub id)."""
    check_starting_model(model_name_or_path)
    config = SiameseConfig.from_pretrained(model_name_or_path)
    return {name: getattr(config, name) for name in MODEL_FIELDS}


def load_recipe(path: Path) -> dict:
    """A recipe's keys and values; unknown keys raise ``ValueError`` naming the key and the file."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"Recipe {path} does not exist.")
    recipe = yaml.safe_load(path.read_text()) or {}
    if not isinstance(recipe, dict):
        raise ValueError(f"Recipe {path} must be a mapping of field: value.")
    unknown = sorted(set(recipe) - set(MODEL_FIELDS) - ARGUMENT_FIELDS)
    if unknown:
        known_fields = [*MODEL_FIELDS, *ARGUMENT_FIELDS]
        hints = [f"{name} (did you mean {close[0]}?)" if (close := difflib.get_close_matches(name, known_fields, n=1))
                 else name for name in unknown]
        raise ValueError(f"Unknown field(s) {', '.join(hints)} in recipe {path}; see `run_pretraining.py --help`.")
    for name, value in recipe.items():
        if name in ARGUMENT_TYPES and not _matches(value, ARGUMENT_TYPES[name]):
            raise ValueError(f"`{name}` in recipe {path} must be {_describe(ARGUMENT_TYPES[name])}, got {value!r}.")
    return recipe


def _matches(value, annotation) -> bool:
    """Whether a YAML value fits a dataclass field's type: ``int | None``, ``float``, ``str``, ``bool``."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return any(_matches(value, option) for option in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-4 (no dot) as a string; argparse converts it
            try:
                float(value)
            except ValueError:
                return False
            return True
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    return isinstance(value, annotation)


def _describe(annotation) -> str:
    options = typing.get_args(annotation) or (annotation,)
    return " or ".join("null" if option is type(None) else option.__name__ for option in options)
