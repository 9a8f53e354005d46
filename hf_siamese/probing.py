"""Evaluating a frozen encoder: feature extraction, the weighted kNN classifier and linear probes.

* kNN follows Wu et al. (2018) as used by DINO/solo-learn: cosine similarity on L2-normalised features, the top
  ``k`` neighbours vote for their label with weight ``exp(sim / T)``.
* Linear probes train one ``nn.Linear`` per probed level (the final pooled features, or a stage's pooled features
  as in mmselfsup's feature1-5), initialised N(0, 0.01) with zero bias, on features of an encoder that stays in
  eval mode and never changes (:class:`FrozenEncoderCheck` proves it). ``cached``: features extracted once without
  augmentation. ``augmented``: every epoch RandomResizedCrop + flip through the encoder (SimSiam, MoCo v3).
* An undecodable image is skipped, logged once and counted (:class:`SkippedImages`), as in pretraining.
"""

import logging
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from .backbones import pool_stage
from .configuration_siamese import SiameseConfig
from .data import UndecodableImage, find_image_column, open_image, undecoded
from .optim import build_optimizer, build_scheduler, scaled_learning_rate
from .views import EVAL_CROP_PCT, eval_transform, image_mode, linear_probe_transform

logger = logging.getLogger(__name__)

LAST = "last"
Level = int | str  # a 1-based stage index, or LAST for the encoder's pooled output


@dataclass(frozen=True)
class InputSpec:
    """What an encoder expects as input: resolution, channels and the normalisation it was trained with."""

    image_size: int
    num_channels: int
    image_mean: tuple[float, ...] | None = None
    image_std: tuple[float, ...] | None = None

    @classmethod
    def from_model(cls, model, image_processor=None) -> "InputSpec":
        """From an hf_siamese config, else from the checkpoint's image processor (transformers or timm-wrapped)."""
        config = model.config
        if isinstance(config, SiameseConfig):
            return cls(config.image_size, config.num_channels, config.image_mean, config.image_std)
        if image_processor is None:
            raise ValueError(
                f"{type(model).__name__} is not an hf_siamese model, so its input resolution and normalisation come "
                "from its image processor, and the checkpoint has none (no preprocessor_config.json)."
            )
        data_config = getattr(image_processor, "data_config", None)  # timm-wrapped models
        if data_config is not None:
            channels, height, _ = data_config["input_size"]
            return cls(height, channels, tuple(data_config["mean"]), tuple(data_config["std"]))
        size = getattr(image_processor, "crop_size", None) if getattr(image_processor, "do_center_crop", False) else None
        size = size or image_processor.size
        image_size = size.get("height") or size.get("shortest_edge")
        return cls(image_size, getattr(config, "num_channels", 3), tuple(image_processor.image_mean),
                   tuple(image_processor.image_std))

    def eval_transform(self, crop_pct: float = EVAL_CROP_PCT):
        return eval_transform(self.image_size, self.num_channels, self.image_mean, self.image_std, crop_pct)

    def train_transform(self):
        return linear_probe_transform(self.image_size, self.num_channels, self.image_mean, self.image_std)


@dataclass(frozen=True)
class SkippedImage:
    """An image of the probe data that cannot be decoded: its row in the source, its file if it has one, and why."""

    row: int
    path: str | None
    reason: str

    @property
    def where(self) -> str:
        return f"row {self.row}, file {self.path}" if self.path else f"row {self.row}"


class SkippedImages:
    """The undecodable images of one split, each logged and counted once however often an epoch re-reads it."""

    def __init__(self, split: str):
        self.split = split
        self.by_row: dict[int, SkippedImage] = {}

    def add(self, images: Iterable[SkippedImage]) -> None:
        for image in images:
            if image.row not in self.by_row:
                self.by_row[image.row] = image
                logger.warning("Skipping an undecodable %s image (%s): %s", self.split, image.where, image.reason)

    def __len__(self) -> int:
        return len(self.by_row)

    def kept(self, dataset):
        """``dataset`` without the skipped rows, so that its row ``i`` is the ``i``-th extracted feature."""
        if not self.by_row:
            return dataset
        return dataset.select([row for row in range(len(dataset)) if row not in self.by_row])


