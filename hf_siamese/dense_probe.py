"""The ``run_dense_probe.py`` job: a pretrained encoder + labelled scenes -> semantic-segmentation mIoU.

Two protocols, both over the encoder as a transformers backbone (:class:`~hf_siamese.SiameseBackbone`):

* ``linear`` (DINOv2's linear segmentation probe): the frozen encoder's maps at one level or several, BatchNorm
  and a 1x1 convolution per level trained on cached features, logits upsampled to the label map and summed. It
  measures what the features hold, at each stage (the Ladder Siamese claim).
* ``upernet``: transformers' ``UperNetForSemanticSegmentation`` with the pretrained backbone, fine-tuned whole for a
  short schedule: what the encoder is worth as a starting point.

Scores (mIoU, per-class IoU, pixel accuracy) come from the shipped ``mean_iou`` metric and go to
``eval_results.json`` and the model card, with a picture of a few evaluation scenes.
"""

import copy
import json
import logging
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from huggingface_hub import hf_hub_download
from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError
from transformers import AutoConfig, UperNetConfig, UperNetForSemanticSegmentation

import datasets

from .configuration_siamese import stages_after_stem
from .eval_results import results_dir, write_eval_results
from .metrics import load_metric
from .modeling_backbone import SiameseBackbone, load_backbone_weights, load_pretrained_backbone
from .pictures import write_dense_examples
from .scenes import make_scenes, scene_id2label
from .views import channel_stats

logger = logging.getLogger(__name__)

PROTOCOLS = ("linear", "upernet")
DEFAULT_LEARNING_RATES = {"linear": 3e-2, "upernet": 1e-3}  # the validation grid's best (docs/benchmarks.md)
SCENES = "fashion_mnist_scenes"  # generated here, seeded: training scenes from training images only
IGNORE_INDEX = 255
MULTI = "multi"


@dataclass
class DenseProbeArguments:
    """What to probe, on which scenes, and how; names follow ``run_linear_probe.py`` where they overlap."""

    model_name_or_path: str = field(metadata={"help": "An hf_siamese model directory (pretraining output or encoder)."})
    dataset_name: str = field(
        default=SCENES, metadata={"help": f"'{SCENES}' (generated, seeded) or a dataset with `image` and "
                                          "`annotation` (label map) columns: a local folder or Hub id."}
    )
    train_split: str = field(
        default="train", metadata={"help": f"Split the probe is trained on ({SCENES}: the Fashion-MNIST split its "
                                           "items come from, or a window of it such as 'train[:50000]')."}
    )
    eval_split: str = field(
        default="test", metadata={"help": "Split the probe is evaluated on (e.g. 'train[50000:]' to validate)."}
    )
    num_train_scenes: int = field(default=2000, metadata={"help": f"{SCENES}: training scenes (training images)."})
    num_eval_scenes: int = field(default=1000, metadata={"help": f"{SCENES}: evaluation scenes (test images)."})
    scenes_seed: int = field(default=0, metadata={"help": f"{SCENES}: the seed of the scenes (not of the probe)."})
    scene_size: int = field(default=64, metadata={"help": f"{SCENES}: canvas side in pixels."})
    protocol: str = field(default="linear", metadata={"help": "linear (frozen encoder) | upernet (fine-tuned)."})
    probe_levels: str = field(
        default="last", metadata={"help": "linear: 'last', a stage index, several ('2,3,4'), or 'multi' (every "
                                          "stage after the stem), their logits summed."}
    )
    num_train_epochs: int = field(default=20, metadata={"help": "Epochs over the training scenes."})
    per_device_train_batch_size: int = field(default=64, metadata={"help": "Training batch size."})
    learning_rate: float | None = field(
        default=None, metadata={"help": "AdamW learning rate (default: the protocol's, chosen on validation scenes: "
                                        "linear 3e-2, upernet 1e-3)."}
    )
    weight_decay: float = field(default=1e-4, metadata={"help": "AdamW weight decay."})
    upernet_hidden_size: int = field(default=128, metadata={"help": "upernet: the decode head's width."})
    seed: int = field(default=0, metadata={"help": "Seed of the head's init and the batch order."})
    output_dir: str | None = field(
        default=None, metadata={"help": "Where eval_results.json goes (default: the model directory if local)."}
    )
    pictures: bool = field(default=True, metadata={"help": "Draw evaluation scenes, truth and prediction."})

    def __post_init__(self):
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"`protocol` must be one of {PROTOCOLS}, got {self.protocol!r}.")
        if self.learning_rate is None:
            self.learning_rate = DEFAULT_LEARNING_RATES[self.protocol]
        for name in ("num_train_epochs", "per_device_train_batch_size", "num_train_scenes", "num_eval_scenes"):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be at least 1, got {getattr(self, name)}.")


