"""A view's photometric steps applied in batch on the accelerator, each sample with its own drawn parameters.

The host draws the parameters (:mod:`hf_siamese.photometric_params`), crops and flips, and ships uint8 views with
one parameter row per view; :func:`apply_photometric` then does what ``hf_siamese.views._photometric`` does on PIL
images, in the same order: ColorJitter (brightness, contrast, saturation, hue in the sample's drawn order),
grayscale, Gaussian blur, solarize, then normalisation. The arithmetic is torchvision's tensor kernels' in float32
on [0, 1] (clamped after each jitter operation); PIL rounds to uint8 after every step, so the two paths differ by
a few grey levels at most (measured in ``tests/test_device_augment.py``).
"""

from collections.abc import Callable, Sequence
from functools import partial

import torch
import torch.nn.functional as F

from .photometric_params import BRIGHTNESS, CONTRAST, HUE, PHOTOMETRIC_FIELDS, SATURATION

_COLUMN = {name: index for index, name in enumerate(PHOTOMETRIC_FIELDS)}
_ORDER_COLUMNS = [_COLUMN[f"order_{position}"] for position in range(1, 5)]
_JITTER_FACTOR_COLUMNS = {BRIGHTNESS: _COLUMN["brightness"], CONTRAST: _COLUMN["contrast"],
                          SATURATION: _COLUMN["saturation"], HUE: _COLUMN["hue"]}
_LUMA_WEIGHTS = (0.2989, 0.587, 0.114)  # ITU-R 601-2, as torchvision's rgb_to_grayscale
SOLARIZE_THRESHOLD = 128 / 255  # RandomSolarize(threshold=128) on uint8: values >= 128 are inverted


