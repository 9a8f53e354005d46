"""Host CPU per image of each recipe's multi-view pipeline on an ImageNet-like JPEG corpus: the papers' torchvision
loaders, lightly's transforms and hf_siamese's ``MultiViewTransform``, each behind ImageFolder and a DataLoader.

**What it measures.** For each recipe, pipeline and number of DataLoader workers (0, 1, 2): the host CPU time one
epoch over the corpus costs (decode, views, collation, and the main process's share), as milliseconds per image and
as images per second per core (1000 / ms per image), and the epoch's wall-clock images per second. The pipelines of
one recipe run interleaved, ``--repeats`` times, their order rotated each repeat and fresh augmentations each repeat
(seed = repeat); ``ratio_to_official`` is the median over repeats of official's host CPU over this pipeline's in
the same repeat (above 1: cheaper than the official loader), with a distribution-free interval for it. One JSON
line per (recipe, pipeline, workers), appended to ``--results``; cases already there (same ``--images``) are
skipped, so an interrupted run continues. About 65 minutes on 2 cores at the defaults.

**Corpus** (``--corpus``, kept between runs): ``--images`` JPEGs cut from natural photographs that ship inside
installed packages, in ``<photograph>/<index>.jpg`` class folders (ImageFolder's classes):

* ``china.jpg`` and ``flower.jpg`` (640 x 427), scikit-learn's sample images (``sklearn.datasets.load_sample_images``):
  Flickr photographs under CC BY 2.0 (creativecommons.org/licenses/by/2.0), china.jpg by danielbuechele and
  flower.jpg from vultilion's photostream, as sklearn/datasets/images/README.txt credits them;
* ``grace_hopper.jpg`` (512 x 600), matplotlib's sample data (``matplotlib.cbook.get_sample_data``): the US Navy
  portrait of Grace Hopper, a work of the US federal government and so in the public domain.

Image ``i`` is drawn from ``(--seed, i)`` alone: landscape 80% / portrait 20%, long side ~ N(500, 60) clipped to
[300, 800], long / short = 4/3 with probability 0.6 (the camera frame) else uniform in [1, 4/3], so that the median
image is 500 x 375 as in ImageNet's training set; a crop of that aspect covering 0.3-1 of the largest such crop
that fits the photograph, placed uniformly, resized (Lanczos) to that size and saved at a JPEG quality uniform in
75-95 (4:2:0 chroma, baseline). Not noise: every pixel is a resampled photograph's.

**Recipes** (all at 224 px, built with ``MultiViewTransform.from_config(SiameseConfig(backbone="resnet50", ...))``):
``mocov2`` (MoCo: 2 views, the MoCo v2 / SimSiam recipe), ``byol`` (2 views, BYOL's asymmetric blur and solarize),
``multicrop`` (MoCo + MultiCrop: 2 x 224 + 6 x 96), ``scalemix`` (BYOL + ScaleMix: 2 mixed source views from 4
draws, 2 targets), ``meanenc`` (MoCo + MeanEnc: 1 source, 2 target views), ``asymaug`` (BYOL + AsymAug: RandAugment
on the 2 source views, crop + flip + normalise on the 2 targets).

**Pipelines**, all reading the corpus through ``torchvision.datasets.ImageFolder`` (PIL's loader), a shuffled
``DataLoader`` of ``--batch`` images and one intra-op thread per process:

* ``official``: classic ``torchvision.transforms`` (v1) per view, written from the papers' specifications
  (MoCo v2: Chen et al. 2020; BYOL: Grill et al. 2020, Table 6; MultiCrop, ScaleMix, AsymAug, MeanEnc: Wang et al.
  2022): RandomResizedCrop, RandomApply([ColorJitter], 0.8), RandomGrayscale(0.2), RandomApply([Gaussian blur with
  PIL's ImageFilter, sigma in [0.1, 2]]), RandomSolarize (BYOL's second view), RandomHorizontalFlip, ToTensor,
  Normalize, one transform per view in a list as the reference loaders compose them. ScaleMix mixes two draws with
  ``hf_siamese.views.scale_mix`` (a CutMix box on tensors); AsymAug's RandAugment is timm's with Asym-Siam's policy.
* ``lightly``: lightly's transform for the recipe (``MoCoV2Transform``, ``BYOLTransform``, ``SwaVTransform`` with
  MoCo v2's colour settings for MultiCrop, lightly's ``MultiViewTransform`` of three MoCo v2 views for MeanEnc); a
  line with null measurements and the reason where lightly has none (ScaleMix, AsymAug).
* ``host``: hf_siamese's ``MultiViewTransform`` as training uses it: views coloured in the workers, shipped as
  uint8 and normalised in the main process (``finish_views``, timed apart as ``device_side_cpu_ms_per_image``).
* ``device_split``: hf_siamese with ``augment_on_device``: the workers decode, crop and flip to uint8 and draw each
  view's parameters (``host_ms_per_image`` is this host side alone); the colour steps and normalisation
  (``finish_views``) then run on each batch in the main process, on the CPU, timed apart
  (``device_side_cpu_ms_per_image``, and ``host_and_device_cpu_ms_per_image``); ScaleMix's partners are coloured
  there too and then pasted.
* ``floor``: the part identical views leave to any pipeline: the decode, and each view's crop resized (antialiased)
  to uint8 with torchvision's draws, stacked as it lies in memory; no colour, no normalisation. Nothing trains on
  it: it bounds what a host side that makes the recipe's views can cost.

**Host CPU time** is user + system time of all threads of a process: the main process's over the epoch
(``time.process_time``, from before its DataLoader iterator starts to the arrival of the epoch's last batch), plus
each DataLoader worker's whole lifetime, read with psutil (``/proc/<pid>/stat``) after that last batch and before
the iterator is released (which is when the workers exit). Workers are forked (Linux's default start method) and a
forked process starts with zero CPU time, so a worker's reading is exactly what it spent in this epoch: its
start-up, decoding, the views and collation into shared memory; the main process's share is forking, sampling and
receiving batches. ``RUSAGE_CHILDREN`` would see the workers only once they are reaped (and then with their
shutdown), and ``time.process_time`` inside a worker would miss the main process; the sum agrees with
``getrusage`` (self + children) taken around the epoch and the workers' exit, less that exit's few tens of ms. A
worker's reading is in clock ticks (10 ms), under 0.1% of an epoch of 512 images. Worker start-up (a fork, tens of
ms) is included: an epoch pays it.

    python bench/views_at_scale.py [--images 512] [--repeats 8] [--batch 32] [--workers 0,1,2] [--seed 0] \\
        [--recipes mocov2,byol,multicrop,scalemix,meanenc,asymaug] [--pipelines official,lightly,host,device_split] \\
        [--results bench/results/views_at_scale.jsonl] [--corpus outputs/views_at_scale_corpus]
    python bench/views_at_scale.py --images 8 --repeats 1      # a smoke run
    python bench/views_at_scale.py --report bench/results/views_at_scale.jsonl     # the table in docs/benchmarks.md
"""

