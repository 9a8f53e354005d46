"""Views per second of the multi-view data pipeline: a streamed parquet dataset against torchvision's ImageFolder.

Both read the same JPEG images (``--images`` of about 256-320 px, written once as parquet shards and as an
ImageFolder tree) and apply the same ``MultiViewTransform``: MoCo with MultiCrop, i.e. 2 global 224 px views
(source and target) and 6 local 96 px crops, alone, with ScaleMix, and with AsymAug's RandAugment. ``ours`` is
``hf_siamese.data.PretrainingData`` (datasets streaming, our decoding with skip-and-count, per-sample seeded
augmentation, ``collate_views``); the baseline is ``torchvision.datasets.ImageFolder`` with PIL's loader and a
shuffled ``DataLoader``, the same transform and collation. 0, 1 and 2 DataLoader workers. The clock starts once
every worker has delivered its first batch (start-up is reported apart) and stops at the end of the epoch's
``--images // --batch`` batches; medians over ``--repeats``, the two pipelines alternating. Both draw the same
augmentations in the same order (:class:`SeededViews`), fresh ones each repeat (seed = repeat), so each repeat is a
paired comparison of the two ways of getting an image to the transform: ``ratio`` is the median of the per-repeat
ratios, ``ratio_interval`` a distribution-free interval for it (coverage in ``ratio_interval_coverage``).
One JSON line per (design, workers); ratios are ours / baseline views per second. Ours reads through a
1000-image shuffle buffer: with up to 1000 images per worker, datasets' 5 s pause at the end of its shards (see
docs/benchmarks.md) falls in the start-up; with more, it falls inside the timed window, as it does once per epoch in training.

    python bench/data_pipeline.py [--images 512] [--batch 32] [--workers 0,1,2] [--designs multicrop,scalemix,randaugment] [--repeats 8]
    python bench/data_pipeline.py --report bench/results/data_pipeline.jsonl     # the table in docs/benchmarks.md
"""

import argparse
import datetime
import io
import json
import math
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import DataLoader, get_worker_info
from torchvision.datasets import ImageFolder

import datasets
from hf_siamese import SiameseConfig
from hf_siamese.data import DataArguments, PretrainingData, load_raw_dataset, seeded_randomness
from hf_siamese.views import MultiViewTransform, collate_views

MULTICROP = {"multicrop": True, "multicrop_num_local": 6, "multicrop_local_size": 96}
DESIGNS = {
    "multicrop": MULTICROP,
    "scalemix": {**MULTICROP, "scalemix": True},
    "randaugment": {**MULTICROP, "asym_aug": True},
}
NUM_CLASSES, NUM_SHARDS = 4, 4