def apply_photometric(views: torch.Tensor, params: torch.Tensor, kernel_size: int,
                      mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Jitter, grayscale, blur and solarize each view as its parameter row says, then normalise.

    ``views``: uint8 ``[B, C, H, W]`` (C = 1 or 3); ``params``: ``[B, len(PHOTOMETRIC_FIELDS)]`` rows of
    :class:`~hf_siamese.photometric_params.PhotometricParams`; ``kernel_size``: the blur's (odd) kernel, shared by the
    batch while each sample keeps its own sigma. Returns float32 ``[B, C, H, W]``, ``(x / 255 - mean) / std``.
    """
    if views.dtype != torch.uint8 or views.ndim != 4 or views.shape[1] not in (1, 3):
        raise ValueError(f"`views` must be uint8 [B, 1 or 3, H, W], got {views.dtype} {tuple(views.shape)}.")
    if params.shape != (views.shape[0], len(PHOTOMETRIC_FIELDS)):
        raise ValueError(f"`params` must be [{views.shape[0]}, {len(PHOTOMETRIC_FIELDS)}], got {tuple(params.shape)}.")
    params = params.to(device=views.device, dtype=torch.float32)
    images = views.to(torch.float32).mul_(1.0 / 255)  # as torchvision's ToDtype(float32, scale=True)
    images = _color_jitter(images, params)
    flagged = {name: params[:, _COLUMN[name]] > 0 for name in ("grayscale", "blur", "solarize")}
    images = _update_selected(images, flagged["grayscale"], to_grayscale)
    blur = partial(gaussian_blur, kernel_size=kernel_size)
    images = _update_selected(images, flagged["blur"], blur, params[:, _COLUMN["blur_sigma"]])
    images = _update_selected(images, flagged["solarize"], solarize)
    return normalize(images, mean, std)


def _update_selected(images: torch.Tensor, selected: torch.Tensor,
                    transform: Callable[..., torch.Tensor], *per_sample: torch.Tensor) -> torch.Tensor:
    """Transform the selected samples in place (with their ``per_sample`` rows): the others cost nothing, stay exact."""
    chosen = selected.nonzero().squeeze(1)
    if chosen.numel():
        images[chosen] = transform(images[chosen], *(values[chosen] for values in per_sample))
    return images


def _color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter in each sample's order: per position, each operation runs once on the samples that drew it there."""
    jittered = params[:, _COLUMN["jitter"]] > 0
    for order_column in _ORDER_COLUMNS:
        drawn = params[:, order_column].round().long()
        for operation, adjust in _JITTER_OPERATIONS.items():
            images = _update_selected(images, jittered & (drawn == operation), adjust,
                                     params[:, _JITTER_FACTOR_COLUMNS[operation]])
    return images


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """One value per sample, shaped to broadcast over ``[B, C, H, W]``."""
    return values.view(-1, 1, 1, 1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """ITU-R 601-2 luma ``[B, 1, H, W]``, the grey that contrast, saturation and grayscale move towards."""
    if images.shape[1] == 1:
        return images
    weights = images.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)
    return (images * weights).sum(dim=1, keepdim=True)


def _blend(images: torch.Tensor, grey: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """torchvision's ``_blend`` with one ratio per sample: ``factor * image + (1 - factor) * grey``, clamped."""
    factors = _per_sample(factors)
    return (images * factors + grey * (1 - factors)).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale each sample by its brightness factor, clamped as torchvision's ``adjust_brightness``."""
    return (images * _per_sample(factors)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend each sample with the mean of its grayscale image, as torchvision's tensor ``adjust_contrast``."""
    return _blend(images, luma(images).mean(dim=(1, 2, 3), keepdim=True), factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend each sample with its own grayscale image; a one-channel image has no colour to change."""
    if images.shape[1] == 1:
        return images
    return _blend(images, luma(images), factors)


def _rgb_to_hue_chroma_value(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """HSV hue (in sixths, sectors as torchvision's ``_rgb_to_hsv``), chroma and value: all a hue rotation needs."""
    red, green, blue = images.unbind(dim=1)
    minimum, value = torch.aminmax(images, dim=1)
    chroma = value - minimum
    safe_chroma = torch.where(chroma == 0, torch.ones_like(chroma), chroma)  # a grey pixel's hue does not matter
    hue = torch.where(value == red, (green - blue) / safe_chroma,
                      torch.where(value == green, (blue - red) / safe_chroma + 2, (red - green) / safe_chroma + 4))
    return hue, chroma, value


def _hue_chroma_value_to_rgb(hue: torch.Tensor, chroma: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """RGB from hue, chroma and value, as torchvision's ``_hsv_to_rgb`` (its ``v * s`` is the chroma)."""
    channel_offsets = hue.new_tensor([5.0, 3.0, 1.0]).view(1, 3, 1, 1)  # red, green, blue
    sector = (channel_offsets + hue.unsqueeze(1)).remainder_(6)
    ramp = torch.minimum(sector, 4 - sector).clamp_(0, 1)
    return (value.unsqueeze(1) - chroma.unsqueeze(1) * ramp).clamp_(0, 1)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's HSV hue by its shift (of the circle), as torchvision's tensor ``adjust_hue`` (not YIQ)."""
    if images.shape[1] == 1:
        return images
    hue, chroma, value = _rgb_to_hue_chroma_value(images)
    return _hue_chroma_value_to_rgb(hue + 6 * shifts.view(-1, 1, 1), chroma, value)


_JITTER_OPERATIONS = {BRIGHTNESS: adjust_brightness, CONTRAST: adjust_contrast, SATURATION: adjust_saturation,
                      HUE: adjust_hue}


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Each sample's luma over all its channels, as ``rgb_to_grayscale(num_output_channels=C)`` keeps C."""
    return luma(images).expand_as(images).clone()


def gaussian_kernels(sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """One normalised 1-D Gaussian ``[B, kernel_size]`` per sigma, with ``views.SeparableGaussianBlur``'s weights."""
    offsets = torch.arange(kernel_size, dtype=torch.float32, device=sigmas.device) - (kernel_size - 1) / 2
    sigmas = sigmas.to(torch.float32).unsqueeze(1)
    return torch.softmax(-offsets.pow(2) / (2 * sigmas * sigmas), dim=1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Each sample's own-sigma blur as one grouped depthwise convolution, row then column, as the host's blur."""
    batch, channels, height, width = images.shape
    planes = batch * channels
    weights = gaussian_kernels(sigmas, kernel_size).repeat_interleave(channels, dim=0)  # [B * C, k]
    pad = kernel_size // 2
    blurred = F.pad(images.reshape(1, planes, height, width), [pad, pad, pad, pad], mode="reflect")
    blurred = F.conv2d(blurred, weights.view(planes, 1, 1, kernel_size), groups=planes)
    blurred = F.conv2d(blurred, weights.view(planes, 1, kernel_size, 1), groups=planes)
    return blurred.view(batch, channels, height, width)


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Invert values at or above 128/255 (``>=`` as torchvision's uint8 ``solarize``): level 128 flips on both paths."""
    return torch.where(images >= SOLARIZE_THRESHOLD, 1 - images, images)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision's ``Normalize`` arithmetic (subtract, then divide), so identity rows reproduce the host exactly."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub(mean).div_(std)


def finish_views(batch: dict, config) -> dict:
    """The model's inputs from a batch shipped with ``augment_on_device``: every view coloured as its parameter
    row says and normalised, in batch, where the views already are (the accelerator); the rows are dropped."""
    from .recipes import blur_kernel_size
    from .view_layout import SOURCE_PHOTOMETRIC, SOURCE_PIXEL_VALUES, TARGET_PHOTOMETRIC, TARGET_PIXEL_VALUES
    from .views import channel_stats

    mean, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    finished = {key: value for key, value in batch.items() if key not in (SOURCE_PHOTOMETRIC, TARGET_PHOTOMETRIC)}
    for pixels_name, params_name in ((SOURCE_PIXEL_VALUES, SOURCE_PHOTOMETRIC), (TARGET_PIXEL_VALUES, TARGET_PHOTOMETRIC)):
        if params_name in batch:
            finished[pixels_name] = [apply_photometric(views, rows, blur_kernel_size(views.shape[-1]), mean, std)
                                     for views, rows in zip(batch[pixels_name], batch[params_name])]
    return finished
