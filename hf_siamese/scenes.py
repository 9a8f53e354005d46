"""Fashion-MNIST scenes: real dense labels for a segmentation probe, composed from Fashion-MNIST items.

Each scene is a ``size x size`` grayscale canvas (black background) holding 2 to 4 Fashion-MNIST items, each
resized (PIL's antialiased bilinear filter) to a square of random side (20 to 40 px on a 64 px canvas, scaled with
``size``) at a random position inside the canvas. Items are pasted in order, a later one over the earlier ones, but
only where its resized pixel is above ``threshold`` (default :data:`ITEM_THRESHOLD` = 16 of 255): an item's own
black background does not erase what lies under it. The label map follows the same rule, so a pixel's label is
the Fashion-MNIST class id + 1 of the topmost item whose pixel there is above the threshold, and 0 (background)
elsewhere: :func:`scene_id2label` ``{0: "background", 1: "T-shirt/top", ..., 10: "Ankle boot"}``.

Rows are laid out as transformers' semantic-segmentation example expects (``image`` and ``annotation``, both PIL,
the annotation a mode ``L`` label map; ``id2label.json`` beside the parquet files written by :func:`save_scenes`),
plus COCO-style ``objects`` (``bbox`` ``[x, y, w, h]``, ``category`` = Fashion-MNIST class id, ``area`` in pixels,
all of the item's *visible* pixels after occlusion; a fully hidden item has no object) and ``items``, every pasted
item in paste order (its Fashion-MNIST ``source_index``, ``category``, ``top``, ``left``, ``side``), from which the
scene can be composed again.

Scenes of the ``"train"`` split are made only of Fashion-MNIST training images and scenes of ``"test"`` only of
test images (the two sets share no image), so a probe trained on train scenes is evaluated on unseen items.
Scenes are a function of ``(split, seed, size, threshold)``: scene ``i`` is the same whatever ``count`` is.
"""

import json
import re
from functools import lru_cache
from pathlib import Path
from typing import NamedTuple

import numpy as np
from datasets import ClassLabel, Dataset, Features, Image, Sequence, Value
from PIL import Image as PILImage

from .fashion_mnist import (
    FASHION_MNIST_DIR, LABEL_NAMES, find_idx_files, load_fashion_mnist, png_image_values, read_idx,
)

ITEM_THRESHOLD = 16  # of 255: ~7% of Fashion-MNIST's non-zero pixels are fainter (edges, not garment)
ITEMS_PER_SCENE = (2, 4)  # inclusive
ITEM_SIDE_FRACTIONS = (20 / 64, 40 / 64)  # of the canvas side: 20 to 40 px items on 64 px canvases
SCENE_LABEL_NAMES = ["background", *LABEL_NAMES]
SPLITS = ("train", "test")
_CHUNK = 2048  # scenes composed at once: bounds memory at large sizes without slowing small ones
_LAYOUT_DRAWS = 1 + 4 * ITEMS_PER_SCENE[1]  # uniforms per scene: its item count, then source/side/top/left per item

_ITEM_FEATURES = {"source_index": Value("int64"), "category": ClassLabel(names=LABEL_NAMES), "top": Value("int32"),
                  "left": Value("int32"), "side": Value("int32")}  # fmt: skip
SCENE_FEATURES = Features({
    "image": Image(),
    "annotation": Image(),
    "objects": Sequence({"bbox": Sequence(Value("float32"), length=4), "category": ClassLabel(names=LABEL_NAMES),
                         "area": Value("int64")}),
    "items": Sequence(_ITEM_FEATURES),
})  # fmt: skip


def scene_id2label() -> dict[int, str]:
    """The label map's ids and names, as ``config.id2label`` of a segmentation model wants them."""
    return dict(enumerate(SCENE_LABEL_NAMES))


class SceneLayouts(NamedTuple):
    """What each of ``N`` scenes holds, item slot by slot (``[N, 4]`` arrays; slots from ``counts`` on unused)."""

    counts: np.ndarray  # [N] items in each scene
    sources: np.ndarray  # Fashion-MNIST indices within the split
    sides: np.ndarray
    tops: np.ndarray
    lefts: np.ndarray


class ComposedScenes(NamedTuple):
    """Canvases, label maps and, per pixel, the slot of the item seen there (-1: background); ``[N, size, size]``."""

    images: np.ndarray
    label_maps: np.ndarray
    owners: np.ndarray


def default_item_sides(size: int) -> tuple[int, int]:
    """Item sides in proportion to the canvas, so scenes look alike at every ``size``."""
    return tuple(max(1, round(size * fraction)) for fraction in ITEM_SIDE_FRACTIONS)


