"""Command-line arguments of the scripts: a YAML recipe, then ``--field value`` overrides.

Every field of :class:`SiameseConfig` (the model), :class:`DataArguments` and :class:`PretrainingArguments` can
be set in the recipe or on the command line; an unknown key is an error that names it and the file.
"""

import argparse
import dataclasses
from pathlib import Path

import yaml
from transformers import HfArgumentParser

from .configuration_siamese import SiameseConfig
from .data import DataArguments
from .training import PretrainingArguments

# The model's own fields (not PreTrainedConfig's generic ones): what a recipe may set about the model.
MODEL_FIELDS = tuple(name for name in SiameseConfig.__annotations__ if not name.startswith("_"))
ARGUMENT_FIELDS = frozenset(f.name for cls in (DataArguments, PretrainingArguments) for f in dataclasses.fields(cls))


def pretraining_parser() -> HfArgumentParser:
    parser = HfArgumentParser((DataArguments, PretrainingArguments), description="Pretrain a Siamese encoder.")
    parser.add_argument("--config", type=Path, help="YAML recipe (configs/*.yaml); command-line values override it.")
    model = parser.add_argument_group("model (SiameseConfig fields; values are read as YAML)")
    for name in MODEL_FIELDS:
        default = SiameseConfig.__dataclass_fields__[name].default
        model.add_argument(f"--{name}", type=yaml.safe_load, default=argparse.SUPPRESS,
                           help=f"default: {default!r} (framework default when None)")
    return parser


def parse_pretraining_args(argv: list[str] | None = None) -> tuple[SiameseConfig, DataArguments, PretrainingArguments]:
    """``(model config, data arguments, training arguments)`` from a recipe and overrides."""
    parser = pretraining_parser()
    known, _ = parser.parse_known_args(argv)  # to find --config first
    recipe = load_recipe(known.config) if known.config else {}
    parser.set_defaults(**{k: v for k, v in recipe.items() if k in ARGUMENT_FIELDS})
    # Returns the two dataclasses, then a namespace of the other options (--config, the model fields) when any
    # is set, then the unrecognised strings.
    *outputs, rest = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    data_args, train_args = outputs[:2]
    namespace = outputs[2] if len(outputs) > 2 else argparse.Namespace()
    model_fields = {k: v for k, v in recipe.items() if k in MODEL_FIELDS}
    model_fields.update({k: getattr(namespace, k) for k in MODEL_FIELDS if hasattr(namespace, k)})
    return SiameseConfig(**model_fields), data_args, train_args


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
        raise ValueError(f"Unknown field(s) {unknown} in recipe {path}; see `run_pretraining.py --help`.")
    return recipe
