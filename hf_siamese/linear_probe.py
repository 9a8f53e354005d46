"""The ``run_linear_probe.py`` job: a frozen encoder + a labelled dataset -> kNN and linear-probe accuracies.

Flow: load the model (any ``AutoModel`` checkpoint) -> load the train and eval splits (one source each, labels
matched by class name, images shared with training reported) -> extract features of both once -> weighted kNN
(k = 20, 200) -> linear heads (``cached`` or ``augmented`` protocol) for every probed level -> accuracies through
the shipped ``evaluate`` metrics -> ``eval_results.json`` and the model card's ``model-index``.
"""

import hashlib
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoImageProcessor, AutoModel

from .data import FASHION_MNIST, DataArguments, find_image_column, load_raw_dataset, undecoded
from .fashion_mnist import HUB_ID as FASHION_MNIST_HUB_ID
from .eval_results import results_dir, write_eval_results
from .metrics import classification_accuracy, load_metric
from .modeling_siamese import SiameseModel
from .pictures import write_pictures
from .sources import DATASET, FILES, FOLDER, check_image_folder, check_one_source, resolve_data_files
from .views import EVAL_CROP_PCT
from .probing import (
    LAST,
    Features,
    FrozenEncoderCheck,
    InputSpec,
    LabelledImages,
    Level,
    ProbeSchedule,
    SkippedImages,
    autocast_dtype,
    extract_features,
    fit_augmented_probe,
    fit_cached_probe,
    knn_classify,
    predict,
    require_label_column,
)

logger = logging.getLogger(__name__)

PROTOCOLS = ("cached", "augmented")
SPLITS = {"train": "training", "eval": "evaluation"}  # the probe's splits, and how messages call them