def draw_layouts(count: int, generator: np.random.Generator, pool_size: int, size: int,
                 item_sides: tuple[int, int]) -> SceneLayouts:
    """Random layouts from one row of uniforms per scene, so scene ``i`` does not depend on ``count``."""
    uniforms = generator.random((count, _LAYOUT_DRAWS))
    low, high = ITEMS_PER_SCENE
    counts = low + np.floor(uniforms[:, 0] * (high - low + 1)).astype(np.int64)
    per_item = uniforms[:, 1:].reshape(count, high, 4)
    sources = np.floor(per_item[..., 0] * pool_size).astype(np.int64)
    sides = item_sides[0] + np.floor(per_item[..., 1] * (item_sides[1] - item_sides[0] + 1)).astype(np.int64)
    tops = np.floor(per_item[..., 2] * (size - sides + 1)).astype(np.int64)
    lefts = np.floor(per_item[..., 3] * (size - sides + 1)).astype(np.int64)
    return SceneLayouts(counts, sources, sides, tops, lefts)


@lru_cache
def resize_matrix(source_side: int, target_side: int) -> np.ndarray:
    """``[target, source]`` weights of PIL's antialiased bilinear resize: ``A @ image @ A.T`` resizes a batch."""
    identity = np.eye(source_side, dtype=np.float32)
    resized_rows = PILImage.fromarray(identity).resize((target_side, source_side), PILImage.Resampling.BILINEAR)
    return np.asarray(resized_rows, dtype=np.float64).T


def resize_items(images: np.ndarray, side: int) -> np.ndarray:
    """``[n, side, side]`` uint8 items resized from ``[n, 28, 28]`` in one batched product."""
    matrix = resize_matrix(images.shape[-1], side)
    return np.clip(np.rint(matrix @ images.astype(np.float64) @ matrix.T), 0, 255).astype(np.uint8)


def compose(layouts: SceneLayouts, images: np.ndarray, labels: np.ndarray, size: int,
            threshold: int) -> ComposedScenes:
    """Paste items slot by slot (later over earlier) where they are brighter than ``threshold``."""
    count = len(layouts.counts)
    scenes = ComposedScenes(np.zeros((count, size, size), np.uint8), np.zeros((count, size, size), np.uint8),
                            np.full((count, size, size), -1, np.int8))
    for slot in range(layouts.sides.shape[1]):
        present = layouts.counts > slot
        for side in np.unique(layouts.sides[present, slot]):
            scene_index = np.flatnonzero(present & (layouts.sides[:, slot] == side))
            sources = layouts.sources[scene_index, slot]
            items = resize_items(images[sources], int(side))
            # Flat canvas offsets of each item's pixels; one item per scene in a slot, so writes never collide.
            rows = layouts.tops[scene_index, slot, None] + np.arange(side)
            columns = layouts.lefts[scene_index, slot, None] + np.arange(side)
            offsets = (scene_index[:, None, None] * size + rows[:, :, None]) * size + columns[:, None, :]
            shown = items > threshold
            class_ids = np.broadcast_to((labels[sources] + 1).astype(np.uint8)[:, None, None], shown.shape)
            targets = offsets[shown]
            scenes.images.reshape(-1)[targets] = items[shown]
            scenes.label_maps.reshape(-1)[targets] = class_ids[shown]
            scenes.owners.reshape(-1)[targets] = slot
    return scenes


def visible_boxes(owners: np.ndarray, slots: int) -> tuple[np.ndarray, np.ndarray]:
    """COCO ``[x, y, w, h]`` boxes ``[N, slots, 4]`` and areas ``[N, slots]`` of each item's visible pixels."""
    boxes = np.zeros((len(owners), slots, 4), np.int64)
    areas = np.zeros((len(owners), slots), np.int64)
    height, width = owners.shape[1:]
    for slot in range(slots):
        visible = owners == slot
        areas[:, slot] = visible.sum(axis=(1, 2))
        for axis, extent, start in ((2, height, 1), (1, width, 0)):
            hit = visible.any(axis=axis)
            first = hit.argmax(axis=1)
            boxes[:, slot, start] = first
            boxes[:, slot, start + 2] = extent - hit[:, ::-1].argmax(axis=1) - first
    boxes[areas == 0] = 0
    return boxes, areas


def split_arrays(split: str, directory: str | Path | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST ``split`` as ``[n, 28, 28]`` images and ``[n]`` labels: IDX files direct, PNG decoding is slow."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    try:
        images_path, labels_path = find_idx_files(FASHION_MNIST_DIR if directory is None else directory, split)
    except FileNotFoundError:
        rows = load_fashion_mnist(split, directory).with_format("numpy")  # the Hub, or its error naming both
        return np.asarray(rows["image"], np.uint8), np.asarray(rows["label"], np.int64)
    return read_idx(images_path), read_idx(labels_path).astype(np.int64)


def split_window(split: str) -> tuple[str, slice]:
    """``"train"`` or a window of it in datasets' slice syntax (``"train[:50000]"``, ``"train[50000:]"``): the
    base split and the slice, so that a validation split is carved from the training images, disjoint from the rest."""
    match = re.fullmatch(r"(\w+)(?:\[(\d*):(\d*)\])?", split)
    if not match or match.group(1) not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, optionally with a window like 'train[:50000]', "
                         f"got {split!r}")
    start, stop = (int(value) if value else None for value in match.group(2, 3))
    return match.group(1), slice(start, stop)


