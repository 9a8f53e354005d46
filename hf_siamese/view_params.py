"""A view's random choices drawn explicitly on the host, and their application there.

``views.ViewRecipe`` draws a view's crop, flip and photometric parameters inside torchvision's transforms; a batched
accelerator pipeline needs them as numbers first. The draws here mirror torchvision's order and calls one for one
(``RandomResizedCrop.get_params``, the flip, then ``RandomApply(ColorJitter)``, ``RandomGrayscale``,
``RandomApply(GaussianBlur)``, ``RandomSolarize``), so that seeded views stay the same pixel for pixel.
"""

from functools import lru_cache
from typing import NamedTuple

import torch
import torch.nn.functional as F
from PIL import Image
from torchvision.transforms import v2

from .photometric_params import BRIGHTNESS, CONTRAST, HUE, IDENTITY, SATURATION, PhotometricParams
from .recipes import RecipeView

JITTER_PROBABILITY = 0.8  # every recipe's RandomApply([ColorJitter]) probability (views._photometric)
FLIP_PROBABILITY = 0.5
SOLARIZE_THRESHOLD = 128

# ColorJitter's operations by torchvision's number: the kernel, the PhotometricParams field, its no-op value.
_JITTER_STEPS = {
    BRIGHTNESS: (v2.functional.adjust_brightness, "brightness", 1.0),
    CONTRAST: (v2.functional.adjust_contrast, "contrast", 1.0),
    SATURATION: (v2.functional.adjust_saturation, "saturation", 1.0),
    HUE: (v2.functional.adjust_hue, "hue", 0.0),
}


_JITTER_FIELDS = ("brightness", "contrast", "saturation", "hue", "order")  # what ColorJitter draws, when it applies


class Crop(NamedTuple):
    """One view's crop box and flip, with the geometry row the dense term reads."""

    box: tuple[int, int, int, int]  # top, left, height, width, in pixels of the original image
    flipped: bool
    size: int  # the side of the square view the box is resized to
    geometry: torch.Tensor  # [top/H, left/W, height/H, width/W, flipped], as ViewRecipe.with_geometry reports it


def draw_crop(image_size: tuple[int, int], size: int, scale, ratio=(3 / 4, 4 / 3)) -> Crop:
    """The crop and flip ``v2.RandomResizedCrop`` then ``v2.RandomHorizontalFlip`` draw for an image of
    ``image_size`` = (height, width): the same calls on the global generator, so the same boxes and RNG state."""
    height, width = image_size
    box = _crop_drawer(tuple(scale), tuple(ratio)).make_params([torch.empty(0, height, width)])
    top, left, crop_height, crop_width = box["top"], box["left"], box["height"], box["width"]
    flipped = _coin(FLIP_PROBABILITY)
    geometry = torch.tensor([top / height, left / width, crop_height / height, crop_width / width, float(flipped)])
    return Crop((top, left, crop_height, crop_width), flipped, size, geometry)


@lru_cache(maxsize=None)
def _crop_drawer(scale: tuple[float, float], ratio: tuple[float, float]) -> v2.RandomResizedCrop:
    """torchvision's crop draw for one (scale, ratio), kept: it computes the ratio's logarithm once, not per view.
    Only its ``make_params`` is used, on an empty tensor of the image's shape; the size is not."""
    return v2.RandomResizedCrop(1, scale=scale, ratio=ratio)


def crop_pil(image: Image.Image, box, flipped: bool, size: int) -> Image.Image:
    """The drawn crop applied as ``ViewRecipe.with_geometry`` applies it: antialiased resized crop, then the flip."""
    view = v2.functional.resized_crop(image, *box, [size, size], antialias=True)
    return v2.functional.horizontal_flip(view) if flipped else view


def draw_photometric(view: RecipeView, num_channels: int) -> PhotometricParams:
    """The parameters ``views._photometric(view, ...)`` (without RandAugment) draws, consuming the same draws.

    The draws mirror torchvision's order so that seeded views stay the same. Every ``RandomApply`` and
    ``_RandomApplyTransform`` spends one ``torch.rand(1)`` even at probability 0 or 1; a skipped step draws nothing
    more; ``RandomGrayscale`` is absent (no draw) when the recipe's probability is 0. Steps not taken keep
    ``IDENTITY``'s values.
    """
    jitter, factors = 0.0, {}
    if _coin(JITTER_PROBABILITY):
        jitter, factors = 1.0, _draw_jitter(_jitter_strengths(view, num_channels))
    grayscale = float(bool(view.grayscale_probability) and _coin(view.grayscale_probability))
    blur = float(_coin(view.blur_probability))
    blur_sigma = _uniform(*view.blur_sigma) if blur else IDENTITY.blur_sigma  # GaussianBlur.make_params
    solarize = float(_coin(view.solarize_probability))
    jitter_fields = {name: getattr(IDENTITY, name) for name in _JITTER_FIELDS} | factors
    return PhotometricParams(jitter=jitter, **jitter_fields, grayscale=grayscale, blur=blur, blur_sigma=blur_sigma,
                             solarize=solarize)