class LabelledImages(Dataset):
    """``(pixels, label)`` pairs of a map-style dataset; an undecodable image comes back as a :class:`SkippedImage`.

    The bad rows are found by the pass that decodes every image anyway (:func:`collate_decodable` sets them
    aside), not by a filter up front that would decode the whole dataset twice.
    """

    def __init__(self, dataset, transform: Callable, *, num_channels: int, label_column: str = "label",
                 image_column: str | None = None):
        require_label_column(dataset, label_column)
        self.image_column = find_image_column(list(dataset.column_names), image_column)
        self.dataset = undecoded(dataset, self.image_column)
        self.transform = transform
        self.mode = image_mode(num_channels)
        self.label_column = label_column

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int] | SkippedImage:
        row = self.dataset[index]
        value = row[self.image_column]
        try:
            image = open_image(value, self.mode)
        except UndecodableImage as error:
            return SkippedImage(index, _file_of(value), str(error))
        return self.transform(image), int(row[self.label_column])


def _file_of(value) -> str | None:
    """The file an image value comes from, if it says (imagefolder's undecoded dict, a column of paths)."""
    if isinstance(value, dict):
        return value.get("path")
    return value if isinstance(value, str) else None


def collate_decodable(samples: list) -> tuple[torch.Tensor | None, torch.Tensor, list[SkippedImage]]:
    """``(pixels, labels, skipped)`` of a batch of :class:`LabelledImages` samples (``None`` pixels: none decoded)."""
    decoded = [sample for sample in samples if not isinstance(sample, SkippedImage)]
    skipped = [sample for sample in samples if isinstance(sample, SkippedImage)]
    pixels = torch.stack([pixels for pixels, _ in decoded]) if decoded else None
    return pixels, torch.tensor([label for _, label in decoded], dtype=torch.long), skipped


def require_label_column(dataset, label_column: str, context: str = "") -> None:
    """Raise ``ValueError`` naming ``label_column`` and the columns there are, when ``dataset`` lacks it."""
    if label_column not in dataset.column_names:
        raise ValueError(
            f"{context}`label_column` {label_column!r} is not in the dataset; its columns are {dataset.column_names}."
        )


@dataclass
class Features:
    features: torch.Tensor  # [N, D], float32: the encoder's pooled output
    labels: torch.Tensor  # [N], int64
    levels: dict[int, torch.Tensor] | None = None  # level -> [N, C_level], pooled stage features

    def at(self, level: Level) -> torch.Tensor:
        """The features of ``level`` (:data:`LAST` or a stage index)."""
        return self.features if level == LAST else self.levels[level]


PRECISIONS = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast_dtype(mixed_precision: str) -> torch.dtype | None:
    """The autocast dtype of a ``mixed_precision`` value ("no": none)."""
    if mixed_precision not in PRECISIONS:
        raise ValueError(f"`mixed_precision` must be one of {list(PRECISIONS)}, got {mixed_precision!r}.")
    return PRECISIONS[mixed_precision]


def encode(model, pixel_values: torch.Tensor, stages: Iterable[int] = (),
           mixed_precision: str = "no") -> dict[Level, torch.Tensor]:
    """Pooled features ``{LAST: [B, D], stage: [B, C_stage], ...}`` of a batch through an encoder in eval mode.

    ``LAST`` is an hf_siamese or timm-wrapped model's ``pooler_output``; for other transformers models the pooler
    output flattened, or else the class token / spatial mean of ``last_hidden_state``. Stage features need an
    hf_siamese model (its ``hidden_states`` are the backbone stages). ``mixed_precision`` ("bf16", "fp16") runs
    the encoder under autocast; the features come back in float32.
    """
    stages = list(stages)
    dtype = autocast_dtype(mixed_precision)
    with torch.autocast(pixel_values.device.type, dtype=dtype, enabled=dtype is not None):
        output = model(pixel_values, output_hidden_states=True) if stages else model(pixel_values)
    features: dict[Level, torch.Tensor] = {LAST: _pooled_output(output).float()}
    for stage in stages:
        pooled = pool_stage(output.hidden_states[stage - 1], model.backbone, model.config.ladder_vit_pooling)
        features[stage] = pooled.float()
    return features