def scene_rows(layouts: SceneLayouts, scenes: ComposedScenes, labels: np.ndarray,
               first_source: int = 0) -> dict[str, list]:
    """Columns of :data:`SCENE_FEATURES` for composed scenes; objects only for items with a visible pixel.
    ``first_source``: the split index of the first image the layouts draw from (a window of the split)."""
    boxes, areas = visible_boxes(scenes.owners, layouts.sides.shape[1])
    fields = {"source_index": (layouts.sources + first_source).tolist(), "category": labels[layouts.sources].tolist(),
              "top": layouts.tops.tolist(), "left": layouts.lefts.tolist(), "side": layouts.sides.tolist()}
    boxes, areas = boxes.tolist(), areas.tolist()
    items, objects = [], []
    for scene, count in enumerate(layouts.counts.tolist()):
        items.append({name: values[scene][:count] for name, values in fields.items()})
        seen = [slot for slot in range(count) if areas[scene][slot]]
        objects.append({"bbox": [boxes[scene][slot] for slot in seen],
                        "category": [fields["category"][scene][slot] for slot in seen],
                        "area": [areas[scene][slot] for slot in seen]})
    return {"image": png_image_values(scenes.images), "annotation": png_image_values(scenes.label_maps),
            "objects": objects, "items": items}


def make_scenes(split: str, count: int, seed: int, size: int = 64, *, threshold: int = ITEM_THRESHOLD,
                item_sides: tuple[int, int] | None = None, directory: str | Path | None = None) -> Dataset:
    """``count`` scenes of Fashion-MNIST ``split`` items ("train" or "test", never mixed), a function of the seed.

    Args:
        split: ``"train"`` scenes use only Fashion-MNIST training images, ``"test"`` scenes only test images.
        count: how many scenes; scene ``i`` is the same for every ``count`` larger than ``i``.
        seed: the layouts' random seed.
        size: the canvas side in pixels.
        threshold: an item's resized pixel above it is pasted and labelled; at or below it, the scene shows through.
        item_sides: ``(smallest, largest)`` item side in pixels; default 20 to 40 at 64 px, in proportion otherwise.
        directory: Fashion-MNIST's IDX files (default ``FASHION_MNIST_DIR``, else the Hub).
    """
    item_sides = default_item_sides(size) if item_sides is None else tuple(item_sides)
    if not 1 <= item_sides[0] <= item_sides[1] <= size:
        raise ValueError(f"item_sides must satisfy 1 <= smallest <= largest <= size={size}, got {item_sides}")
    base, window = split_window(split)
    images, labels = split_arrays(base, directory)
    first_source, last_source, _ = window.indices(len(images))
    images, labels = images[first_source:last_source], labels[first_source:last_source]
    # The split (and its window) enters the seed: scenes of two splits of one seed share no layout either.
    key = (seed, SPLITS.index(base)) if split == base else (seed, SPLITS.index(base), first_source, last_source)
    layouts = draw_layouts(count, np.random.default_rng(key), len(images), size, item_sides)
    columns = {name: [] for name in SCENE_FEATURES}
    for start in range(0, count, _CHUNK):
        chunk = SceneLayouts(*(field[start:start + _CHUNK] for field in layouts))
        composed = compose(chunk, images, labels, size, threshold)
        for name, values in scene_rows(chunk, composed, labels, first_source).items():
            columns[name] += values
    return Dataset.from_dict(columns, features=SCENE_FEATURES)


def save_scenes(folder: str | Path, train_count: int, test_count: int, seed: int, size: int = 64,
                **options) -> dict[str, Path]:
    """Write ``train`` and ``test`` scenes and ``id2label.json`` to ``folder``, as ``load_dataset(folder)`` reads them.

    ``options`` go to :func:`make_scenes`. Returns the written files by split (and ``"id2label"``).
    """
    folder = Path(folder)
    (folder / "data").mkdir(parents=True, exist_ok=True)
    written = {}
    for split, count in (("train", train_count), ("test", test_count)):
        written[split] = folder / "data" / f"{split}-00000-of-00001.parquet"
        make_scenes(split, count, seed, size, **options).to_parquet(written[split])
    written["id2label"] = folder / "id2label.json"
    written["id2label"].write_text(json.dumps(scene_id2label(), indent=2) + "\n")
    return written
