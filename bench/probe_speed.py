"""Feature-extraction images/s of the probe in float32 and under bf16 autocast, and what bf16 changes in the result.

A randomly initialised encoder of a recipe (default: the small-image MoCo recipe) encodes the same Fashion-MNIST
images with each precision in turn, interleaved over ``--repeats`` rounds so that load on the shared machine hits
both alike. Reported: median images/s per precision, the median per-round ratio bf16 / fp32, the largest
relative difference of the pooled features, and how many of the images get the same kNN (k = 20) label from a
bank encoded in the same precision. One JSON line.

    python bench/probe_speed.py [--config configs/fashion_mnist_moco.yaml] [--images 2048] [--repeats 5]
"""

import argparse
import json
import platform
import statistics
import time

import torch

from hf_siamese import SiameseModel
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.fashion_mnist import load_fashion_mnist
from hf_siamese.probing import extract_features, knn_classify


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/fashion_mnist_moco.yaml")
    parser.add_argument("--images", type=int, default=2048)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch_size", type=int, default=256)
    args = parser.parse_args()
    config, _, _ = parse_pretraining_args(["--config", args.config])
    torch.manual_seed(0)
    model = SiameseModel(config).eval()
    bank, queries = load_fashion_mnist(f"train[:{args.images}]"), load_fashion_mnist("test[:1000]")
    seconds: dict[str, list[float]] = {"no": [], "bf16": []}
    features = {}
    for _ in range(args.repeats):
        for precision in seconds:
            started = time.perf_counter()
            features[precision] = extract_features(model, bank, batch_size=args.batch_size, progress=False,
                                                   mixed_precision=precision)
            seconds[precision].append(time.perf_counter() - started)
    full, half = features["no"].features, features["bf16"].features
    labels = {precision: knn_classify(features[precision], extract_features(
        model, queries, progress=False, mixed_precision=precision).features, k=20, num_classes=10)
        for precision in seconds}
    print(json.dumps({
        "bench": "probe_speed", "config": args.config, "images": args.images, "repeats": args.repeats,
        **{f"images_per_s_{p}": round(args.images / statistics.median(s), 1) for p, s in seconds.items()},
        "ratio_bf16_over_fp32": round(statistics.median(a / b for a, b in zip(seconds["no"], seconds["bf16"])), 3),
        "max_relative_feature_difference": round(((half - full).norm(dim=1) / full.norm(dim=1)).max().item(), 4),
        "knn_label_agreement": round((labels["no"] == labels["bf16"]).float().mean().item(), 4),
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
    }))


if __name__ == "__main__":
    main()