def _pooled_output(output) -> torch.Tensor:
    pooled = getattr(output, "pooler_output", None)
    if pooled is not None:
        return pooled.flatten(1)
    hidden = output.last_hidden_state
    return hidden.mean(dim=(2, 3)) if hidden.dim() == 4 else hidden[:, 0]


@torch.no_grad()
def extract_features(model, dataset, *, label_column: str = "label", image_column: str | None = None,
                     batch_size: int = 256, num_workers: int = 0, progress: bool = True,
                     levels: list[int] | None = None, transform: Callable | None = None,
                     input_spec: InputSpec | None = None, mixed_precision: str = "no",
                     skipped: SkippedImages | None = None) -> Features:
    """Pooled features of every decodable image of a map-style ``dataset`` through a frozen encoder in eval mode.

    Images go through ``transform``, by default ``input_spec``'s (by default the model's) evaluation transform.
    ``levels`` (1-based stage indices of an hf_siamese model) also collects those stages' pooled features.
    ``mixed_precision``: as in :func:`encode`. Undecodable images are left out and recorded in ``skipped``
    (``skipped.kept(dataset)`` gives the rows of the features).
    """
    spec = input_spec or InputSpec.from_model(model)
    skipped = skipped if skipped is not None else SkippedImages("probe")
    images = LabelledImages(dataset, transform or spec.eval_transform(), num_channels=spec.num_channels,
                            label_column=label_column, image_column=image_column)
    loader = DataLoader(images, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_decodable)
    model.eval()
    device = next(model.parameters()).device
    chunks: dict[Level, list[torch.Tensor]] = {level: [] for level in [LAST, *(levels or [])]}
    labels = []
    for pixels, batch_labels, batch_skipped in tqdm(loader, desc="features", disable=not progress):
        skipped.add(batch_skipped)
        if pixels is None:
            continue
        for level, pooled in encode(model, pixels.to(device), levels or [], mixed_precision).items():
            chunks[level].append(pooled.cpu())
        labels.append(batch_labels)
    if not labels:
        raise ValueError(f"Every image of the {skipped.split} data is undecodable ({len(skipped)} skipped).")
    stacked = {level: torch.cat(parts) for level, parts in chunks.items()}
    last = stacked.pop(LAST)
    return Features(last, torch.cat(labels), stacked if levels else None)


def knn_classify(train: Features, test_features: torch.Tensor, *, k: int = 20, temperature: float = 0.07,
                 num_classes: int | None = None, chunk_size: int = 1024, level: Level = LAST) -> torch.Tensor:
    """Predicted labels of ``test_features`` by weighted kNN over ``train``'s features of ``level``.

    Example:
        >>> bank = Features(torch.tensor([[1.0, 0.0], [0.9, 0.1], [0.0, 1.0]]), torch.tensor([0, 0, 1]))
        >>> knn_classify(bank, torch.tensor([[1.0, 0.05], [0.1, 1.0]]), k=1).tolist()
        [0, 1]
    """
    num_classes = num_classes or int(train.labels.max()) + 1
    similarity, index = nearest_neighbours(train.at(level), test_features, k, chunk_size)
    votes = torch.zeros(len(test_features), num_classes)
    votes.scatter_add_(1, train.labels[index], (similarity / temperature).exp())
    return votes.argmax(dim=1)