@dataclass
class ProbeArguments:
    """What to probe, on which data, and how; names follow the pretraining script where they overlap."""

    model_name_or_path: str = field(metadata={"help": "hf_siamese checkpoint, or any model AutoModel loads."})
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id, or 'fashion_mnist': both splits (no `*_dir`/`*_data_files`)."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    train_split: str = field(default="train", metadata={"help": "Split the probes are trained on."})
    eval_split: str = field(default="test", metadata={"help": "Split the probes are evaluated on."})
    train_dir: str | None = field(default=None, metadata={"help": "Local imagefolder of training images."})
    eval_dir: str | None = field(default=None, metadata={"help": "Local imagefolder of evaluation images."})
    train_data_files: str | None = field(default=None, metadata={"help": "Local parquet/.tar training files (glob)."})
    eval_data_files: str | None = field(default=None, metadata={"help": "Local parquet/.tar evaluation files (glob)."})
    image_column: str | None = field(default=None, metadata={"help": "Image column (found automatically if unset)."})
    label_column: str = field(default="label", metadata={"help": "Integer label column."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N training examples."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Use only the first N evaluation examples."})
    protocol: str = field(default="cached", metadata={"help": "cached (features extracted once) | augmented."})
    probe_levels: str = field(
        default="last", metadata={"help": "last | all | comma-separated stage indices and/or 'last', e.g. 2,3,last."}
    )
    knn_k: str = field(default="20,200", metadata={"help": "Comma-separated kNN neighbour counts ('' for no kNN)."})
    knn_temperature: float = field(default=0.07, metadata={"help": "kNN vote temperature: weight exp(sim / T)."})
    num_train_epochs: int = field(default=90, metadata={"help": "Linear-probe epochs."})
    per_device_train_batch_size: int = field(default=256, metadata={"help": "Linear-probe batch size."})
    per_device_eval_batch_size: int = field(default=256, metadata={"help": "Feature-extraction batch size."})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | lars (SimSiam: lars, lr 0.02) | adamw."})
    learning_rate: float = field(default=0.1, metadata={"help": "Linear-probe lr per 256 examples."})
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD/LARS momentum."})
    weight_decay: float = field(default=0.0, metadata={"help": "Linear-probe weight decay."})
    head_batchnorm: bool = field(
        default=True, metadata={"help": "Standardise features with BatchNorm (no affine) before each linear head "
                                        "(MAE); false gives the plain SimSiam/MoCo v3 head."}
    )
    eval_crop_pct: float = field(
        default=EVAL_CROP_PCT, metadata={"help": "Evaluation view: resize to size/crop_pct, centre crop (1: resize only)."}
    )
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    mixed_precision: str = field(
        default="no", metadata={"help": "no | bf16 | fp16: the frozen encoder under autocast (features in float32)."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the heads' init, batch order and augmentation."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where eval_results.json goes (default: the model directory if local)."}
    )
    pictures: bool = field(
        default=True, metadata={"help": "Draw a nearest-neighbour gallery and a 2-D map of the evaluation features "
                                        "(needs matplotlib) next to eval_results.json."}
    )
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow a checkpoint's own modeling code."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"`protocol` must be one of {PROTOCOLS}, got {self.protocol!r}.")
        for name in ("num_train_epochs", "per_device_train_batch_size", "per_device_eval_batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")
        autocast_dtype(self.mixed_precision)  # validates it
        self.knn_neighbours  # noqa: B018 (validates `knn_k`)
        for split, which in SPLITS.items():
            if not check_one_source(self._source_fields(split), f"The probe's {which} data"):
                raise ValueError(f"No {split} data: set `dataset_name` (with `{split}_split`), `{split}_dir` or "
                                 f"`{split}_data_files`.")
        if _reads_training_images(self.resolved_source("train"), self.resolved_source("eval")):
            raise ValueError(f"The evaluation data, {self.describe_source('eval')}, holds the training data's images "
                             f"({self.describe_source('train')}): the probe would score on its training images. "
                             "Evaluate on held-out images: another `eval_split`, `eval_dir` or `eval_data_files`.")

    @property
    def knn_neighbours(self) -> list[int]:
        try:
            values = [int(k) for k in self.knn_k.split(",") if k.strip()]
        except ValueError:
            raise ValueError(f"`knn_k` must be comma-separated integers, got {self.knn_k!r}.") from None
        if any(k < 1 for k in values):
            raise ValueError(f"`knn_k` values must be at least 1, got {self.knn_k!r}.")
        return values

    @property
    def dataset_id(self) -> str:
        """How the results name the dataset."""
        if self.dataset_name == FASHION_MNIST:
            return FASHION_MNIST_HUB_ID
        return self.dataset_name or self.train_dir or self.train_data_files or "local"

    @property
    def eval_split_name(self) -> str:
        return self.eval_split if self.dataset_name else self.eval_dir or self.eval_data_files or "eval"

    def _source_fields(self, split: str) -> dict[str, str | None]:
        """The fields that can give ``split``'s ("train" or "eval") images; exactly one may be set."""
        return {"dataset_name": self.dataset_name, f"{split}_dir": getattr(self, f"{split}_dir"),
                f"{split}_data_files": getattr(self, f"{split}_data_files")}

    def _source_field(self, split: str) -> str:
        return next(name for name, value in self._source_fields(split).items() if value)

    def describe_source(self, split: str) -> str:
        """``split``'s source as messages name it: "`eval_dir` 'val'", "`dataset_name` 'x' (split 'test')"."""
        field = self._source_field(split)
        described = f"`{field}` {getattr(self, field)!r}"
        return described + (f" (split {self._split_name(split)!r})" if field == "dataset_name" else "")

    def resolved_source(self, split: str) -> tuple:
        """What ``split`` reads, resolved so that two spellings of one source compare equal; a folder or a glob is
        checked here, before anything loads, and named by its field."""
        field = self._source_field(split)
        value = getattr(self, field)
        if field == "dataset_name":
            return DATASET, value, self.dataset_config, self._split_name(split)
        if field == f"{split}_dir":
            return FOLDER, check_image_folder(value, field).resolve()
        return FILES, frozenset(Path(file).resolve() for file in resolve_data_files(value, field))

    def _split_name(self, split: str) -> str:
        return self.train_split if split == "train" else self.eval_split

    def split_data(self, split: str) -> DataArguments:
        """The :class:`DataArguments` that load the ``train`` or ``eval`` split."""
        train = split == "train"
        return DataArguments(
            dataset_name=self.dataset_name, dataset_config=self.dataset_config, split=self._split_name(split),
            train_dir=self.train_dir if train else self.eval_dir,
            data_files=self.train_data_files if train else self.eval_data_files,
            image_column=self.image_column,
            max_train_samples=self.max_train_samples if train else self.max_eval_samples,
        )


def _reads_training_images(train: tuple, evaluation: tuple) -> bool:
    """Whether the evaluation source is the training one (data files: every evaluation file is a training file)."""
    if train[0] == evaluation[0] == FILES:
        return evaluation[1] <= train[1]
    return train == evaluation


def parse_levels(spec: str, model) -> list[Level]:
    """``"last"``, ``"all"`` (every stage) or a list like ``"2,3,last"`` -> levels, checked against ``model``."""
    stage_count = len(model.stage_widths) if isinstance(model, SiameseModel) else 0
    if spec.strip() == "all":
        if not stage_count:
            raise ValueError(f"`probe_levels` 'all' needs an hf_siamese model; {type(model).__name__} has no stages.")
        return list(range(1, stage_count + 1))
    levels: list[Level] = []
    for item in (part.strip() for part in spec.split(",")):
        if item == LAST:
            levels.append(LAST)
        elif item.isdigit() and 1 <= int(item) <= stage_count:
            levels.append(int(item))
        else:
            valid = f"1..{stage_count}, 'last' or 'all'" if stage_count else "'last' (not an hf_siamese model)"
            raise ValueError(f"`probe_levels` entry {item!r} is not a level of this model; valid: {valid}.")
    return list(dict.fromkeys(levels))


def load_encoder(args: ProbeArguments) -> tuple[torch.nn.Module, InputSpec]:
    """The frozen encoder in eval mode, and what its inputs look like."""
    model = AutoModel.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
    processor = None
    if not isinstance(model, SiameseModel):
        try:
            processor = AutoImageProcessor.from_pretrained(args.model_name_or_path, trust_remote_code=args.trust_remote_code)
        except (OSError, ValueError) as error:
            logger.warning("No image processor for %s: %s", args.model_name_or_path, error)
    model.requires_grad_(False).eval()
    return model.to("cuda" if torch.cuda.is_available() else "cpu"), InputSpec.from_model(model, processor)


def run_linear_probe(args: ProbeArguments) -> list[dict]:
    """Probe ``args.model_name_or_path``; returns the result records (also written to ``eval_results.json``)."""
    output_dir = results_dir(args.model_name_or_path, args.output_dir, "outputs/linear_probe")
    with torch.random.fork_rng(devices=[]):  # the probe's seed, without touching the caller's random state
        torch.manual_seed(args.seed)
        results, pictures = _probe(args, output_dir)
    write_eval_results(args.model_name_or_path, output_dir, results, {"pictures": pictures})
    return results


def _probe(args: ProbeArguments, output_dir: Path) -> tuple[list[dict], dict | None]:
    model, spec = load_encoder(args)
    levels = parse_levels(args.probe_levels, model)
    stages = [level for level in levels if level != LAST]
    progress = not args.disable_tqdm
    train_raw, eval_raw = load_probe_data(args)
    num_classes = _num_classes(train_raw, eval_raw, args.label_column)
    frozen = FrozenEncoderCheck(model)
    skipped = {split: SkippedImages(split) for split in SPLITS}

    extract = dict(label_column=args.label_column, image_column=args.image_column, levels=stages,
                   batch_size=args.per_device_eval_batch_size, num_workers=args.dataloader_num_workers,
                   progress=progress, transform=spec.eval_transform(args.eval_crop_pct), input_spec=spec,
                   mixed_precision=args.mixed_precision)
    # Cached training features serve kNN and the cached protocol; the augmented one re-encodes every epoch.
    needs_train_features = bool(args.knn_neighbours) or args.protocol == "cached"
    train_features = (extract_features(model, train_raw, **extract, skipped=skipped["train"])
                      if needs_train_features else None)
    eval_features = extract_features(model, eval_raw, **extract, skipped=skipped["eval"])

    results = _knn_results(args, train_features, eval_features, levels, num_classes) if args.knn_neighbours else []
    heads = _fit_heads(args, model, spec, train_raw, train_features, levels, num_classes, skipped["train"])
    frozen.verify(model)
    for level, logits in predict(heads, eval_features).items():
        for name, value in classification_accuracy(logits, eval_features.labels).items():
            results.append({"metric": f"{name}_accuracy", "value": value, "protocol": args.protocol, "level": level,
                            "epochs": args.num_train_epochs})
    common = {"dataset": args.dataset_id, "split": args.eval_split_name,
              "num_train": len(train_raw) - len(skipped["train"]), "num_eval": len(eval_features.labels),
              "skipped_images": {split: len(images) for split, images in skipped.items()}}
    decodable = tuple(skipped[split].kept(raw) for split, raw in zip(SPLITS, (train_raw, eval_raw)))
    pictures = _pictures(args, output_dir, train_features, eval_features, decodable, spec, num_classes)
    return [{**record, **common} for record in results], pictures


def _fit_heads(args: ProbeArguments, model, spec: InputSpec, train_raw, train_features: Features | None, levels: list,
               num_classes: int, skipped: SkippedImages) -> dict:
    """The linear heads, fitted on cached features or on augmented views re-encoded every epoch."""
    progress = not args.disable_tqdm
    schedule = ProbeSchedule(epochs=args.num_train_epochs, batch_size=args.per_device_train_batch_size,
                             optimizer=args.optimizer, learning_rate=args.learning_rate, momentum=args.sgd_momentum,
                             weight_decay=args.weight_decay, batchnorm=args.head_batchnorm, seed=args.seed)
    if args.protocol == "cached":
        return fit_cached_probe(train_features, levels, num_classes, schedule, progress)
    images = LabelledImages(train_raw, spec.train_transform(), num_channels=spec.num_channels,
                            label_column=args.label_column, image_column=args.image_column)
    return fit_augmented_probe(model, images, levels, num_classes, schedule, args.dataloader_num_workers, progress,
                               args.mixed_precision, skipped=skipped)


def _pictures(args: ProbeArguments, output_dir: Path, train: Features | None, evaluation: Features, raw: tuple,
              spec: InputSpec, num_classes: int) -> dict | None:
    """The gallery and the map of the last level, drawn from the features already extracted."""
    if not args.pictures:
        return None
    if train is None:
        logger.warning("Pictures skipped: the augmented protocol without kNN extracts no training features.")
        return None
    started = time.perf_counter()
    bank_images, images = (LabelledImages(split, lambda image: image, num_channels=spec.num_channels,
                                          label_column=args.label_column, image_column=args.image_column)
                           for split in raw)
    pictures = write_pictures(output_dir, train.features, train.labels, evaluation.features, evaluation.labels,
                              lambda index: bank_images[index][0], lambda index: images[index][0],
                              _class_names(raw[0], args.label_column) or [str(label) for label in range(num_classes)],
                              seed=args.seed)
    if pictures:
        pictures["seconds"] = round(time.perf_counter() - started, 1)
        logger.info("Drew %s and %s in %s in %.1f s", pictures["gallery"], pictures["embedding_map"], output_dir,
                    pictures["seconds"])
    return pictures


def _class_names(raw, label_column: str) -> list[str] | None:
    """The class names of a ``ClassLabel`` label column (image folders, Hub datasets); ``None`` for plain ids."""
    names = getattr((raw.features or {}).get(label_column), "names", None)
    return list(names) if names else None


def _knn_results(args: ProbeArguments, train: Features, test: Features, levels: list[Level],
                 num_classes: int) -> list[dict]:
    accuracy = load_metric("accuracy")
    results = []
    for level in levels:
        for k in args.knn_neighbours:
            predictions = knn_classify(train, test.at(level), k=k, temperature=args.knn_temperature,
                                       num_classes=num_classes, level=level)
            value = accuracy.compute(predictions=predictions.tolist(), references=test.labels.tolist())["accuracy"]
            results.append({"metric": "top1_accuracy", "value": value, "protocol": "knn", "level": level,
                            "k": min(k, len(train.labels)), "temperature": args.knn_temperature})
    return results


def load_probe_data(args: ProbeArguments) -> tuple:
    """The training and evaluation splits, both labelled, the evaluation labels numbered as the training ones."""
    train, evaluation = (load_raw_dataset(args.split_data(split)) for split in SPLITS)
    for split, raw in zip(SPLITS, (train, evaluation)):
        _check_labelled(raw, args, split)
    evaluation = align_labels(train, evaluation, args.label_column,
                              sources=(args.describe_source("train"), args.describe_source("eval")))
    warn_about_shared_images(train, evaluation, args.image_column)
    return train, evaluation


def _check_labelled(raw, args: ProbeArguments, split: str) -> None:
    """An empty split, or one without the label column, is an error naming its source (a folder's says how)."""
    which, source = SPLITS[split], args.describe_source(split)
    if len(raw) == 0:
        raise ValueError(f"The probe's {which} data, {source}, is empty (0 rows).")
    folder = getattr(args, f"{split}_dir")
    if folder and args.label_column not in raw.column_names and "label" not in raw.column_names:
        raise ValueError(f"The probe's {which} data, {source}, has no class subfolders, so no labels: the probe needs "
                         f"one subfolder per class (at least two, at the same depth), e.g. "
                         f"{Path(folder) / 'cat' / '1.png'} and {Path(folder) / 'dog' / '2.png'}.")
    require_label_column(raw, args.label_column, context=f"Probe {which} data, {source}: ")


def align_labels(train, evaluation, label_column: str, sources: tuple[str, str] = ("train", "eval")):
    """``evaluation`` with its label ids renumbered by class name as ``train``'s: image folders number each folder's
    classes alphabetically, so a class missing from one split would shift the ids of every later class."""
    train_names, eval_names = _class_names(train, label_column), _class_names(evaluation, label_column)
    if train_names is None and eval_names is None:
        return evaluation  # plain integer ids on both sides: taken as given
    if train_names is None or eval_names is None:
        named, plain = sources if eval_names is None else sources[::-1]
        raise ValueError(f"`label_column` {label_column!r} holds class names (a ClassLabel) in {named} but plain "
                         f"integer ids in {plain}: the probe cannot tell which id is which class. Give both splits "
                         "named classes (image folders, or the same ClassLabel) or both plain ids.")
    unknown = [name for name in eval_names if name not in train_names]
    if unknown:
        raise ValueError(f"Evaluation class(es) {unknown} of {sources[1]} are not classes of the training data "
                         f"{sources[0]} ({train_names}): the probe cannot predict a class it never trained on.")
    absent = [name for name in train_names if name not in eval_names]
    if absent:
        logger.warning("Training class(es) %s of %s are absent from the evaluation data %s; the other classes are "
                       "matched by name.", absent, sources[0], sources[1])
    if eval_names == train_names:
        return evaluation
    train_ids = {name: index for index, name in enumerate(train_names)}
    renumbered = {index: train_ids[name] for index, name in enumerate(eval_names)}
    labels = [renumbered.get(label, label) for label in evaluation[label_column]]  # -1 (unlabelled) stays -1
    column = f"{label_column} (renumbered)"  # added beside the old column: no rewrite of the images
    aligned = evaluation.add_column(column, labels, feature=train.features[label_column])
    return aligned.remove_columns(label_column).rename_column(column, label_column)


def warn_about_shared_images(train, evaluation, image_column: str | None) -> int:
    """Warn with the count of evaluation images byte-identical to training images, and return it.

    A warning, not an error: real datasets have duplicates across splits. The encoded bytes are hashed, undecoded.
    """
    train_digests = set(image_digests(train, image_column))
    shared = sum(digest in train_digests for digest in image_digests(evaluation, image_column) if digest)
    if shared:
        logger.warning("%d of %d evaluation images (%.1f%%) are byte-identical to training images: the probe's "
                       "scores on them are scores on training images.", shared, len(evaluation),
                       100 * shared / len(evaluation))
    return shared


def image_digests(dataset, image_column: str | None) -> list[bytes | None]:
    """A hash of each row's encoded image (``None`` where there is none), read without decoding."""
    column = find_image_column(list(dataset.column_names), image_column)
    rows = undecoded(dataset, column).select_columns([column])
    return [_digest(value) for batch in rows.iter(batch_size=1024) for value in batch[column]]


def _digest(value) -> bytes | None:
    if isinstance(value, dict):  # datasets.Image(decode=False): the file's bytes, else its path
        value = value.get("bytes") or value.get("path")
    if isinstance(value, str):
        try:
            value = Path(value).read_bytes()
        except OSError:
            return None
    if value is None:
        return None
    encoded = value if isinstance(value, (bytes, bytearray)) else np.asarray(value).tobytes()
    return hashlib.blake2b(encoded, digest_size=16).digest() if encoded else None


def _num_classes(train_raw, eval_raw, label_column: str) -> int:
    """Classes of the label column: its ``ClassLabel`` size, else the largest label + 1 (labels checked)."""
    feature = train_raw.features.get(label_column) if train_raw.features else None
    if getattr(feature, "num_classes", None):
        return feature.num_classes
    labels = list(train_raw[label_column]) + list(eval_raw[label_column])
    wrong = next((label for label in labels if not isinstance(label, int) or label < 0), None)
    if wrong is not None:
        raise ValueError(f"`label_column` {label_column!r} must hold non-negative integer class ids (a ClassLabel or "
                         f"int column), got {wrong!r}.")
    return max(labels) + 1


def format_results(results: list[dict]) -> str:
    """The results as an aligned text table, one line per (protocol, level, metric)."""
    lines = [f"{'protocol':<12}{'level':<8}{'metric':<16}{'value':>8}"]
    for record in results:
        protocol = f"knn k={record['k']}" if record["protocol"] == "knn" else record["protocol"]
        lines.append(f"{protocol:<12}{record['level']!s:<8}{record['metric']:<16}{record['value']:>8.2%}")
    skipped = results[0].get("skipped_images", {}) if results else {}
    if any(skipped.values()):
        counts = ", ".join(f"{count} {split}" for split, count in skipped.items())
        lines.append(f"Skipped undecodable images: {counts} (logged with their files or rows).")
    return "\n".join(lines)


def summarise(results: list[dict], level: Level = LAST) -> dict[str, float]:
    """``{"knn20_top1": ..., "linear_top1": ..., ...}`` of one level, rounded to 4 digits: a line of a table."""
    summary = {}
    for record in (r for r in results if r["level"] == level):
        top = record["metric"].removesuffix("_accuracy")
        key = f"knn{record['k']}_{top}" if record["protocol"] == "knn" else f"linear_{top}"
        summary[key] = round(record["value"], 4)
    return summary