import argparse
import dataclasses
import datetime
import io
import json
import math
import multiprocessing
import os
import platform
import random
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import psutil
import torch
import torchvision
from PIL import Image, ImageFilter
from torch.utils.data import DataLoader, default_collate
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.data_pipeline import _collate_samples, median_interval  # noqa: E402
from hf_siamese import SiameseConfig  # noqa: E402
from hf_siamese.device_augment import finish_views  # noqa: E402
from hf_siamese.training import views_to_device  # noqa: E402
from hf_siamese.view_layout import SOURCE_PIXEL_VALUES, TARGET_PIXEL_VALUES  # noqa: E402
from hf_siamese.views import (  # noqa: E402
    IMAGENET_MEAN, IMAGENET_STD, RAND_AUGMENT, MultiViewTransform, collate_views, scale_mix,
)

BENCH = "views_at_scale"
IMAGE_SIZE = 224
LOCAL_SIZE, NUM_LOCAL = 96, 6
GLOBAL_SCALE, LOCAL_SCALE = (0.14, 1.0), (0.05, 0.14)  # MultiCrop's crop scales (Wang et al. 2022)
RECIPES = {
    "mocov2": {"framework": "moco"},
    "byol": {"framework": "byol"},
    "multicrop": {"framework": "moco", "multicrop": True, "multicrop_num_local": NUM_LOCAL,
                  "multicrop_local_size": LOCAL_SIZE, "multicrop_local_scale": LOCAL_SCALE,
                  "multicrop_global_scale": GLOBAL_SCALE},
    "scalemix": {"framework": "byol", "scalemix": True},
    "meanenc": {"framework": "moco", "mean_encoding": True, "mean_encoding_views": 2},
    "asymaug": {"framework": "byol", "asym_aug": True},
}
PHOTOGRAPHS = ("china", "flower", "grace_hopper")