@dataclass
class Scenes:
    """Scenes as tensors: normalised pixels ``[N, C, H, W]`` and label maps ``[N, H, W]`` (255: ignored)."""

    pixels: torch.Tensor
    labels: torch.Tensor
    images: list  # the PIL images, for the pictures


def load_scene_splits(args: DenseProbeArguments) -> tuple[datasets.Dataset, datasets.Dataset]:
    """The training and evaluation scenes; refused when they share images (two overlapping windows of a split)."""
    _refuse_overlapping_windows(args.train_split, args.eval_split)
    if args.dataset_name == SCENES:
        return (make_scenes(args.train_split, args.num_train_scenes, args.scenes_seed, args.scene_size),
                make_scenes(args.eval_split, args.num_eval_scenes, args.scenes_seed, args.scene_size))
    train, evaluation = (datasets.load_dataset(args.dataset_name, split=split)
                         for split in (args.train_split, args.eval_split))
    for split, dataset in (("train", train), ("eval", evaluation)):
        missing = {"image", "annotation"} - set(dataset.column_names)
        if missing:
            raise ValueError(f"The {split} split of {args.dataset_name!r} lacks the column(s) {sorted(missing)}; a "
                             f"dense probe needs `image` and `annotation` (a label map); it has {dataset.column_names}.")
    return train, evaluation


def _refuse_overlapping_windows(train_split: str, eval_split: str) -> None:
    """Windows of one split in datasets' slice syntax (``train[:50000]``, ``train[80%:]``) must not overlap."""
    windows = [re.fullmatch(r"([\w.-]+)(?:\[(\d*)(%?):(\d*)(%?)\])?", split) for split in (train_split, eval_split)]
    if not all(windows) or windows[0][1] != windows[1][1]:
        return  # two splits, or a slice this check does not read (negative indices): datasets reads it
    units = {window[3] or window[5] for window in windows if window[2] or window[4]}
    if len(units) > 1:
        return  # a percentage window against an absolute one: not comparable without the split's size
    (train_start, train_stop), (eval_start, eval_stop) = (
        (int(window[2] or 0), int(window[4]) if window[4] else float("inf")) for window in windows)
    if max(train_start, eval_start) < min(train_stop, eval_stop):
        raise ValueError(f"train_split {train_split!r} and eval_split {eval_split!r} share images: the probe would be "
                         f"evaluated on scenes it was trained on. Give disjoint windows, e.g. "
                         f"'{windows[0][1]}[:50000]' and '{windows[0][1]}[50000:]'.")


def dataset_id2label(dataset_name: str, *label_maps: torch.Tensor) -> dict[int, str]:
    """The class names of a dataset with label maps: its ``id2label.json`` (beside the data, as ``save_scenes`` and
    transformers' segmentation examples keep it), else the labels seen in any split numbered (``IGNORE_INDEX`` is no
    class)."""
    names = _id2label_file(dataset_name)
    if names is not None:
        return {int(index): name for index, name in names.items()}
    seen = max((int(maps[maps != IGNORE_INDEX].max()) for maps in label_maps if (maps != IGNORE_INDEX).any()),
               default=0)
    logger.info("%s has no id2label.json: classes 0..%d named by their numbers", dataset_name, seen)
    return {index: str(index) for index in range(seen + 1)}


def _id2label_file(dataset_name: str) -> dict | None:
    local = Path(dataset_name) / "id2label.json"
    if local.is_file():
        return json.loads(local.read_text())
    if Path(dataset_name).exists():
        return None
    try:
        return json.loads(Path(hf_hub_download(dataset_name, "id2label.json", repo_type="dataset")).read_text())
    except (EntryNotFoundError, LocalEntryNotFoundError, RepositoryNotFoundError):
        return None