def _coin(probability: float) -> bool:
    """RandomApply's test: the step runs unless ``torch.rand(1) >= p``, with p rounded to float32 as the tensor
    comparison rounds it (a float32 draw and a float32 threshold compare the same as Python floats)."""
    return torch.rand(1).item() < _float32(probability)


@lru_cache(maxsize=None)
def _float32(value: float) -> float:
    return torch.tensor(value, dtype=torch.float32).item()


def _uniform(low: float, high: float) -> float:
    """torchvision's factor and sigma draw: one float32 ``uniform_`` on a fresh 1-element tensor."""
    return float(torch.empty(1).uniform_(low, high).item())


def _jitter_strengths(view: RecipeView, num_channels: int) -> tuple[float, float, float, float]:
    """The ColorJitter arguments ``views._photometric`` passes: no saturation or hue for one-channel images."""
    brightness, contrast, saturation, hue = view.color_jitter
    return (brightness, contrast, 0.0, 0.0) if num_channels == 1 else (brightness, contrast, saturation, hue)


def _draw_jitter(strengths: tuple[float, float, float, float]) -> dict:
    """``ColorJitter.make_params``: ``randperm(4)``, then a factor per configured operation in b, c, s, h order.

    An operation of strength 0 is ``None`` in ColorJitter and draws nothing; its field keeps the no-op value.
    """
    order = tuple(float(op) for op in torch.randperm(4).tolist())
    factors = {}
    for op, strength in enumerate(strengths):
        _, name, centre = _JITTER_STEPS[op]
        if strength:
            low = -strength if op == HUE else max(centre - strength, 0.0)
            factors[name] = _uniform(low, centre + strength)
    return dict(order=order, **factors)


def apply_photometric_pil(view: Image.Image, params: PhotometricParams, kernel_size: int) -> Image.Image:
    """The recipe's colour and blur steps with drawn parameters, through the kernels torchvision's transforms call.

    A jitter factor at its no-op value (1, or hue 0) is skipped, as ColorJitter skips an operation of strength 0;
    PIL's enhancers copy the image at factor 1, but its hue kernel round-trips through HSV even at 0, so the one
    mismatch is a hue drawn as exactly 0.0 from a non-zero range (about one view in 2**24).
    """
    if params.jitter:
        view = _jitter_pil(view, params)
    if params.grayscale:
        view = v2.functional.rgb_to_grayscale(view, num_output_channels=len(view.getbands()))
    if params.blur:
        view = _blur(kernel_size).transform(view, {"sigma": [params.blur_sigma, params.blur_sigma]})
    if params.solarize:
        view = v2.functional.solarize(view, threshold=SOLARIZE_THRESHOLD)
    return view


def _jitter_pil(view: Image.Image, params: PhotometricParams) -> Image.Image:
    """``ColorJitter.transform``: the four adjustments in the drawn order."""
    for op in params.order:
        adjust, name, no_op = _JITTER_STEPS[int(op)]
        factor = getattr(params, name)
        if factor != no_op:
            view = adjust(view, factor)
    return view


class SeparableGaussianBlur(v2.GaussianBlur):
    """torchvision's ``GaussianBlur`` (same sigma draw, same kernel) computed as a row pass and a column pass.

    torchvision convolves with the full ``k x k`` kernel; a Gaussian is separable, so two 1-D passes give the same
    image (up to rounding) with ``2k`` instead of ``k^2`` multiply-adds per pixel.
    """

    def transform(self, inpt, params: dict):
        if not isinstance(inpt, Image.Image):
            return super().transform(inpt, params)
        size, sigma = self.kernel_size[0], params["sigma"][0]
        offsets = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
        weights = torch.softmax(-offsets.pow(2) / (2 * sigma * sigma), dim=0)
        pixels = v2.functional.pil_to_tensor(inpt).float()[None]
        channels, pad = pixels.shape[1], size // 2
        pixels = F.pad(pixels, [pad, pad, pad, pad], mode="reflect")
        pixels = F.conv2d(pixels, weights.view(1, 1, 1, size).expand(channels, 1, 1, size), groups=channels)
        pixels = F.conv2d(pixels, weights.view(1, 1, size, 1).expand(channels, 1, size, 1), groups=channels)
        return v2.functional.to_pil_image(pixels[0].round_().to(torch.uint8), mode=inpt.mode)


@lru_cache(maxsize=None)
def _blur(kernel_size: int) -> SeparableGaussianBlur:
    """The recipes' blur for one kernel size; its sigma comes with each call, so one instance serves every view."""
    return SeparableGaussianBlur(kernel_size)