# ---- the corpus


def photographs() -> dict[str, Image.Image]:
    """The natural photographs the corpus is cut from, by class name (see the module docstring for licences)."""
    from matplotlib import cbook
    from sklearn.datasets import load_sample_images

    sample = load_sample_images()
    photos = {Path(name).stem: Image.fromarray(pixels) for name, pixels in zip(sample.filenames, sample.images)}
    with Image.open(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False)) as hopper:
        photos["grace_hopper"] = hopper.convert("RGB")
    return {name: photos[name] for name in PHOTOGRAPHS}


def draw_image(rng: np.random.Generator, photo_size: tuple[int, int]) -> dict:
    """One corpus image: its size (ImageNet's distribution), its crop box in the photograph, its JPEG quality."""
    long_side = int(np.clip(round(rng.normal(500, 60)), 300, 800))
    long_over_short = 4 / 3 if rng.random() < 0.6 else rng.uniform(1.0, 4 / 3)
    short_side = round(long_side / long_over_short)
    width, height = (long_side, short_side) if rng.random() < 0.8 else (short_side, long_side)
    box = draw_box(rng, photo_size, width / height)
    return {"size": [width, height], "box": box, "quality": int(rng.integers(75, 96))}


def draw_box(rng: np.random.Generator, photo_size: tuple[int, int], aspect: float) -> list[float]:
    """A crop of ``aspect`` (width / height) covering 0.3-1 of the largest such crop in the photograph, placed
    uniformly: (left, top, right, bottom) in pixels."""
    photo_width, photo_height = photo_size
    full_width = min(photo_width, photo_height * aspect)
    side = math.sqrt(rng.uniform(0.3, 1.0))
    width, height = full_width * side, full_width / aspect * side
    left, top = rng.uniform(0, photo_width - width), rng.uniform(0, photo_height - height)
    return [round(float(v), 2) for v in (left, top, left + width, top + height)]


def corpus_jpeg(photo: Image.Image, params: dict) -> bytes:
    image = photo.resize(tuple(params["size"]), Image.LANCZOS, box=tuple(params["box"]))
    stream = io.BytesIO()
    image.save(stream, "JPEG", quality=params["quality"])
    return stream.getvalue()


def build_corpus(directory: Path, count: int, seed: int = 0) -> Path:
    """``count`` JPEGs in ``directory/<photograph>/<index>.jpg``, their draws in ``directory/corpus.json``.

    Image ``i`` depends on (seed, i) alone, so a smaller corpus is a prefix of a larger one: files whose recorded draw
    matches are kept, the others written, and those beyond ``count`` removed (with class folders left empty).
    """
    photos = photographs()
    wanted = {}
    for index in range(count):
        name = PHOTOGRAPHS[index % len(PHOTOGRAPHS)]
        wanted[f"{name}/{index:05d}.jpg"] = {"photograph": name,
                                             **draw_image(np.random.default_rng([seed, index]), photos[name].size)}
    manifest = directory / "corpus.json"
    recorded = json.loads(manifest.read_text())["images"] if manifest.exists() else {}
    for path in set(recorded) - set(wanted):
        (directory / path).unlink(missing_ok=True)
    for path, params in wanted.items():
        file = directory / path
        if recorded.get(path) != params or not file.exists():
            file.parent.mkdir(parents=True, exist_ok=True)
            file.write_bytes(corpus_jpeg(photos[params["photograph"]], params))
    for folder in (directory / name for name in PHOTOGRAPHS):
        if folder.is_dir() and not any(folder.iterdir()):
            folder.rmdir()
    manifest.write_text(json.dumps({"seed": seed, "images": wanted}))
    return directory