def _refuse_unknown_labels(scenes: Scenes, split: str, id2label: dict[int, str]) -> None:
    unknown = sorted(set(scenes.labels.unique().tolist()) - set(id2label) - {IGNORE_INDEX})
    if unknown:
        raise ValueError(f"The {split} label maps hold label(s) {unknown[:10]} that id2label ({len(id2label)} "
                         f"classes) does not name; {IGNORE_INDEX} marks pixels to ignore.")


def scene_tensors(dataset: datasets.Dataset, config, split: str) -> Scenes:
    """The encoder's input for each scene (its channels and normalisation) and the label maps."""
    mean, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    mode = "L" if config.num_channels == 1 else "RGB"
    images = list(dataset["image"])
    _refuse_other_sizes(images, dataset["annotation"], split)
    array = np.stack([np.asarray(image.convert(mode)) for image in images]).reshape(len(images), *images[0].size[::-1], -1)
    # Plain NCHW strides: a permuted view with one channel passes as contiguous, and a CPU convolution's backward
    # crashed on its strides (torch 2.14, UperNet).
    pixels = torch.from_numpy(array).permute(0, 3, 1, 2).clone(memory_format=torch.contiguous_format).float() / 255
    pixels = (pixels - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1)
    labels = torch.from_numpy(np.stack([np.asarray(label_map) for label_map in dataset["annotation"]])).long()
    return Scenes(pixels, labels, images)


def _refuse_other_sizes(images: list, label_maps: list, split: str) -> None:
    """Scenes are fed at their own size, in batches: one size for every image and label map of a split."""
    size = images[0].size
    for index, (image, label_map) in enumerate(zip(images, label_maps)):
        for what, item in (("image", image), ("annotation", label_map)):
            if item.size != size:
                raise ValueError(f"The {split} {what} of row {index} is {item.size[0]}x{item.size[1]}, the first image "
                                 f"{size[0]}x{size[1]}: the dense probe takes one size per split. Resize the images "
                                 "(label maps with nearest-neighbour) to one size first.")


def stage_names(spec: str, backbone_stages: list[str]) -> list[str]:
    """``probe_levels`` as backbone stage names: 'last', 'multi' (all after the stem) or 1-based stage indices."""
    stages = stages_after_stem(backbone_stages)
    if spec == "last":
        return stages[-1:]
    if spec == MULTI:
        return stages
    try:
        indices = [int(part) for part in spec.split(",")]
    except ValueError:
        raise ValueError(f"`probe_levels` must be 'last', '{MULTI}' or stage indices like '2,3,4', got {spec!r}.") from None
    if not all(1 <= index <= len(stages) for index in indices):
        raise ValueError(f"`probe_levels` {spec!r}: this encoder's stages are 1..{len(stages)} ({stages}).")
    return [stages[index - 1] for index in indices]


class LinearSegmentationHead(nn.Module):
    """BatchNorm and a 1x1 convolution over the maps of the probed levels, as if upsampled to the finest and
    concatenated (DINOv2's linear probe; BatchNorm makes the levels' scales comparable).

    Each level is normalised and classified at its own resolution and the logits are upsampled and summed: the
    same linear map (upsampling and a 1x1 convolution commute), without the concatenated full-resolution features.
    """

    def __init__(self, channels: list[int], num_labels: int):
        super().__init__()
        self.norms = nn.ModuleList(nn.BatchNorm2d(width) for width in channels)
        self.classifiers = nn.ModuleList(nn.Conv2d(width, num_labels, kernel_size=1) for width in channels)
        for classifier in self.classifiers:
            nn.init.normal_(classifier.weight, std=0.01)
            nn.init.zeros_(classifier.bias)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        size = max((stage_map.shape[-2:] for stage_map in maps), key=lambda shape: shape[0] * shape[1])
        logits = [classifier(norm(stage_map.float()))
                  for stage_map, norm, classifier in zip(maps, self.norms, self.classifiers)]
        return sum(level if level.shape[-2:] == size else upsampled(level, size) for level in logits)


