"""Pretraining data: a `datasets` dataset (Hub, local folder, parquet/webdataset files, Fashion-MNIST) ->
decoded images -> multi-view samples -> batches.

Map-style and streaming datasets take one path: both become an ``IterableDataset`` that is shuffled per epoch,
split across processes with ``split_dataset_by_node`` and spread over DataLoader workers by ``datasets``. We
decode images ourselves, so a corrupt one is skipped and counted rather than crashing a run hours in. Each
sample's augmentation draws from its own seed (seed, epoch, rank, worker, position), so that a resumed run
replays exactly the same views whatever the model did with the global random state.
"""

import dataclasses
import io
import logging
import multiprocessing
import random
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, get_worker_info

import datasets
from datasets.distributed import split_dataset_by_node

from .sources import (
    DATASET, FILES, FOLDER, check_image_folder, check_one_source, data_files_builder, resolve_data_files, source_record,
)
from .views import collate_views, image_mode

logger = logging.getLogger(__name__)

IMAGE_COLUMNS = ("image", "img", "jpg", "jpeg", "png", "webp")
FASHION_MNIST = "fashion_mnist"
MAX_SKIP_WARNINGS = 10  # per process; every skip is counted in `skipped_images`


@dataclass
class DataArguments:
    """Where the pretraining images come from."""

    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset id (e.g. ILSVRC/imagenet-1k), or 'fashion_mnist'."}
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset configuration name."})
    split: str = field(default="train", metadata={"help": "Split to pretrain on."})
    train_dir: str | None = field(default=None, metadata={"help": "Local image folder (imagefolder layout)."})
    data_files: str | None = field(
        default=None, metadata={"help": "Local parquet or webdataset .tar files (a glob pattern)."}
    )
    streaming: bool = field(default=False, metadata={"help": "Stream the dataset instead of loading it."})
    image_column: str | None = field(
        default=None, metadata={"help": f"Image column; found automatically among {IMAGE_COLUMNS}."}
    )
    shuffle_buffer_size: int = field(default=10_000, metadata={"help": "Shuffle buffer of a streamed dataset."})
    dataloader_num_workers: int = field(default=0, metadata={"help": "DataLoader worker processes."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Use only the first N examples."})
    eval_split: str | None = field(
        default=None, metadata={"help": "Labelled held-out split of `dataset_name` for the online kNN (eval_steps)."}
    )
    eval_dir: str | None = field(
        default=None, metadata={"help": "Local labelled image folder (class subfolders) for the online kNN."}
    )
    eval_data_files: str | None = field(
        default=None, metadata={"help": "Local labelled held-out parquet/.tar files for the online kNN (a glob)."}
    )
    label_column: str = field(default="label", metadata={"help": "Label column of the online kNN's data."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Online kNN: N held-out images (seeded sample)."})
    knn_bank_size: int = field(
        default=10_000, metadata={"help": "Online kNN: labelled training images in the bank (seeded sample)."}
    )
    knn_bank_split: str | None = field(
        default=None, metadata={"help": "Online kNN: split of `dataset_name` the bank is drawn from (default: "
                                        "`split`); one disjoint from `eval_split` when that is carved from it."}
    )

    def __post_init__(self):
        check_one_source({"dataset_name": self.dataset_name, "train_dir": self.train_dir,
                          "data_files": self.data_files}, "The training data")
        check_one_source({"eval_split": self.eval_split, "eval_dir": self.eval_dir,
                          "eval_data_files": self.eval_data_files}, "The online kNN's held-out data")

    def held_out(self) -> "DataArguments":
        """The arguments that load the labelled held-out data of the online kNN (local paths checked here, where
        the errors can name them as given)."""
        if self.eval_dir:
            check_image_folder(self.eval_dir, "eval_dir")
        if self.eval_data_files:
            resolve_data_files(self.eval_data_files, "eval_data_files")
        if self.eval_data_files or self.eval_dir:
            return DataArguments(data_files=self.eval_data_files, train_dir=self.eval_dir,
                                 image_column=self.image_column)
        if self.eval_split and not self.dataset_name:
            raise ValueError(f"`eval_split` {self.eval_split!r} names a split of `dataset_name`, which is not set "
                             "(the training data is local): give the held-out images as `eval_dir` or "
                             "`eval_data_files`.")
        if self.eval_split:
            return DataArguments(dataset_name=self.dataset_name, dataset_config=self.dataset_config,
                                 split=self.eval_split, streaming=self.streaming, image_column=self.image_column)
        raise ValueError("The online kNN (`eval_steps`) needs held-out labelled data: set `eval_split` (with "
                         "`dataset_name`), `eval_dir` or `eval_data_files`.")

    def source_record(self, dataset) -> dict:
        """What ``dataset`` (loaded from these arguments) is: kind, name or paths, split, rows, streaming."""
        rows = _known_length(dataset)
        if rows is not None and self.max_train_samples is not None:
            rows = min(rows, self.max_train_samples)
        if self.dataset_name:
            return source_record(DATASET, self.dataset_name, split=self.split, config=self.dataset_config,
                                 rows=rows, streaming=self.streaming)
        if self.train_dir:
            return source_record(FOLDER, str(Path(self.train_dir).expanduser().resolve()), rows=rows,
                                 streaming=self.streaming)
        return source_record(FILES, self.data_files, files=resolve_data_files(self.data_files, "data_files"),
                             rows=rows, streaming=self.streaming)


def load_raw_dataset(args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    """The dataset named by ``args``, before any decoding; an empty one is an error naming where it came from."""
    source = f"{args.dataset_name!r} (split {args.split!r})" if args.dataset_name else repr(args.train_dir or args.data_files)
    try:
        dataset = _load(args)
    except ValueError as error:
        if "corresponds to no data" in str(error):  # datasets' words for a split without rows
            raise ValueError(f"The dataset {source} is empty.") from error
        raise
    if isinstance(dataset, datasets.Dataset) and len(dataset) == 0:
        raise ValueError(f"The dataset {source} is empty.")
    if args.max_train_samples is not None:
        if isinstance(dataset, datasets.IterableDataset):
            dataset = dataset.take(args.max_train_samples)
        else:
            dataset = dataset.select(range(min(args.max_train_samples, len(dataset))))
    return dataset


def _load(args: DataArguments) -> datasets.Dataset | datasets.IterableDataset:
    if args.dataset_name == FASHION_MNIST:
        from .fashion_mnist import load_fashion_mnist

        return load_fashion_mnist(args.split)
    if args.dataset_name:
        return datasets.load_dataset(args.dataset_name, args.dataset_config, split=args.split, streaming=args.streaming)
    if args.train_dir:
        folder = check_image_folder(args.train_dir, "train_dir")
        return datasets.load_dataset("imagefolder", data_dir=str(folder), split="train", streaming=args.streaming)
    if args.data_files:
        files = resolve_data_files(args.data_files, "data_files")
        return datasets.load_dataset(data_files_builder(files), data_files={"train": files}, split="train",
                                     streaming=args.streaming)
    raise ValueError("No training data: set `dataset_name`, `train_dir` or `data_files`.")


def load_labelled(args: DataArguments, count: int | None = None, seed: int = 0) -> datasets.Dataset:
    """A seeded random sample of ``count`` examples (all when ``None``) of ``args``'s data, map-style.

    Random rather than the first ``count``: class-sorted corpora (imagefolder, ImageNet) would otherwise give a
    kNN bank of a few classes. A streamed dataset is read through a shuffle buffer only as far as needed and
    materialised, so a bank from a streamed corpus stays cheap.
    """
    dataset = load_raw_dataset(dataclasses.replace(args, max_train_samples=None))
    if isinstance(dataset, datasets.IterableDataset):
        if count is not None:
            dataset = dataset.shuffle(seed=seed, buffer_size=args.shuffle_buffer_size).take(count)
        return datasets.Dataset.from_list(list(dataset), features=dataset.features)
    if count is not None and count < len(dataset):
        dataset = dataset.shuffle(seed=seed).select(range(count))
    return dataset


def find_image_column(column_names: list[str], requested: str | None = None) -> str:
    """The image column: ``requested`` if given, else the first of :data:`IMAGE_COLUMNS` present."""
    if requested is not None:
        if requested not in column_names:
            raise ValueError(f"`image_column` {requested!r} is not in the dataset; its columns are {column_names}.")
        return requested
    for name in IMAGE_COLUMNS:
        if name in column_names:
            return name
    raise ValueError(
        f"No image column found among {column_names}; expected one of {list(IMAGE_COLUMNS)} or set `image_column`."
    )


class UndecodableImage(ValueError):
    """An example's image cannot be turned into pixels; the message says why."""


def decode_image(value, mode: str) -> Image.Image | None:
    """A PIL image in ``mode`` ('RGB' or 'L') from what a dataset holds, or ``None`` when it cannot be decoded."""
    try:
        return open_image(value, mode)
    except UndecodableImage:
        return None


def open_image(value, mode: str) -> Image.Image:
    """A PIL image in ``mode`` from what a dataset holds; :class:`UndecodableImage` saying why when impossible.

    Takes PIL images, ``{"bytes", "path"}`` dicts (``datasets.Image(decode=False)``), raw bytes and arrays.
    Palette, CMYK, RGBA, 16-bit and 1-bit images are converted; nothing is silently left in another mode. Empty
    files, zero-sized images and decompression bombs (PIL's ``MAX_IMAGE_PIXELS`` guard) are undecodable.
    """
    try:
        if isinstance(value, dict):
            value = value.get("bytes") or value.get("path")
            if not value:
                raise UndecodableImage("empty image: no bytes and no path")
        if isinstance(value, (bytes, bytearray)):
            image = Image.open(io.BytesIO(value))
        elif isinstance(value, str):
            image = Image.open(value)
        elif isinstance(value, np.ndarray):
            image = Image.fromarray(value)
        elif isinstance(value, Image.Image):
            image = value
        else:
            raise UndecodableImage(f"not an image: a {type(value).__name__}")
        if image.width == 0 or image.height == 0:
            raise UndecodableImage(f"zero-sized image ({image.width}x{image.height})")
        image.load()
        return _convert(image, mode)
    except UndecodableImage:
        raise
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError, TypeError, Image.DecompressionBombError) as error:
        raise UndecodableImage(f"{type(error).__name__}: {error}") from error


def _convert(image: Image.Image, mode: str) -> Image.Image:
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        # 16-bit/int/float images: rescale to 8 bits instead of PIL's clipping.
        array = np.asarray(image, dtype=np.float64)
        low, high = array.min(), array.max()
        array = (array - low) / (high - low) * 255 if high > low else np.zeros_like(array)
        image = Image.fromarray(array.astype(np.uint8), "L")
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    return image if image.mode == mode else image.convert(mode)


# The bit generator numpy's global functions draw from inside `seeded_randomness`: swapping it in and reseeding it
# costs 2 us, where saving and restoring the global state would copy 624 words twice (75 us per image).
_SAMPLE_BIT_GENERATOR = np.random.MT19937()


@contextmanager
def seeded_randomness(*keys: int):
    """Seed torch's, Python's and numpy's global generators from ``keys`` inside the block, restoring them after.

    torchvision's transforms draw from torch's generator; timm's RandAugment draws its magnitudes from Python's
    ``random`` and its op choice from numpy's.
    """
    seed = int(np.random.SeedSequence([k & 0xFFFFFFFF for k in keys]).generate_state(1)[0])
    python_state, numpy_bit_generator = random.getstate(), np.random.get_bit_generator()
    with torch.random.fork_rng(devices=[]):
        # The CPU generator only (what the transforms draw from): torch.manual_seed would also seed every
        # accelerator's generators, a tenth of a millisecond per image.
        torch.default_generator.manual_seed(seed)
        random.seed(seed)
        np.random.set_bit_generator(_SAMPLE_BIT_GENERATOR)
        np.random.seed(seed)
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_bit_generator(numpy_bit_generator)


class ViewStream(torch.utils.data.IterableDataset):
    """Decodes each example, skips and counts undecodable ones, and turns the rest into views.

    ``skipped`` is shared with the DataLoader's worker processes, so it counts every worker's skips. Each epoch reads
    every image, so skips are counted (and logged) in the first epoch read only: one count per undecodable image.
    """

    def __init__(self, dataset: datasets.IterableDataset, image_column: str, transform: Callable, mode: str,
                 seed: int, rank: int):
        self.dataset = dataset
        self.image_column = image_column
        self.transform = transform
        self.mode = mode
        self.seed = seed
        self.rank = rank
        self.epoch = 0
        self.first_epoch: int | None = None
        self.skipped = multiprocessing.Value("q", 0)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self.first_epoch = epoch if self.first_epoch is None else self.first_epoch
        self.dataset.set_epoch(epoch)

    def __iter__(self) -> Iterator[dict]:
        worker = get_worker_info()
        worker_id = worker.id if worker is not None else 0
        for position, example in enumerate(self.dataset):
            try:
                image = open_image(example[self.image_column], self.mode)
            except UndecodableImage as error:
                if self.epoch == self.first_epoch:
                    self._count_skip(example[self.image_column], position, error)
                continue
            with seeded_randomness(self.seed, self.epoch, self.rank, worker_id, position):
                yield self.transform(image)

    def _count_skip(self, value, position: int, error: UndecodableImage) -> None:
        with self.skipped.get_lock():
            self.skipped.value += 1
            count = self.skipped.value
        if count <= MAX_SKIP_WARNINGS:
            logger.warning("Skipping undecodable image %s: %s%s", image_name(value, position, self.rank), error,
                           " (further skips are only counted)" if count == MAX_SKIP_WARNINGS else "")


def image_name(value, position: int, rank: int = 0) -> str:
    """How a log names an image: its file path where the dataset keeps one, else where the stream met it."""
    path = value.get("path") if isinstance(value, dict) else value if isinstance(value, str) else None
    return repr(path) if path else f"without a file name (example {position} of process {rank}'s shuffled stream)"


class PretrainingData:
    """Endless batches of views for one process, in epochs, resumable at any batch.

    Args:
        dataset: map-style or iterable dataset with an image column.
        transform: image -> its views by argument name (see :class:`~hf_siamese.views.MultiViewTransform`).
        batch_size: per-process batch size; incomplete batches are dropped so that every process steps together.
        pin_memory: pin batches in page-locked memory (for asynchronous copies to a CUDA device).
    """

    def __init__(self, dataset, transform: Callable, *, batch_size: int, num_channels: int, seed: int, rank: int = 0,
                 world_size: int = 1, num_workers: int = 0, shuffle_buffer_size: int = 10_000,
                 image_column: str | None = None, pin_memory: bool = False):
        self.num_examples = _known_length(dataset)
        if isinstance(dataset, datasets.Dataset):
            dataset = dataset.to_iterable_dataset(num_shards=max(world_size * max(num_workers, 1), 1))
        column = find_image_column(_column_names(dataset), image_column)
        dataset = undecoded(dataset, column).shuffle(seed=seed, buffer_size=shuffle_buffer_size)
        dataset = split_dataset_by_node(dataset, rank=rank, world_size=world_size)
        self.batch_size = batch_size
        self.world_size = world_size
        self.stream = ViewStream(dataset, column, transform, image_mode(num_channels), seed, rank)
        self.loader = DataLoader(
            self.stream, batch_size=batch_size, num_workers=num_workers, collate_fn=collate_views,
            drop_last=True, pin_memory=pin_memory,
        )

    @property
    def skipped_images(self) -> int:
        """Undecodable images met so far by this process, each counted once."""
        return self.stream.skipped.value

    @property
    def steps_per_epoch(self) -> int | None:
        """Full batches per process per epoch, when the dataset's size is known."""
        if self.num_examples is None:
            return None
        return self.num_examples // self.world_size // self.batch_size

    def batches(self, start_epoch: int = 0, start_batch: int = 0) -> Iterator[tuple[int, int, dict]]:
        """``(epoch, batch_index, batch)`` forever, starting after ``start_batch`` batches of ``start_epoch``.

        Skipped batches are still produced (decoded and augmented) so that the rest of the epoch is identical
        to an uninterrupted run; the model never sees them.
        """
        epoch = start_epoch
        while True:
            self.stream.set_epoch(epoch)
            produced = 0
            for index, batch in enumerate(self.loader):
                produced += 1
                if epoch == start_epoch and index < start_batch:
                    continue
                yield epoch, index, batch
            if produced == 0:
                raise ValueError(
                    f"The dataset gave no full batch of {self.batch_size} images in epoch {epoch} on this process "
                    "(empty, too small for the batch size, or every image undecodable)."
                )
            epoch += 1


def undecoded(dataset, column: str):
    """``dataset`` with ``column`` left as bytes: we decode ourselves, so that a corrupt image is skipped or named
    by our code instead of raising inside ``datasets``."""
    if isinstance(dataset.features, datasets.Features) and isinstance(dataset.features.get(column), datasets.Image):
        return dataset.cast_column(column, datasets.Image(decode=False))
    return dataset


def _known_length(dataset) -> int | None:
    if isinstance(dataset, datasets.Dataset):
        return len(dataset)
    splits = dataset.info.splits if dataset.info is not None else None
    split = getattr(dataset, "split", None)
    if splits and split is not None and str(split) in splits:
        return splits[str(split)].num_examples or None
    return None


def _column_names(dataset: datasets.IterableDataset) -> list[str]:
    if dataset.column_names is not None:
        return list(dataset.column_names)
    first = next(iter(dataset.take(1)), None)
    if first is None:
        raise ValueError("The dataset is empty.")
    return list(first)


def probe_images(dataset, count: int, num_channels: int, image_column: str | None = None) -> list[Image.Image]:
    """The first ``count`` decodable images, e.g. the fixed probe set of the variance monitor."""
    iterable = dataset.to_iterable_dataset() if isinstance(dataset, datasets.Dataset) else dataset
    column = find_image_column(_column_names(iterable), image_column)
    mode = image_mode(num_channels)
    images = []
    for example in iterable:
        image = decode_image(example[column], mode)
        if image is not None:
            images.append(image)
        if len(images) == count:
            break
    return images
