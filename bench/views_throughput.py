"""Views per second of the multi-view transform for the baseline and each view-changing design.

Single process, no DataLoader: this measures the transform itself (decode excluded). Images are 256 x 256 RGB
textures, views at 224 px (locals at 96), as on ImageNet. One JSON line per design.

    python bench/views_throughput.py [--images 64] [--image_size 224] [--framework moco]
"""

import argparse
import json
import platform
import time

import numpy as np
import torch
from PIL import Image

from hf_siamese import SiameseConfig
from hf_siamese.views import MultiViewTransform

DESIGNS = {
    "baseline": {},
    "multicrop": {"multicrop": True},
    "scalemix": {"scalemix": True},
    "asym_aug": {"asym_aug": True},
}


def make_images(count: int, size: int, seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        colours = rng.integers(0, 256, (2, 3), dtype=np.uint8)
        pattern = rng.random((size, size, 1)) < 0.5
        images.append(Image.fromarray(np.where(pattern, colours[0], colours[1]).astype(np.uint8), "RGB"))
    return images


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--framework", default="moco")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    torch.set_num_threads(1)  # a DataLoader worker's share
    images = make_images(args.images, round(args.image_size * 256 / 224))
    for design, fields in DESIGNS.items():
        config = SiameseConfig(backbone="resnet50", framework=args.framework, image_size=args.image_size, **fields)
        transform = MultiViewTransform.from_config(config)
        views_per_image = sum(len(v) for v in transform(images[0]).values())
        timings = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            for image in images:
                transform(image)
            timings.append(time.perf_counter() - start)
        seconds = float(np.median(timings))
        print(json.dumps({
            "bench": "views_throughput",
            "design": design,
            "framework": args.framework,
            "image_size": args.image_size,
            "views_per_image": views_per_image,
            "images_per_s": round(args.images / seconds, 1),
            "views_per_s": round(args.images * views_per_image / seconds, 1),
            "threads": 1,
            "machine": platform.machine(),
        }))


if __name__ == "__main__":
    main()