def segmentation_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of logits upsampled to the label map (ignored pixels: 255)."""
    return F.cross_entropy(upsampled(logits, labels.shape[-2:]), labels, ignore_index=IGNORE_INDEX)


def upsampled(logits: torch.Tensor, size) -> torch.Tensor:
    return F.interpolate(logits, size=size, mode="bilinear", align_corners=False)


@torch.no_grad()
def cached_maps(backbone: SiameseBackbone, pixels: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    """The frozen encoder's maps of every scene at the backbone's ``out_features``, one tensor per level (bf16:
    the cache of several levels at full resolution is large, and BatchNorm follows)."""
    backbone.eval()
    parts = [backbone(pixels[start:start + batch_size]).feature_maps for start in range(0, len(pixels), batch_size)]
    return [torch.cat([batch[level] for batch in parts]).to(torch.bfloat16) for level in range(len(parts[0]))]


def fit_linear_head(maps: list[torch.Tensor], labels: torch.Tensor, num_labels: int,
                    args: DenseProbeArguments) -> LinearSegmentationHead:
    """The linear head trained on cached maps."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)
        head = LinearSegmentationHead([stage_map.shape[1] for stage_map in maps], num_labels)
    head.train()
    fit(head, lambda batch: segmentation_loss(head([stage_map[batch] for stage_map in maps]), labels[batch]),
        len(labels), args)
    return head.eval()


