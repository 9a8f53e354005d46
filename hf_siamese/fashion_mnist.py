"""Fashion-MNIST as a ``datasets.Dataset``: the built-in small real dataset for the demo and the benchmarks.

It is read from the IDX files of Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``),
so that it works offline, and otherwise from the Hub (``zalando-datasets/fashion_mnist``). Either way the rows are
``{"image": 28x28 grayscale PIL image, "label": ClassLabel}``, with the Hub's split names ``"train"`` and ``"test"``.
"""

import gzip
import math
import struct
import zlib
from pathlib import Path

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, ReadInstruction, load_dataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
HUB_ID = "zalando-datasets/fashion_mnist"
LABEL_NAMES = [
    "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
]  # fmt: skip
FEATURES = Features({"image": Image(), "label": ClassLabel(names=LABEL_NAMES)})

_SPLIT_PREFIXES = {"train": "train", "test": "t10k"}
_UINT8 = 0x08  # the IDX dtype code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path: str | Path) -> np.ndarray:
    """The array in an IDX file (gzip-compressed when the name ends with ``.gz``), as a read-only uint8 array."""
    path = Path(path)
    try:
        with (gzip.open if path.suffix == ".gz" else open)(path, "rb") as file:
            data = file.read()
    except (EOFError, gzip.BadGzipFile, zlib.error) as error:
        raise ValueError(f"{path}: corrupt or truncated gzip stream ({error})") from error
    if len(data) < 4 or data[:2] != b"\0\0":
        raise ValueError(f"{path}: not an IDX file (magic {data[:4].hex()!r})")
    if data[2] != _UINT8:
        raise ValueError(f"{path}: unsupported IDX dtype code 0x{data[2]:02x}, only 0x08 (uint8) is supported")
    offset = 4 + 4 * data[3]
    if len(data) < offset:
        raise ValueError(f"{path}: truncated IDX header, expected at least {offset} bytes, found {len(data)}")
    shape = struct.unpack(f">{data[3]}I", data[4:offset])
    expected = offset + math.prod(shape)
    if len(data) != expected:
        raise ValueError(f"{path}: truncated or corrupt IDX file, expected {expected} bytes, found {len(data)}")
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def find_idx_files(directory: str | Path, split: str) -> tuple[Path, Path]:
    """The (images, labels) IDX files of ``split`` ("train" or "test") in ``directory``, raw or gzipped."""
    if split not in _SPLIT_PREFIXES:
        raise ValueError(f"split must be one of {sorted(_SPLIT_PREFIXES)}, got {split!r}")
    directory = Path(directory)
    names = [f"{_SPLIT_PREFIXES[split]}-{kind}" for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")]
    found = [next((p for p in (directory / n, directory / f"{n}.gz") if p.is_file()), None) for n in names]
    if None in found:
        expected = " and ".join(f"{name}[.gz]" for name in names)
        raise FileNotFoundError(f"Fashion-MNIST {split} split not found in {directory}: expected {expected}")
    return found[0], found[1]


def _png_chunk(tag: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))


def _encode_png(images: np.ndarray) -> list[bytes]:
    """Grayscale PNG files of ``images`` (N, H, W) uint8, written directly: PIL's per-image overhead dominates at
    28 x 28."""
    _, height, width = images.shape
    header = b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
    end = _png_chunk(b"IEND", b"")
    rows = np.pad(images, ((0, 0), (0, 0), (1, 0)))  # each scanline starts with filter type 0 (none)
    return [header + _png_chunk(b"IDAT", zlib.compress(image.tobytes())) + end for image in rows]


def png_image_values(images: np.ndarray) -> list[dict]:
    """``images`` (N, H, W) uint8 as the values of a ``datasets.Image`` column, encoded once as PNG."""
    return [{"bytes": png, "path": None} for png in _encode_png(images)]


def load_fashion_mnist(split: str = "train", directory: str | Path | None = None) -> Dataset:
    """Fashion-MNIST ``split`` from the IDX files in ``directory`` (default ``FASHION_MNIST_DIR``), else the Hub.

    ``split`` takes datasets' slice syntax, e.g. ``"train[:50000]"`` and ``"train[50000:]"``: a validation split
    carved from the training images (the benchmarks' ``--validation``).
    """
    directory = FASHION_MNIST_DIR if directory is None else Path(directory)
    instruction = ReadInstruction.from_spec(split)
    name = split.split("[")[0]
    try:
        images_path, labels_path = find_idx_files(directory, name)
    except FileNotFoundError as local_error:
        try:
            return load_dataset(HUB_ID, split=split)
        except Exception as hub_error:
            raise FileNotFoundError(
                f"Fashion-MNIST is not available: {local_error}; and loading {HUB_ID!r} from the Hub failed "
                f"(offline?): {hub_error}. Install the Debian files with `apt-get install dataset-fashion-mnist`."
            ) from hub_error
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(f"{images_path} {images.shape} and {labels_path} {labels.shape} do not match")
    (part,) = instruction.to_absolute({name: len(images)})
    images, labels = images[part.from_:part.to], labels[part.from_:part.to]
    image_column = png_image_values(images)
    return Dataset.from_dict({"image": image_column, "label": labels}, features=FEATURES)