def corpus_summary(directory: Path) -> dict:
    """What a result line says of its corpus: seed, photographs, median size, mean file size."""
    manifest = json.loads((directory / "corpus.json").read_text())
    images = manifest["images"]
    sizes = np.array([params["size"] for params in images.values()])
    kilobytes = [(directory / path).stat().st_size / 1024 for path in images]
    return {"seed": manifest["seed"], "photographs": list(PHOTOGRAPHS),
            "median_size": [int(v) for v in np.median(sizes, axis=0)], "mean_kb": round(statistics.mean(kilobytes), 1)}


# ---- the pipelines


class Pipeline(NamedTuple):
    transform: Callable  # PIL image -> views
    collate: Callable  # list of (views, label) -> batch
    finish: Callable | None = None  # batch -> the model's views, in the main process (the device side, on the CPU)


class Unavailable(Exception):
    """A pipeline that has no form of a recipe; recorded with null measurements and this reason."""


def host_pipeline(recipe: str) -> Pipeline:
    """hf_siamese as training runs it without the split: views coloured in the workers, shipped as uint8 and
    normalised (``finish_views``) in the main process, here on the CPU."""
    return _library_pipeline(recipe, uint8_views=True)


def _library_pipeline(recipe: str, **transform_options) -> Pipeline:
    """The recipe's ``MultiViewTransform`` in the workers, ``finish_views`` on each batch in the main process."""
    config = SiameseConfig(backbone="resnet50", image_size=IMAGE_SIZE, **RECIPES[recipe])
    transform = MultiViewTransform.from_config(config, **transform_options)
    cpu = torch.device("cpu")
    return Pipeline(transform, _collate_samples, lambda batch: finish_views(views_to_device(batch, cpu), config))


@dataclasses.dataclass(frozen=True)
class PaperView:
    """One view of a paper's recipe: crop size and scale, ColorJitter (brightness, contrast, saturation, hue),
    blur and solarize probabilities."""

    scale: tuple[float, float]
    jitter: tuple[float, float, float, float]
    blur: float
    solarize: float = 0.0
    size: int = IMAGE_SIZE


MOCOV2_VIEW = PaperView((0.2, 1.0), (0.4, 0.4, 0.4, 0.1), blur=0.5)  # MoCo v2 "aug+", SimSiam
BYOL_VIEWS = (PaperView((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), blur=1.0),  # BYOL, Table 6
              PaperView((0.08, 1.0), (0.4, 0.4, 0.2, 0.1), blur=0.1, solarize=0.2))


class PILGaussianBlur:
    """MoCo v2's blur: PIL's Gaussian filter with a radius (sigma) drawn uniformly in [0.1, 2]."""

    def __init__(self, sigma: tuple[float, float] = (0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, image: Image.Image) -> Image.Image:
        return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(*self.sigma)))