def nearest_neighbours(bank: torch.Tensor, queries: torch.Tensor, k: int,
                       chunk_size: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine similarities and indices ``[Q, k]`` of each query's ``k`` nearest ``bank`` rows, nearest first;
    ``chunk_size`` queries at a time, so that the similarity matrix stays small."""
    bank = F.normalize(bank, dim=1)
    k = min(k, len(bank))
    chunks = [(queries @ bank.T).topk(k, dim=1) for queries in F.normalize(queries, dim=1).split(chunk_size)]
    return torch.cat([similarity for similarity, _ in chunks]), torch.cat([index for _, index in chunks])


class ProbeHeads(nn.Module):
    """One linear classifier per probed level, initialised N(0, 0.01) with zero bias (SimSiam, MoCo v3).

    With ``batchnorm`` each head first standardises its features with a BatchNorm without affine parameters
    (MAE, He et al. 2022): still a linear classifier (the frozen statistics fold into the weights), but one
    learning rate then suits every model and level whatever the scale of its features.
    """

    def __init__(self, feature_dims: dict[Level, int], num_classes: int, batchnorm: bool = True,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.heads = nn.ModuleDict({
            str(level): _head(dim, num_classes, batchnorm, generator) for level, dim in feature_dims.items()
        })
        self.levels = list(feature_dims)

    def forward(self, features: dict[Level, torch.Tensor]) -> dict[Level, torch.Tensor]:
        return {level: self.heads[str(level)](features[level]) for level in self.levels}

    def linear(self, level: Level) -> nn.Linear:
        return self.heads[str(level)][-1]


def _head(dim: int, num_classes: int, batchnorm: bool, generator: torch.Generator | None) -> nn.Sequential:
    linear = nn.Linear(dim, num_classes)
    nn.init.normal_(linear.weight, std=0.01, generator=generator)
    nn.init.zeros_(linear.bias)
    return nn.Sequential(nn.BatchNorm1d(dim, affine=False), linear) if batchnorm else nn.Sequential(linear)


@dataclass
class ProbeSchedule:
    """How the linear heads are trained; ``learning_rate`` is per 256 examples (scaled by the batch size)."""

    epochs: int = 90
    batch_size: int = 256
    optimizer: str = "sgd"
    learning_rate: float = 0.1
    momentum: float = 0.9
    weight_decay: float = 0.0
    batchnorm: bool = True
    seed: int = 0


def fit_heads(heads: ProbeHeads, epoch_batches: Callable[[int], Iterator[tuple[dict, torch.Tensor]]],
              steps_per_epoch: int, schedule: ProbeSchedule, progress: bool = True) -> float:
    """Train ``heads`` with the summed cross-entropy of every level; cosine schedule per step. Returns the last loss.

    ``epoch_batches(epoch)`` yields ``(features by level, labels)``.
    """
    learning_rate = scaled_learning_rate(schedule.learning_rate, schedule.batch_size, scale=True)
    optimizer = build_optimizer(heads, schedule.optimizer, learning_rate, schedule.weight_decay,
                                momentum=schedule.momentum)
    scheduler = build_scheduler(optimizer, "cosine", schedule.epochs * steps_per_epoch, 0)
    heads.train()
    loss = torch.tensor(float("nan"))
    bar = tqdm(total=schedule.epochs * steps_per_epoch, desc="linear probe", disable=not progress)
    for epoch in range(schedule.epochs):
        for features, labels in epoch_batches(epoch):
            logits = heads(features)
            loss = sum(F.cross_entropy(level_logits, labels) for level_logits in logits.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
            bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.4f}")
    bar.close()
    heads.eval()
    return loss.item()


def fit_cached_probe(train: Features, levels: list[Level], num_classes: int, schedule: ProbeSchedule,
                     progress: bool = True) -> ProbeHeads:
    """Linear heads trained on features extracted once (the fast protocol)."""
    generator = torch.Generator().manual_seed(schedule.seed)
    heads = ProbeHeads({level: train.at(level).shape[1] for level in levels}, num_classes, schedule.batchnorm,
                       generator)
    count = len(train.labels)
    _check_trainable(count)

    def epoch_batches(epoch: int):
        chunks = list(torch.randperm(count, generator=generator).split(schedule.batch_size))
        if len(chunks) > 1 and len(chunks[-1]) == 1:  # BatchNorm cannot train on one example
            chunks[-2:] = [torch.cat(chunks[-2:])]
        for index in chunks:
            yield {level: train.at(level)[index] for level in levels}, train.labels[index]

    steps = count // schedule.batch_size + (count % schedule.batch_size > 1)
    fit_heads(heads, epoch_batches, max(steps, 1), schedule, progress)
    return heads


def _check_trainable(count: int) -> None:
    if count < 2:
        raise ValueError(f"The linear probe needs at least 2 training examples, got {count}.")


def fit_augmented_probe(model, images: LabelledImages, levels: list[Level], num_classes: int,
                        schedule: ProbeSchedule, num_workers: int = 0, progress: bool = True,
                        mixed_precision: str = "no", skipped: SkippedImages | None = None) -> ProbeHeads:
    """Linear heads trained on freshly augmented views every epoch, through the frozen encoder in eval mode.

    Undecodable images are left out of every batch and recorded once in ``skipped``.
    """
    device = next(model.parameters()).device
    stages = [level for level in levels if level != LAST]
    skipped = skipped if skipped is not None else SkippedImages("probe training")
    model.eval()
    with torch.no_grad():
        features = encode(model, _first_pixels(images).to(device), stages)
    dims = {level: features[level].shape[1] for level in levels}
    generator = torch.Generator().manual_seed(schedule.seed)
    heads = ProbeHeads(dims, num_classes, schedule.batchnorm, generator).to(device)
    _check_trainable(len(images))
    # A last batch of one image would stop BatchNorm in train mode: drop it (one image per epoch).
    loader = DataLoader(images, batch_size=schedule.batch_size, shuffle=True, num_workers=num_workers,
                        generator=generator, drop_last=len(images) % schedule.batch_size == 1,
                        collate_fn=collate_decodable)

    def epoch_batches(epoch: int):
        for pixels, labels, batch_skipped in loader:
            skipped.add(batch_skipped)
            if len(labels) < 2:  # the rest of the batch undecodable: BatchNorm cannot train on one image
                continue
            with torch.no_grad():
                features = encode(model, pixels.to(device), stages, mixed_precision)
            yield {level: features[level] for level in levels}, labels.to(device)

    fit_heads(heads, epoch_batches, len(loader), schedule, progress)
    return heads


def _first_pixels(images: LabelledImages) -> torch.Tensor:
    """The first decoded images, a batch of up to 2: what the heads' input widths are measured on."""
    batches = DataLoader(images, batch_size=2, collate_fn=collate_decodable)
    pixels = next((pixels for pixels, _, _ in batches if pixels is not None), None)
    if pixels is None:
        raise ValueError("Every image of the probe's training data is undecodable.")
    return pixels


@torch.no_grad()
def predict(heads: ProbeHeads, features: Features) -> dict[Level, torch.Tensor]:
    """Logits of every head on ``features`` (CPU)."""
    heads = heads.cpu().eval()
    return heads({level: features.at(level) for level in heads.levels})


class FrozenEncoderCheck:
    """A CPU copy of every weight and buffer (BN statistics included), to prove that probing changed none of them."""

    def __init__(self, model: nn.Module):
        self.snapshot = {name: tensor.detach().to("cpu", copy=True) for name, tensor in model.state_dict().items()}

    def verify(self, model: nn.Module) -> None:
        """Raise ``RuntimeError`` naming the first tensor that differs from the snapshot."""
        current = model.state_dict()
        for name, before in self.snapshot.items():
            if not torch.equal(before, current[name].cpu()):
                raise RuntimeError(f"The encoder changed during probing: {name!r} differs from its value before.")


class OnlineKNN:
    """kNN top-1 of the encoder being trained, measured every ``eval_steps`` (the solo-learn/lightly habit).

    The bank (labelled training images) and the held-out queries are fixed; features are re-extracted each time
    with the evaluation transform, in eval mode, and the encoder's train/eval mode is restored afterwards.
    """

    def __init__(self, bank, queries, *, label_column: str = "label", image_column: str | None = None, k: int = 20,
                 temperature: float = 0.07, batch_size: int = 256):
        for name, dataset in (("training", bank), ("held-out", queries)):
            require_label_column(dataset, label_column, f"The online kNN needs labels in its {name} data: ")
        self.bank, self.queries = bank, queries
        self.extract = dict(label_column=label_column, image_column=image_column, batch_size=batch_size,
                            progress=False)
        # Kept across measurements, so that an undecodable image is logged once per run, not once per measurement.
        self.skipped = {"bank": SkippedImages("online kNN bank"), "queries": SkippedImages("online kNN held-out")}
        self.k, self.temperature = k, temperature

    def measure(self, encoder) -> float:
        was_training = encoder.training
        # fork_rng: creating DataLoader iterators draws from the global generator; training must not notice.
        with torch.random.fork_rng(devices=[]):
            try:
                bank = extract_features(encoder, self.bank, **self.extract, skipped=self.skipped["bank"])
                queries = extract_features(encoder, self.queries, **self.extract, skipped=self.skipped["queries"])
            finally:
                encoder.train(was_training)
        predictions = knn_classify(bank, queries.features, k=self.k, temperature=self.temperature)
        return (predictions == queries.labels).float().mean().item()