def make_jpegs(count: int, seed: int = 0) -> list[bytes]:
    """Smooth colour fields with some noise at 256-320 px: JPEGs that decode like photographs, not like noise."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        width, height = (int(v) for v in rng.integers(256, 321, 2))
        coarse = Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).resize((width, height), Image.BILINEAR)
        pixels = np.asarray(coarse, dtype=np.int16) + rng.integers(-12, 13, (height, width, 3))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
        stream = io.BytesIO()
        image.save(stream, "JPEG", quality=90)
        images.append(stream.getvalue())
    return images


def write_both(jpegs: list[bytes], root: Path) -> tuple[str, Path]:
    """The same images as parquet shards (a ``datasets`` Image column) and as an ImageFolder tree."""
    folder = root / "imagefolder"
    for index, data in enumerate(jpegs):
        directory = folder / f"class_{index % NUM_CLASSES}"
        directory.mkdir(parents=True, exist_ok=True)
        (directory / f"{index:06d}.jpg").write_bytes(data)
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=NUM_CLASSES)})
    table = datasets.Dataset.from_dict(
        {"image": [{"bytes": data, "path": None} for data in jpegs], "label": [i % NUM_CLASSES for i in range(len(jpegs))]},
        features=features,
    )
    for shard in range(NUM_SHARDS):
        table.shard(NUM_SHARDS, shard, contiguous=True).to_parquet(str(root / f"train-{shard:02d}.parquet"))
    return str(root / "train-*.parquet"), folder


def ours_batches(pattern: str, transform, batch: int, workers: int, seed: int = 0):
    raw = load_raw_dataset(DataArguments(data_files=pattern, streaming=True))
    data = PretrainingData(raw, transform, batch_size=batch, num_channels=3, seed=seed, num_workers=workers,
                           shuffle_buffer_size=1000)
    return (views for _, _, views in data.batches())


class SeededViews:
    """ImageFolder's transform, drawing each sample's augmentations from the seed ours gives the sample at the same
    place: (seed, epoch 0, rank 0, worker, position in the worker's stream).

    A view's cost depends on its draws (crop area, whether blur or RandAugment ops apply) with about a 24% spread
    per image, several percent over a few hundred images; with the same draws in the same order, the two pipelines
    differ only in how an image reaches the transform, which is what the bench compares.
    """

    def __init__(self, transform, seed: int):
        self.transform = transform
        self.seed = seed
        self.position = 0  # per process: each DataLoader worker counts its own samples, as ours does

    def __call__(self, image):
        worker = get_worker_info()
        with seeded_randomness(self.seed, 0, 0, worker.id if worker is not None else 0, self.position):
            views = self.transform(image)
        self.position += 1
        return views


def _collate_samples(items):
    return collate_views([views for views, _ in items])


def baseline_batches(folder: Path, transform, batch: int, workers: int, seed: int = 0):
    dataset = ImageFolder(str(folder), transform=SeededViews(transform, seed))
    torch.manual_seed(seed)  # the sampler's order
    while True:
        loader = DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers, drop_last=True,
                            collate_fn=_collate_samples)
        yield from loader


def measure(batches, warmup: int, count: int) -> tuple[float, float]:
    """(seconds to the first ``warmup`` batches, seconds for the next ``count`` batches)."""
    start = time.perf_counter()
    for _ in range(warmup):
        next(batches)
    first = time.perf_counter()
    for _ in range(count):
        next(batches)
    return first - start, time.perf_counter() - first


def median_interval(values: list[float], confidence: float = 0.9) -> tuple[tuple[float, float] | None, float | None]:
    """A distribution-free interval for the median of ``values`` and its coverage: the k-th smallest and k-th
    largest value, for the largest k whose coverage is at least ``confidence`` (None with fewer than 5 values)."""
    n, values = len(values), sorted(values)

    def coverage(k: int) -> float:  # the chance that the median lies between them: 1 - 2 P(Binomial(n, 1/2) < k)
        return 1 - 2 * sum(math.comb(n, i) for i in range(k)) / 2**n

    k = max((k for k in range(1, n // 2 + 1) if coverage(k) >= confidence), default=None)
    return ((values[k - 1], values[n - k]), coverage(k)) if k else (None, None)


def report(path: str) -> str:
    """The docs/benchmarks.md table of a results file."""
    rows = ["| design | workers | ours views/s | ImageFolder views/s | ours / ImageFolder (median of paired repeats) "
            "| interval (coverage) | start-up s (ours, ImageFolder) |",
            "|---|---|---|---|---|---|---|"]
    for r in (json.loads(line) for line in open(path) if line.startswith("{")):
        interval = r.get("ratio_interval")
        shown = f"{interval[0]:.3f} - {interval[1]:.3f} ({r['ratio_interval_coverage']:.0%})" if interval else "-"
        rows.append(f"| {r['design']} | {r['workers']} | {r['ours_views_per_s']} | {r['baseline_views_per_s']} | "
                    f"{r['ratio']:.3f} | {shown} | {r['startup_s']['ours']}, {r['startup_s']['baseline']} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", metavar="JSONL", help="Print the docs/benchmarks.md table of a results file and exit.")
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2")
    parser.add_argument("--designs", default=",".join(DESIGNS))
    parser.add_argument("--repeats", type=int, default=8)
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    with tempfile.TemporaryDirectory() as tmp:
        pattern, folder = write_both(make_jpegs(args.images), Path(tmp))
        for design in args.designs.split(","):
            config = SiameseConfig(backbone="resnet50", framework="moco", **DESIGNS[design])
            transform = MultiViewTransform.from_config(config)
            views = sum(len(v) for v in transform(Image.new("RGB", (256, 256))).values())
            for workers in (int(w) for w in args.workers.split(",")):
                warmup = max(workers, 1)  # each worker's first batch starts the clock
                count = args.images // args.batch - warmup
                makers = {"ours": lambda seed: ours_batches(pattern, transform, args.batch, workers, seed),
                          "baseline": lambda seed: baseline_batches(folder, transform, args.batch, workers, seed)}
                runs = {name: [] for name in makers}
                for repeat in range(args.repeats):  # alternated, so that the machine's drift hits both alike
                    for name in (list(makers) if repeat % 2 == 0 else list(makers)[::-1]):
                        runs[name].append(measure(makers[name](repeat), warmup, count))
                paired = [base[1] / ours[1] for ours, base in zip(runs["ours"], runs["baseline"])]
                interval, coverage = median_interval(paired)
                results = {
                    name: {"views_per_s": round(count * args.batch * views / statistics.median(r[1] for r in timings), 1),
                           "startup_s": round(statistics.median(r[0] for r in timings), 2)}
                    for name, timings in runs.items()
                }
                print(json.dumps({
                    "bench": "data_pipeline", "design": design, "workers": workers, "views_per_image": views,
                    "batch": args.batch, "images": args.images,
                    "ours_views_per_s": results["ours"]["views_per_s"],
                    "baseline_views_per_s": results["baseline"]["views_per_s"],
                    "ratio": round(statistics.median(paired), 3),
                    "ratio_interval": [round(v, 3) for v in interval] if interval else None,
                    "ratio_interval_coverage": round(coverage, 3) if coverage else None,
                    "ratio_repeats": [round(r, 3) for r in paired],
                    "startup_s": {name: r["startup_s"] for name, r in results.items()},
                    "machine": f"{platform.machine()}, {os.cpu_count()} threads", "torch": torch.__version__,
                    "date": datetime.date.today().isoformat(),
                }), flush=True)


if __name__ == "__main__":
    main()
