"""Fashion-MNIST scenes: labels follow the pasted pixels, later items occlude earlier ones, boxes are the visible
pixels, train and test scenes share no item image, and a seed gives the same bytes."""

import json
import time

import numpy as np
import pytest
from datasets import load_dataset
from PIL import Image

from hf_siamese import fashion_mnist
from hf_siamese.fashion_mnist import FASHION_MNIST_DIR, LABEL_NAMES
from hf_siamese.scenes import (
    ITEM_THRESHOLD,
    SceneLayouts,
    compose,
    make_scenes,
    resize_items,
    save_scenes,
    scene_id2label,
    scene_rows,
    split_arrays,
)

needs_fashion_mnist = pytest.mark.skipif(
    not FASHION_MNIST_DIR.is_dir(),
    reason=f"{FASHION_MNIST_DIR} absent: install the Debian package with `apt-get install dataset-fashion-mnist`",
)


def layouts(*items: tuple[int, int, int, int]) -> SceneLayouts:
    """One scene holding ``(source, side, top, left)`` items in paste order."""
    sources, sides, tops, lefts = (np.array([column]) for column in zip(*items))
    return SceneLayouts(np.array([len(items)]), sources, sides, tops, lefts)


def recompose(row: dict, images: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The scene's image, label map and owner map, one item after another from the recorded ``items``."""
    canvas, label_map = np.zeros((size, size), np.uint8), np.zeros((size, size), np.uint8)
    owner = np.full((size, size), -1)
    fields = (row["items"][name] for name in ("source_index", "category", "top", "left", "side"))
    for slot, (source, category, top, left, side) in enumerate(zip(*fields)):
        item = resize_items(images[source][None], side)[0]
        shown = item > ITEM_THRESHOLD
        window = np.s_[top:top + side, left:left + side]
        canvas[window][shown] = item[shown]
        label_map[window][shown] = category + 1
        owner[window][shown] = slot
    return canvas, label_map, owner


def box_of(mask: np.ndarray) -> list[float]:
    rows, columns = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    return [columns[0], rows[0], columns[-1] - columns[0] + 1, rows[-1] - rows[0] + 1]


@pytest.fixture(scope="module")
def train_arrays():
    return split_arrays("train")


@pytest.fixture(scope="module")
def train_scenes():
    return make_scenes("train", 64, seed=0)


def test_later_items_occlude_only_where_their_pixels_are_above_the_threshold():
    square = np.full((4, 4), 200, np.uint8)
    ring = np.full((4, 4), 100, np.uint8)
    ring[1:3, 1:3] = ITEM_THRESHOLD  # at the threshold: the ring's hole shows what lies under it
    images, labels = np.stack([square, ring]), np.array([3, 5])
    scene = layouts((0, 4, 0, 0), (1, 4, 1, 1))
    composed = compose(scene, images, labels, size=6, threshold=ITEM_THRESHOLD)
    expected_labels, expected_image = np.zeros((6, 6), np.uint8), np.zeros((6, 6), np.uint8)
    for window, label, value in ((np.s_[0:4, 0:4], 3 + 1, 200), (np.s_[1:5, 1:5], 5 + 1, 100),
                                 (np.s_[2:4, 2:4], 3 + 1, 200)):
        expected_labels[window], expected_image[window] = label, value
    np.testing.assert_array_equal(composed.label_maps[0], expected_labels)
    np.testing.assert_array_equal(composed.images[0], expected_image)
    objects = scene_rows(scene, composed, labels)["objects"][0]
    assert objects == {"bbox": [[0, 0, 4, 4], [1, 1, 4, 4]], "category": [3, 5], "area": [16 - 5, 16 - 4]}


def test_a_fully_hidden_item_keeps_its_record_but_has_no_object():
    images, labels = np.full((2, 4, 4), 200, np.uint8), np.array([1, 8])
    scene = layouts((0, 2, 1, 1), (1, 4, 0, 0))
    rows = scene_rows(scene, compose(scene, images, labels, size=4, threshold=ITEM_THRESHOLD), labels)
    assert rows["items"][0]["source_index"] == [0, 1]
    assert rows["objects"][0] == {"bbox": [[0, 0, 4, 4]], "category": [8], "area": [16]}


@needs_fashion_mnist
def test_resize_is_pils_antialiased_bilinear(train_arrays):
    images = train_arrays[0][:50]
    for side in (20, 28, 40):
        pil = np.stack([np.asarray(Image.fromarray(image.astype(np.float32)).resize((side, side), Image.BILINEAR))
                        for image in images])
        assert np.abs(resize_items(images, side).astype(np.float32) - np.clip(np.rint(pil), 0, 255)).max() <= 1


@needs_fashion_mnist
def test_scene_recomposes_from_its_recorded_items(train_scenes, train_arrays):
    images, labels = train_arrays
    for row in train_scenes.select(range(8)):
        canvas, label_map, owner = recompose(row, images, size=64)
        assert row["items"]["category"] == labels[row["items"]["source_index"]].tolist()
        np.testing.assert_array_equal(np.asarray(row["image"]), canvas)
        np.testing.assert_array_equal(np.asarray(row["annotation"]), label_map)
        visible = [slot for slot in range(len(row["items"]["side"])) if (owner == slot).any()]
        assert row["objects"]["bbox"] == [box_of(owner == slot) for slot in visible]
        assert row["objects"]["area"] == [int((owner == slot).sum()) for slot in visible]
        assert row["objects"]["category"] == [row["items"]["category"][slot] for slot in visible]


@needs_fashion_mnist
def test_a_pixel_is_labelled_exactly_where_an_item_pixel_above_the_threshold_was_pasted(train_scenes):
    images = np.stack([np.asarray(image) for image in train_scenes["image"]])
    label_maps = np.stack([np.asarray(annotation) for annotation in train_scenes["annotation"]])
    np.testing.assert_array_equal(label_maps > 0, images > ITEM_THRESHOLD)
    assert label_maps.max() <= len(LABEL_NAMES) and images.shape == (64, 64, 64)
    counts = [len(sides) for sides in train_scenes["items"]["side"]]
    assert min(counts) >= 2 and max(counts) <= 4
    sides = [side for scene in train_scenes["items"]["side"] for side in scene]
    assert 20 <= min(sides) and max(sides) <= 40


@needs_fashion_mnist
def test_train_and_test_scenes_share_no_item_image():
    (train_images, train_labels), (test_images, test_labels) = split_arrays("train"), split_arrays("test")
    train, test = make_scenes("train", 300, seed=0), make_scenes("test", 300, seed=0)
    train_sources = sorted({source for scene in train["items"]["source_index"] for source in scene})
    test_sources = sorted({source for scene in test["items"]["source_index"] for source in scene})
    assert max(train_sources) < len(train_images) and max(test_sources) < len(test_images)
    assert {bytes(image) for image in train_images[train_sources]}.isdisjoint(
        bytes(image) for image in test_images[test_sources])
    row = test[0]
    assert row["items"]["category"] == test_labels[row["items"]["source_index"]].tolist()
    np.testing.assert_array_equal(np.asarray(row["image"]), recompose(row, test_images, size=64)[0])
    assert train[0]["items"] != test[0]["items"]  # the split enters the seed: no shared layouts either


@needs_fashion_mnist
def test_a_seed_gives_the_same_bytes_and_another_seed_other_scenes(tmp_path):
    first, again, other = (make_scenes("test", 40, seed=seed) for seed in (7, 7, 8))
    assert first.data.table.equals(again.data.table)
    assert first["items"] != other["items"]
    assert make_scenes("test", 10, seed=7).data.table.equals(first.select(range(10)).flatten_indices().data.table)
    for folder in ("a", "b"):
        save_scenes(tmp_path / folder, train_count=20, test_count=10, seed=7)
    for name in ("data/train-00000-of-00001.parquet", "data/test-00000-of-00001.parquet", "id2label.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()


@needs_fashion_mnist
def test_saved_scenes_load_as_the_segmentation_example_reads_them(tmp_path):
    written = save_scenes(tmp_path, train_count=12, test_count=6, seed=0, size=32)
    scenes = load_dataset(str(tmp_path))
    assert {split: scenes[split].num_rows for split in scenes} == {"train": 12, "test": 6}
    row = scenes["train"][0]
    assert row["image"].mode == row["annotation"].mode == "L" and row["annotation"].size == (32, 32)
    id2label = {int(key): name for key, name in json.loads(written["id2label"].read_text()).items()}
    assert id2label == scene_id2label() and id2label[0] == "background" and id2label[1] == LABEL_NAMES[0]
    assert scenes["test"][0]["items"] == make_scenes("test", 1, seed=0, size=32)[0]["items"]


@needs_fashion_mnist
def test_thousands_of_scenes_take_seconds(train_arrays):
    start = time.perf_counter()
    scenes = make_scenes("train", 2500, seed=3)
    assert time.perf_counter() - start < 20  # ~1.5 s on 2 shared cores; per-pixel Python would take minutes
    row = scenes[2300]  # composed in the second chunk of scenes
    np.testing.assert_array_equal(np.asarray(row["annotation"]), recompose(row, train_arrays[0], size=64)[1])


def test_no_fashion_mnist_says_how_to_install_it(tmp_path, monkeypatch):
    def offline(*args, **kwargs):
        raise ConnectionError("Couldn't reach the Hub")

    monkeypatch.setattr(fashion_mnist, "load_dataset", offline)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        make_scenes("test", 1, seed=0, directory=tmp_path)


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="split must be one of \\['train', 'test'\\]"):
        make_scenes("validation", 1, seed=0)
    with pytest.raises(ValueError, match="item_sides"):
        make_scenes("train", 1, seed=0, size=32, item_sides=(20, 40))


def test_a_window_of_the_training_split_carves_disjoint_validation_scenes():
    from hf_siamese.scenes import make_scenes, split_window

    assert split_window("train[:50000]") == ("train", slice(None, 50000))
    fit, validation = make_scenes("train[:50000]", 20, seed=0), make_scenes("train[50000:]", 20, seed=0)
    fit_sources = {index for items in fit["items"] for index in items["source_index"]}
    validation_sources = {index for items in validation["items"] for index in items["source_index"]}
    assert max(fit_sources) < 50000 <= min(validation_sources)  # indices into the whole training split
    with pytest.raises(ValueError, match="optionally with a window"):
        make_scenes("validation", 2, seed=0)