def paper_view(view: PaperView, rand_augment: Callable | None = None) -> T.Compose:
    """One view with classic torchvision transforms, in the MoCo v2 loader's order (BYOL's solarize after blur)."""
    steps = [T.RandomResizedCrop(view.size, scale=view.scale)] + ([rand_augment] if rand_augment else [])
    steps += [T.RandomApply([T.ColorJitter(*view.jitter)], p=0.8), T.RandomGrayscale(p=0.2),
              T.RandomApply([PILGaussianBlur()], p=view.blur)]
    if view.solarize:
        steps.append(T.RandomSolarize(threshold=128, p=view.solarize))
    return T.Compose(steps + [T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def weak_view() -> T.Compose:
    """AsymAug's target view: crop (0.08, 1), flip, normalise."""
    return T.Compose([T.RandomResizedCrop(IMAGE_SIZE, scale=(0.08, 1.0)), T.RandomHorizontalFlip(), T.ToTensor(),
                      T.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def paper_rand_augment() -> Callable:
    """Asym-Siam's source RandAugment: timm's, magnitude 10, 2 ops, filled with the ImageNet mean."""
    from timm.data.auto_augment import rand_augment_transform

    return rand_augment_transform(RAND_AUGMENT, {"translate_const": 100,
                                                 "img_mean": tuple(round(255 * m) for m in IMAGENET_MEAN)})


class Views:
    """One image -> a list of views, one per transform (the reference loaders' two-crops wrapper, generalised)."""

    def __init__(self, transforms: list[Callable]):
        self.transforms = transforms

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        return [transform(image) for transform in self.transforms]


class ScaleMixViews(Views):
    """ScaleMix: each view is also drawn a second time and the two mixed by a CutMix box; [mixed..., unmixed...]."""

    def __call__(self, image: Image.Image) -> list[torch.Tensor]:
        views = super().__call__(image)
        return [scale_mix(view, transform(image)) for view, transform in zip(views, self.transforms)] + views


MULTICROP_GLOBAL = dataclasses.replace(MOCOV2_VIEW, scale=GLOBAL_SCALE)
MULTICROP_LOCAL = dataclasses.replace(MOCOV2_VIEW, scale=LOCAL_SCALE, size=LOCAL_SIZE)
PAPER_VIEWS = {  # the views each recipe draws per image (ScaleMix draws each of its views twice, AsymAug adds 2 weak)
    "mocov2": [MOCOV2_VIEW] * 2, "byol": list(BYOL_VIEWS),
    "multicrop": [MULTICROP_GLOBAL] * 2 + [MULTICROP_LOCAL] * NUM_LOCAL, "scalemix": list(BYOL_VIEWS),
    "meanenc": [MOCOV2_VIEW] * 3, "asymaug": list(BYOL_VIEWS),
}


def official_pipeline(recipe: str) -> Pipeline:
    views = PAPER_VIEWS[recipe]
    if recipe == "scalemix":
        return Pipeline(ScaleMixViews([paper_view(view) for view in views]), default_collate)
    if recipe == "asymaug":
        return Pipeline(Views([paper_view(view, paper_rand_augment()) for view in views] + [weak_view()] * 2),
                        default_collate)
    return Pipeline(Views([paper_view(view) for view in views]), default_collate)


def floor_pipeline(recipe: str) -> Pipeline:
    """What identical views leave to every pipeline: the decode and each view's crop resized (antialiased) to
    uint8, collated as it lies; no colour, no normalisation."""
    views = PAPER_VIEWS[recipe] * (2 if recipe in ("scalemix", "asymaug") else 1)  # partners; AsymAug's targets
    crops = [T.Compose([T.RandomResizedCrop(view.size, scale=view.scale), T.RandomHorizontalFlip(), T.PILToTensor()])
             for view in views]
    return Pipeline(Views(crops), _collate_crops)


def _collate_crops(items) -> tuple[list[torch.Tensor], None]:
    """The floor's batch as ``batch_views`` reads it: the stacked crops (labels dropped)."""
    return collate_views([{"views": views} for views, _ in items])["views"], None


LIGHTLY_MISSING = {
    "scalemix": "lightly has no ScaleMix (two views of one image mixed by a CutMix box)",
    "asymaug": "lightly has no AsymAug (RandAugment on the source views only, crop + flip on the targets)",
}


def lightly_pipeline(recipe: str) -> Pipeline:
    if recipe in LIGHTLY_MISSING:
        raise Unavailable(LIGHTLY_MISSING[recipe])
    try:
        from lightly import transforms as lt
        from lightly.transforms.multi_view_transform import MultiViewTransform as LightlyViews
    except ImportError as error:
        raise Unavailable(f"lightly is not installed ({error}); pip install -e '.[bench]'") from error
    builders = {
        "mocov2": lambda: lt.MoCoV2Transform(input_size=IMAGE_SIZE),
        "byol": lambda: lt.BYOLTransform(lt.BYOLView1Transform(input_size=IMAGE_SIZE),
                                         lt.BYOLView2Transform(input_size=IMAGE_SIZE)),
        "multicrop": lambda: lt.SwaVTransform(
            crop_sizes=(IMAGE_SIZE, LOCAL_SIZE), crop_counts=(2, NUM_LOCAL),
            crop_min_scales=(GLOBAL_SCALE[0], LOCAL_SCALE[0]), crop_max_scales=(GLOBAL_SCALE[1], LOCAL_SCALE[1]),
            cj_bright=0.4, cj_contrast=0.4, cj_sat=0.4, cj_hue=0.1, gaussian_blur=0.5),
        "meanenc": lambda: LightlyViews([lt.MoCoV2Transform(input_size=IMAGE_SIZE).transforms[0]] * 3),
    }
    return Pipeline(builders[recipe](), default_collate)


def device_split_pipeline(recipe: str) -> Pipeline:
    """hf_siamese with ``augment_on_device``: the workers decode, crop and flip to uint8 and draw the parameters;
    the colour steps and normalisation (``finish_views``) run in batch in the main process, here on the CPU."""
    return _library_pipeline(recipe, augment_on_device=True)


PIPELINES = {"official": official_pipeline, "lightly": lightly_pipeline, "host": host_pipeline,
             "device_split": device_split_pipeline, "floor": floor_pipeline}


def flat_views(views) -> list[torch.Tensor]:
    """A sample's or a batch's views as one list: hf_siamese's source then target views, or the pipeline's list."""
    if isinstance(views, dict):
        return [*views.get(SOURCE_PIXEL_VALUES, []), *views.get(TARGET_PIXEL_VALUES, [])]
    return list(views)


def batch_views(batch) -> list[torch.Tensor]:
    """The views of a DataLoader batch: hf_siamese's dict, or default_collate's [views, labels]."""
    return flat_views(batch if isinstance(batch, dict) else batch[0])


# ---- the measurement


def make_loader(folder: Path, pipeline: Pipeline, batch: int, workers: int, seed: int) -> DataLoader:
    """An epoch's shuffled loader; ``seed`` draws its order and, through every RNG the transforms use (torch, random,
    numpy; DataLoader seeds its workers from the generator), its augmentations."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return DataLoader(ImageFolder(str(folder), transform=pipeline.transform), batch_size=batch, shuffle=True,
                      num_workers=workers, collate_fn=pipeline.collate, generator=torch.Generator().manual_seed(seed))


def cpu_seconds(process: psutil.Process) -> float:
    """A process's user + system time over its lifetime, all threads (``/proc/<pid>/stat``, 10 ms ticks)."""
    times = process.cpu_times()
    return times.user + times.system


def run_epoch(loader: DataLoader, finish: Callable | None = None) -> tuple[float, float, float]:
    """(host CPU seconds, wall seconds, device-side CPU seconds) of one epoch: the main process's CPU over the
    epoch plus each worker's lifetime CPU, read after the last batch and before the workers exit (module
    docstring), less the ``finish`` step on each batch, which is timed on its own."""
    me = psutil.Process()
    earlier = {child.pid for child in me.children()}
    main_start, start, device = time.process_time(), time.perf_counter(), 0.0
    batches = iter(loader)
    for _ in range(len(loader)):
        batch = next(batches)
        if finish is not None:
            finish_start = time.process_time()
            finish(batch)
            device += time.process_time() - finish_start
    wall = time.perf_counter() - start
    workers = [child for child in me.children() if child.pid not in earlier]
    if len(workers) != loader.num_workers:
        raise RuntimeError(f"found {len(workers)} DataLoader worker processes, expected {loader.num_workers}")
    cpu = time.process_time() - main_start + sum(cpu_seconds(worker) for worker in workers) - device
    del batches  # the workers exit now, after their CPU time was read
    return cpu, wall, device


def view_sizes(pipelines: dict[str, Pipeline], folder: Path) -> dict[str, list[int]]:
    """Each pipeline's view sizes on the corpus's first image; also warms each up before the clock runs."""
    image = ImageFolder(str(folder))[0][0]
    return {name: [view.shape[-1] for view in flat_views(pipeline.transform(image))]
            for name, pipeline in pipelines.items()}


def interleaved_epochs(folder: Path, pipelines: dict[str, Pipeline], workers: int, args) -> dict[str, list]:
    """(host CPU s, wall s, device-side CPU s) per repeat of each pipeline, the order rotated each repeat, fresh
    augmentations each repeat."""
    names, runs = list(pipelines), {name: [] for name in pipelines}
    for repeat in range(args.repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            loader = make_loader(folder, pipelines[name], args.batch, workers, seed=args.seed * 10_000 + repeat)
            runs[name].append(run_epoch(loader, pipelines[name].finish))
    return runs


def environment(args, corpus: dict) -> dict:
    try:
        from lightly import __version__ as lightly_version
    except ImportError:
        lightly_version = None
    return {"repeats": args.repeats, "images": args.images, "batch": args.batch, "threads": torch.get_num_threads(),
            "cpu_clock": "user+system: main process over the epoch (time.process_time) + each DataLoader worker's "
                         "lifetime (psutil)",
            "start_method": multiprocessing.get_start_method(), "corpus": corpus,
            "machine": f"{platform.machine()}, {os.cpu_count()} threads", "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "torchvision": torchvision.__version__, "lightly": lightly_version}


def measured_line(recipe: str, name: str, workers: int, runs: dict, sizes: list[int], args) -> dict:
    """A pipeline's result: medians over repeats, and its CPU paired with official's repeat by repeat."""
    cpu, wall, device = ([run[index] for run in runs[name]] for index in range(3))
    ratios = [official[0] / this for official, this in zip(runs["official"], cpu)]
    interval, coverage = median_interval(ratios)
    return {"bench": BENCH, "recipe": recipe, "pipeline": name, "workers": workers,
            "host_ms_per_image": round(1000 * statistics.median(cpu) / args.images, 3),
            "images_per_s_per_core": round(args.images / statistics.median(cpu), 2),
            "images_per_s": round(args.images / statistics.median(wall), 2),
            "ratio_to_official": round(statistics.median(ratios), 3),
            "ratio_interval": [round(v, 3) for v in interval] if interval else None,
            "ratio_interval_coverage": round(coverage, 3) if coverage else None,
            "host_ms_repeats": [round(1000 * c / args.images, 3) for c in cpu],
            "ratio_repeats": [round(r, 3) for r in ratios], "views_per_image": len(sizes), "view_sizes": sizes,
            **_device_side(device, cpu, args.images)}


def _device_side(device: list[float], host: list[float], images: int) -> dict:
    """With the colour steps batched after the loader: their CPU per image, and host + device on the CPU."""
    if not any(device):
        return {}
    total = [h + d for h, d in zip(host, device)]
    return {"device_side_cpu_ms_per_image": round(1000 * statistics.median(device) / images, 3),
            "host_and_device_cpu_ms_per_image": round(1000 * statistics.median(total) / images, 3)}


def unavailable_line(recipe: str, name: str, workers: int, reason: str) -> dict:
    nulls = dict.fromkeys(("host_ms_per_image", "images_per_s_per_core", "images_per_s", "ratio_to_official",
                           "ratio_interval", "ratio_interval_coverage", "views_per_image", "view_sizes"))
    return {"bench": BENCH, "recipe": recipe, "pipeline": name, "workers": workers, **nulls, "skipped": reason}


def build_pipelines(recipe: str, names: list[str]) -> tuple[dict[str, Pipeline], dict[str, str]]:
    """The pipelines of ``names`` that exist for ``recipe``, and why each other one does not."""
    built, unavailable = {}, {}
    for name in names:
        try:
            built[name] = PIPELINES[name](recipe)
        except Unavailable as reason:
            unavailable[name] = str(reason)
    return built, unavailable


def run_case(folder: Path, recipe: str, missing: list[str], workers: int, args) -> list[dict]:
    """The lines of the ``missing`` pipelines of (recipe, workers); official always runs, as every ratio's pair."""
    pipelines, unavailable = build_pipelines(recipe, ["official"] + [n for n in missing if n != "official"])
    lines = [unavailable_line(recipe, name, workers, reason) for name, reason in unavailable.items()]
    if any(name in missing for name in pipelines):
        sizes = view_sizes(pipelines, folder)
        runs = interleaved_epochs(folder, pipelines, workers, args)
        lines += [measured_line(recipe, name, workers, runs, sizes[name], args)
                  for name in pipelines if name in missing]
    return lines


# ---- results


def recorded_cases(path: Path) -> set[tuple]:
    if not path.exists():
        return set()
    lines = [json.loads(line) for line in path.read_text().splitlines() if line.startswith("{")]
    return {(r["recipe"], r["pipeline"], r["workers"], r["images"]) for r in lines if r.get("bench") == BENCH}


def report(path: str) -> str:
    """The docs/benchmarks.md table of a results file: recipe x pipeline x workers."""
    rows = ["| recipe | pipeline | workers | views | host CPU ms / image | images/s per core | images/s "
            "| official / this (host CPU, median of paired repeats) | interval (coverage) "
            "| device side on the CPU, ms / image | host + device side, ms / image |",
            "|---|---|---|---|---|---|---|---|---|---|---|"]
    lines = [json.loads(line) for line in open(path) if line.startswith("{")]
    order = {name: i for i, name in enumerate([*RECIPES, *PIPELINES])}
    for r in sorted(lines, key=lambda r: (order[r["recipe"]], r["workers"], order[r["pipeline"]])):
        if r["host_ms_per_image"] is None:
            rows.append(f"| {r['recipe']} | {r['pipeline']} | {r['workers']} | - | - | - | - "
                        f"| - ({r['skipped']}) | - | - | - |")
            continue
        interval = r["ratio_interval"]
        shown = f"{interval[0]:.3f} - {interval[1]:.3f} ({r['ratio_interval_coverage']:.0%})" if interval else "-"
        rows.append(f"| {r['recipe']} | {r['pipeline']} | {r['workers']} | {r['views_per_image']} | "
                    f"{r['host_ms_per_image']:.2f} | {r['images_per_s_per_core']:.1f} | {r['images_per_s']:.1f} | "
                    f"{r['ratio_to_official']:.3f} | {shown} | {_shown_ms(r, 'device_side_cpu_ms_per_image')} "
                    f"| {_shown_ms(r, 'host_and_device_cpu_ms_per_image')} |")
    return "\n".join(rows)


def _shown_ms(line: dict, key: str) -> str:
    return f"{line[key]:.2f}" if line.get(key) is not None else "-"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", metavar="JSONL",
                        help="Print the docs/benchmarks.md table of a results file and exit.")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--seed", type=int, default=0,
                        help="The corpus's draws, and the augmentations' (with the repeat).")
    parser.add_argument("--recipes", default=",".join(RECIPES))
    parser.add_argument("--pipelines", default=",".join(PIPELINES))
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/views_at_scale.jsonl")
    parser.add_argument("--corpus", type=Path, default=ROOT / "outputs/views_at_scale_corpus")
    args = parser.parse_args(argv)
    for name in args.recipes.split(","):
        if name not in RECIPES:
            parser.error(f"unknown recipe {name!r}; choose from {', '.join(RECIPES)}")
    for name in args.pipelines.split(","):
        if name not in PIPELINES:
            parser.error(f"unknown pipeline {name!r}; choose from {', '.join(PIPELINES)}")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.report:
        print(report(args.report))
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a DataLoader worker's share, so that workers=0 does the same work in one thread
    try:
        measure(args)
    finally:
        torch.set_num_threads(threads)  # a caller in the same process (the tests) keeps its threads


def measure(args: argparse.Namespace) -> None:
    """Every recipe x workers case not yet in ``args.results``, appended as it finishes."""
    folder = build_corpus(args.corpus, args.images, args.seed)
    shared = environment(args, corpus_summary(folder))
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = recorded_cases(args.results)
    for recipe in args.recipes.split(","):
        for workers in (int(w) for w in args.workers.split(",")):
            missing = [name for name in args.pipelines.split(",") if (recipe, name, workers, args.images) not in done]
            for line in run_case(folder, recipe, missing, workers, args) if missing else []:
                record = {**line, **shared}
                with args.results.open("a") as stream:
                    stream.write(json.dumps(record) + "\n")
                print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
