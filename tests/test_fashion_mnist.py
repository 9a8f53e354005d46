import gzip
import struct
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from PIL import Image

from hf_siamese import fashion_mnist
from hf_siamese.fashion_mnist import (
    FASHION_MNIST_DIR,
    LABEL_NAMES,
    find_idx_files,
    load_fashion_mnist,
    read_idx,
)

REPO = Path(__file__).resolve().parents[1]
TRAIN_LABELS = np.array([9, 0, 3, 7, 1, 5], dtype=np.uint8)


def idx_bytes(array: np.ndarray, dtype_code: int = 0x08) -> bytes:
    return bytes([0, 0, dtype_code, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape) + array.tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
    data = idx_bytes(array)
    path.write_bytes(gzip.compress(data) if path.suffix == ".gz" else data)
    return path


def tiny_images(count: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (count, 28, 28), dtype=np.uint8)


@pytest.fixture(params=["raw", "gz"])
def idx_dir(request, tmp_path) -> Path:
    """6 train and 4 test examples as IDX files, raw or gzipped."""
    suffix = ".gz" if request.param == "gz" else ""
    write_idx(tmp_path / f"train-images-idx3-ubyte{suffix}", tiny_images(6))
    write_idx(tmp_path / f"train-labels-idx1-ubyte{suffix}", TRAIN_LABELS)
    write_idx(tmp_path / f"t10k-images-idx3-ubyte{suffix}", tiny_images(4, seed=1))
    write_idx(tmp_path / f"t10k-labels-idx1-ubyte{suffix}", np.arange(4, dtype=np.uint8))
    return tmp_path


def test_read_idx(idx_dir):
    images_path, labels_path = find_idx_files(idx_dir, "train")
    images, labels = read_idx(images_path), read_idx(labels_path)
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images, tiny_images(6))
    np.testing.assert_array_equal(labels, TRAIN_LABELS)


def test_find_idx_files_both_namings(idx_dir):
    suffix = ".gz" if next(idx_dir.glob("*.gz"), None) else ""
    assert find_idx_files(idx_dir, "train") == (
        idx_dir / f"train-images-idx3-ubyte{suffix}",
        idx_dir / f"train-labels-idx1-ubyte{suffix}",
    )
    assert find_idx_files(str(idx_dir), "test")[0] == idx_dir / f"t10k-images-idx3-ubyte{suffix}"


def test_missing_files_name_the_directory(tmp_path):
    write_idx(tmp_path / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte") as error:
        find_idx_files(tmp_path, "test")
    assert str(tmp_path) in str(error.value)
    with pytest.raises(ValueError, match="split"):
        find_idx_files(tmp_path, "validation")


def test_no_local_files_and_no_hub(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(fashion_mnist, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist") as error:
        load_fashion_mnist("train", tmp_path)
    assert str(tmp_path) in str(error.value) and fashion_mnist.HUB_ID in str(error.value)


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_truncated_file(tmp_path, suffix):
    data = idx_bytes(tiny_images(2))[:-100]
    path = tmp_path / f"train-images-idx3-ubyte{suffix}"
    path.write_bytes(gzip.compress(data) if suffix else data)
    with pytest.raises(ValueError, match=f"{path.name}.*expected {16 + 2 * 28 * 28} bytes, found {len(data)}"):
        read_idx(path)
    path.write_bytes(gzip.compress(idx_bytes(tiny_images(2)))[:-20] if suffix else data[:10])
    with pytest.raises(ValueError, match=path.name):
        read_idx(path)


def test_unsupported_dtype(tmp_path):
    path = tmp_path / "floats-idx1-ubyte"
    path.write_bytes(idx_bytes(np.zeros(3, dtype=">f4"), dtype_code=0x0D))
    with pytest.raises(ValueError, match=f"{path.name}.*0x0d"):
        read_idx(path)


def test_load_fashion_mnist(idx_dir):
    dataset = load_fashion_mnist("train", directory=idx_dir)
    assert dataset.num_rows == 6
    assert dataset.features["label"].names == LABEL_NAMES
    for row, image, label in zip(dataset, tiny_images(6), TRAIN_LABELS):
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "L" and row["image"].size == (28, 28)
        np.testing.assert_array_equal(np.asarray(row["image"]), image)
        assert row["label"] == label
    assert dataset.features["label"].int2str(dataset[0]["label"]) == "Ankle boot"
    assert load_fashion_mnist("test", directory=idx_dir).num_rows == 4


def run_script(output_dir: Path, source_dir: Path, num_shards: int) -> str:
    command = [sys.executable, str(REPO / "scripts" / "prepare_fashion_mnist.py"), "--output_dir", str(output_dir),
               "--source_dir", str(source_dir), "--num_shards", str(num_shards)]  # fmt: skip
    return subprocess.run(command, cwd=REPO, check=True, capture_output=True, text=True).stdout


def test_prepare_script(tmp_path):
    source = tmp_path / "idx"
    source.mkdir()
    write_idx(source / "train-images-idx3-ubyte.gz", tiny_images(6))
    write_idx(source / "train-labels-idx1-ubyte.gz", TRAIN_LABELS)
    write_idx(source / "t10k-images-idx3-ubyte", tiny_images(4, seed=1))
    write_idx(source / "t10k-labels-idx1-ubyte", np.arange(4, dtype=np.uint8))
    out = tmp_path / "parquet"
    out.mkdir()
    for name in ("train-00000-of-00002.parquet", "train-00002-of-00003.parquet", "notes.txt"):
        (out / name).write_text("from an earlier run")  # overwritten, removed (another shard count), kept
    stdout = run_script(out, source, num_shards=2)
    names = sorted(path.name for path in out.iterdir())
    assert names == ["notes.txt"] + [f"{split}-0000{i}-of-00002.parquet" for split in ("test", "train") for i in (0, 1)]
    assert stdout.count("wrote ") == 4 and stdout.count("removed stale ") == 1 and "10 rows" in stdout

    train = datasets.load_dataset(
        "parquet", data_files={"train": str(out / "train-*.parquet")}, split="train", streaming=True
    )
    rows = list(train)
    assert len(rows) == 6
    for row, image, label in zip(rows, tiny_images(6), TRAIN_LABELS):
        assert isinstance(row["image"], Image.Image) and row["image"].mode == "L"
        np.testing.assert_array_equal(np.asarray(row["image"]), image)
        assert row["label"] == label


@pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent: install the Debian package with `apt-get install dataset-fashion-mnist`",
)
def test_real_fashion_mnist():
    train, test = load_fashion_mnist("train"), load_fashion_mnist("test")
    assert (train.num_rows, test.num_rows) == (60000, 10000)
    image = train[0]["image"]
    assert image.mode == "L" and image.size == (28, 28)
    assert sorted(set(test["label"])) == list(range(10))