def fit(model: nn.Module, batch_loss: Callable[[torch.Tensor], torch.Tensor], count: int,
        args: DenseProbeArguments) -> None:
    """AdamW with a cosine schedule over ``num_train_epochs`` of seeded random batches of ``count`` examples;
    ``batch_loss`` takes a batch's indices."""
    generator = torch.Generator().manual_seed(args.seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate, weight_decay=args.weight_decay)
    batch_size = args.per_device_train_batch_size
    steps_per_epoch = max(count // batch_size, 1)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.num_train_epochs * steps_per_epoch)
    for _ in range(args.num_train_epochs):
        order = torch.randperm(count, generator=generator)
        for step in range(steps_per_epoch):
            loss = batch_loss(order[step * batch_size:(step + 1) * batch_size])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            schedule.step()


@torch.no_grad()
def predict_linear(head: LinearSegmentationHead, maps: list[torch.Tensor], size, batch_size: int) -> torch.Tensor:
    """Predicted label maps ``[N, H, W]`` at the label maps' ``size``."""
    count = len(maps[0])
    return torch.cat([upsampled(head([stage_map[start:start + batch_size] for stage_map in maps]), size).argmax(1)
                      for start in range(0, count, batch_size)])


def linear_protocol(args: DenseProbeArguments, config, train: Scenes, evaluation: Scenes,
                    num_labels: int) -> torch.Tensor:
    """The frozen encoder's levels, a linear head on them; the evaluation predictions."""
    levels = stage_names(args.probe_levels, config.stage_names)
    backbone = load_pretrained_backbone(args.model_name_or_path, out_features=levels)
    batch = args.per_device_train_batch_size
    head = fit_linear_head(cached_maps(backbone, train.pixels, batch), train.labels, num_labels, args)
    return predict_linear(head, cached_maps(backbone, evaluation.pixels, batch), evaluation.labels.shape[-2:], batch)


def upernet_for(model_name_or_path: str, config, num_labels: int, hidden_size: int) -> UperNetForSemanticSegmentation:
    """transformers' UperNet over the encoder's last four stages, the backbone's weights the pretrained encoder's;
    the auxiliary head as transformers builds it (on the third map, 256 wide)."""
    backbone_config = copy.deepcopy(config)
    backbone_config.out_features = stage_names(MULTI, config.stage_names)[-4:]  # out_indices follow
    head = UperNetForSemanticSegmentation(UperNetConfig(
        backbone_config=backbone_config, num_labels=num_labels, hidden_size=hidden_size,
        auxiliary_in_channels=None,  # None: the width of the backbone's third map
        loss_ignore_index=IGNORE_INDEX,
    ))
    load_backbone_weights(head, model_name_or_path)
    return head


def upernet_protocol(args: DenseProbeArguments, config, train: Scenes, evaluation: Scenes,
                     num_labels: int) -> torch.Tensor:
    """UperNet fine-tuned whole (backbone included); the evaluation predictions."""
    model = upernet_for(args.model_name_or_path, config, num_labels, args.upernet_hidden_size)
    model.train()
    fit(model, lambda batch: model(pixel_values=train.pixels[batch], labels=train.labels[batch]).loss,
        len(train.labels), args)
    model.eval()
    batch_size = args.per_device_train_batch_size
    with torch.no_grad():
        return torch.cat([model(pixel_values=evaluation.pixels[start:start + batch_size]).logits.argmax(1)
                          for start in range(0, len(evaluation.labels), batch_size)])


def score(predictions: torch.Tensor, labels: torch.Tensor, id2label: dict[int, str]) -> dict:
    """mIoU over every class (background included), per-class IoU and pixel accuracy, as fractions."""
    scores = load_metric("mean_iou").compute(predictions=list(predictions.numpy()), references=list(labels.numpy()),
                                             num_labels=len(id2label), ignore_index=IGNORE_INDEX)
    per_class = {id2label[index]: None if np.isnan(value) else float(value)
                 for index, value in enumerate(scores["per_category_iou"])}
    return {"miou": float(scores["mean_iou"]), "pixel_accuracy": float(scores["overall_accuracy"]),
            "per_class_iou": per_class}


def run_dense_probe(args: DenseProbeArguments) -> list[dict]:
    """Probe ``args.model_name_or_path`` on scenes; returns the records (also in ``eval_results.json``)."""
    output_dir = results_dir(args.model_name_or_path, args.output_dir, "outputs/dense_probe")
    started = time.perf_counter()
    train_split, eval_split = load_scene_splits(args)
    config = AutoConfig.from_pretrained(args.model_name_or_path)
    train, evaluation = scene_tensors(train_split, config, "train"), scene_tensors(eval_split, config, "eval")
    id2label = (scene_id2label() if args.dataset_name == SCENES
                else dataset_id2label(args.dataset_name, train.labels, evaluation.labels))
    for split, scenes in (("train", train), ("eval", evaluation)):
        _refuse_unknown_labels(scenes, split, id2label)
    protocol = linear_protocol if args.protocol == "linear" else upernet_protocol
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(args.seed)  # the heads' initialisation and any dropout or drop-path
        predictions = protocol(args, config, train, evaluation, len(id2label))
    scores = score(predictions, evaluation.labels, id2label)
    level = args.probe_levels if args.protocol == "linear" else MULTI
    seconds = round(time.perf_counter() - started, 1)
    common = {"protocol": f"dense_{args.protocol}", "level": level, "dataset": args.dataset_name,
              "split": args.eval_split, "num_train": len(train.labels), "num_eval": len(evaluation.labels),
              "epochs": args.num_train_epochs, "learning_rate": args.learning_rate, "seconds": seconds}
    results = [{"metric": "mean_iou", "value": scores["miou"], "per_class_iou": scores["per_class_iou"], **common},
               {"metric": "pixel_accuracy", "value": scores["pixel_accuracy"], **common}]
    pictures = None
    if args.pictures:
        pictures = write_dense_examples(output_dir, evaluation.images[:4], evaluation.labels[:4], predictions[:4],
                                        id2label, title=f"{args.protocol} probe, level {level}")
    write_eval_results(args.model_name_or_path, output_dir, results, {"dense_pictures": pictures})
    logger.info("Dense probe (%s, level %s): mIoU %.2f%%, pixel accuracy %.2f%% in %.0f s", args.protocol, level,
                100 * scores["miou"], 100 * scores["pixel_accuracy"], seconds)
    return results


def format_dense_results(results: list[dict]) -> str:
    """The records as a short text table."""
    lines = [f"{'protocol':<16}{'level':<8}{'metric':<16}{'value':>8}"]
    lines += [f"{r['protocol']:<16}{r['level']!s:<8}{r['metric']:<16}{r['value']:>8.2%}" for r in results]
    return "\n".join(lines)
