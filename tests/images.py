"""Small structured images for tests: coloured blocks on gradients, so augmentations change them visibly."""

import numpy as np
from PIL import Image


def structured_images(count: int, size: int = 32, mode: str = "RGB", seed: int = 0) -> list[Image.Image]:
    rng = np.random.default_rng(seed)
    images = []
    ramp = np.linspace(0, 1, size)
    for _ in range(count):
        base = rng.uniform(0, 1, 3)[None, None, :] * (0.5 + 0.5 * ramp[None, :, None])
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
        for _ in range(3):
            top, left = rng.integers(0, size - size // 4, 2)
            extent = rng.integers(size // 4, size // 2)
            pixels[top : top + extent, left : left + extent] = rng.uniform(0, 1, 3)
        image = Image.fromarray((pixels * 255).astype("uint8"), "RGB")
        images.append(image.convert(mode))
    return images


def textured_images(count: int, size: int = 32, seed: int = 0) -> list[Image.Image]:
    """Stationary textures (two colours in a fine random pattern): a crop keeps their statistics, colour
    augmentation changes them, as in natural images at the scale of a pooled feature."""
    rng = np.random.default_rng(seed)
    images = []
    for _ in range(count):
        colours = rng.uniform(0, 1, (2, 3))
        pattern = rng.uniform(0, 1, (size, size, 1)) < rng.uniform(0.3, 0.7)
        pixels = np.where(pattern, colours[0], colours[1])
        images.append(Image.fromarray((pixels * 255).astype("uint8"), "RGB"))
    return images
