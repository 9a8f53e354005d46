"""A view's photometric steps applied in batch on the accelerator, each sample with its own drawn parameters.

The host draws the parameters (:mod:`hf_siamese.photometric_params`), crops and flips, and ships uint8 views with
one parameter row per view; :func:`apply_photometric` then does what ``hf_siamese.views._photometric`` does on PIL
images, in the same order: ColorJitter (brightness, contrast, saturation, hue in the sample's drawn order),
grayscale, Gaussian blur, solarize, then normalisation. The host's images are uint8 between steps, so the device
works on grey levels (float32 holding integers 0-255) and quantises after every step where Pillow does, with
Pillow's arithmetic: ``Image.blend``'s float32 interpolation truncated to an integer for the three enhancers,
its integer luma for the grey they blend towards, its uint8 HSV for hue (from tables of its C formulas, one lookup
per pixel). The blur rounds as the host's; only its sums' order can differ (``tests/test_device_augment.py``).
"""

from collections.abc import Callable, Sequence
from functools import lru_cache, partial

import torch
import torch.nn.functional as F

from .photometric_params import BRIGHTNESS, CONTRAST, HUE, IDENTITY, PHOTOMETRIC_FIELDS, SATURATION
from .recipes import blur_kernel_size
from .view_params import SOLARIZE_THRESHOLD
from .view_layout import (
    SOURCE_MIX_BOX, SOURCE_MIX_PHOTOMETRIC, SOURCE_MIX_PIXEL_VALUES, SOURCE_PHOTOMETRIC, SOURCE_PIXEL_VALUES,
    TARGET_PHOTOMETRIC, TARGET_PIXEL_VALUES, ViewLayout,
)
from .views import channel_stats

_COLUMN = {name: index for index, name in enumerate(PHOTOMETRIC_FIELDS)}
_ORDER_COLUMNS = [_COLUMN[f"order_{position}"] for position in range(1, 5)]
_ENHANCER_COLUMNS = {BRIGHTNESS: _COLUMN["brightness"], CONTRAST: _COLUMN["contrast"],
                     SATURATION: _COLUMN["saturation"]}
_LUMA_WEIGHTS = (19595, 38470, 7471)  # Pillow's "L" conversion: ITU-R 601-2 in 16-bit fixed point, rounded
_MAX_LEVEL = 255
_CPU_CHUNK_ELEMENTS = 2**20  # values per chunk of views coloured on a CPU (4 MiB of float32)


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
    if views.device.type != "cpu":
        return _colour(views, params, kernel_size, mean, std)
    # On a CPU, every fresh batch-sized tensor costs page faults; chunks of views stay in the allocator's cache.
    chunk = max(1, _CPU_CHUNK_ELEMENTS // views[0].numel())
    return torch.cat([_colour(views[start : start + chunk], params[start : start + chunk], kernel_size, mean, std)
                      for start in range(0, len(views), chunk)])


def _colour(views: torch.Tensor, params: torch.Tensor, kernel_size: int, mean, std) -> torch.Tensor:
    """:func:`apply_photometric` on one batch, in place where it can."""
    images = _grey_levels(views)  # integers after every step, as the host's uint8 images
    images = _color_jitter(images, params)
    flagged = {name: params[:, _COLUMN[name]] > 0 for name in ("grayscale", "blur", "solarize")}
    images = _update_selected(images, flagged["grayscale"], to_grayscale)
    blur = partial(gaussian_blur, kernel_size=kernel_size)
    images = _update_selected(images, flagged["blur"], blur, params[:, _COLUMN["blur_sigma"]])
    images = _update_selected(images, flagged["solarize"], solarize)
    return normalize(images.mul_(1.0 / _MAX_LEVEL), mean, std)


def _update_selected(images: torch.Tensor, selected: torch.Tensor,
                    transform: Callable[..., torch.Tensor], *per_sample: torch.Tensor) -> torch.Tensor:
    """Transform the selected samples in place (with their ``per_sample`` rows): the others cost nothing, stay exact."""
    chosen = selected.nonzero().squeeze(1)
    if chosen.numel() == len(images):  # every sample: no gather and scatter
        return transform(images, *per_sample)
    if chosen.numel():
        images[chosen] = transform(images[chosen], *(values[chosen] for values in per_sample))
    return images


def _color_jitter(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """ColorJitter in each sample's order: at each of the four positions, the enhancers the samples drew there as
    one blend, then hue on the samples that drew it there."""
    jittered = params[:, _COLUMN["jitter"]] > 0
    shifts = params[:, _COLUMN["hue"]]
    for order_column in _ORDER_COLUMNS:
        drawn = torch.where(jittered, params[:, order_column].round(), -1.0)
        images = _enhance(images, params, drawn)
        # A zero shift is skipped as on the host: the HSV round trip is not the identity.
        images = _update_selected(images, (drawn == HUE) & (shifts != IDENTITY.hue), adjust_hue, shifts)
    return images


def _enhance(images: torch.Tensor, params: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """PIL's brightness, contrast and saturation enhancers are one blend towards a grey; each sample here blends
    towards its own enhancer's grey by its own factor (factor 1, for samples that drew hue or no jitter, is exact)."""
    factors = torch.ones_like(drawn)
    for operation, column in _ENHANCER_COLUMNS.items():
        factors = torch.where(drawn == operation, params[:, column], factors)
    if bool((factors == 1).all()):
        return images
    return _blend(_enhancer_greys(images, drawn), images, factors)


def _enhancer_greys(images: torch.Tensor, drawn: torch.Tensor) -> torch.Tensor:
    """Black for brightness (``ImageEnhance.Brightness``), the mean luma rounded to a level for contrast
    (``Contrast``: ``int(mean + 0.5)`` of ImageStat's double mean), the luma itself for saturation (``Color``)."""
    if not bool(((drawn == CONTRAST) | (drawn == SATURATION)).any()):
        return images.new_zeros(())
    grey = luma(images)
    mean = grey.sum(dim=(1, 2, 3), keepdim=True, dtype=torch.float64).div_(grey[0].numel())
    mean = mean.add_(0.5).floor_().to(images.dtype)
    contrast = torch.where(_per_sample(drawn == CONTRAST), mean, 0.0)
    return torch.where(_per_sample(drawn == SATURATION), grey, contrast)


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """One value per sample, shaped to broadcast over ``[B, C, H, W]``."""
    return values.view(-1, 1, 1, 1)


def luma(images: torch.Tensor) -> torch.Tensor:
    """Pillow's luma ``[B, 1, H, W]`` in grey levels (its ``convert("L")``), the grey the enhancers blend towards."""
    if images.shape[1] == 1:
        return images
    weighted = (images * images.new_tensor(_LUMA_WEIGHTS).view(1, 3, 1, 1)).sum(dim=1, keepdim=True)
    # Pillow's (r * 19595 + g * 38470 + b * 7471 + 0x8000) >> 16: integers below 2**24, exact in float32.
    return weighted.add_(1 << 15).mul_(2.0**-16).floor_()


def _blend(grey: torch.Tensor, images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Pillow's ``Image.blend(grey, image, factor)`` per sample: ``grey + factor * (image - grey)`` in float32,
    clipped and truncated to a level (floor, on levels clipped to be non-negative)."""
    blended = (images - grey).mul_(_per_sample(factors)).add_(grey)
    return blended.clamp_(0, _MAX_LEVEL).floor_()


# Pillow's hsv2rgb: which of (v, p, q, t) red, green and blue take in each sixth of the hue circle (i % 6).
_SECTOR_CHANNELS = ((0, 3, 1), (2, 0, 1), (1, 0, 3), (1, 2, 0), (3, 1, 0), (0, 1, 2))
_LEVELS = 256


def _pil_hue_levels(red: torch.Tensor, green: torch.Tensor, blue: torch.Tensor) -> torch.Tensor:
    """Pillow's ``rgb2hsv_row`` hue, rounded where its C code rounds: exact rationals miss 47k of 2**24 colours."""
    # C floats, double literals: rc = float((max - r) / cr); h = float(bc - gc), float(2.0 + rc - bc) or
    # float(4.0 + gc - rc) (exact in double, rounded once); h = float(fmod(h / 6.0 + 1.0, 1.0)); H = (int)(h * 255.0).
    minimum = torch.minimum(torch.minimum(red, green), blue)
    maximum = torch.maximum(torch.maximum(red, green), blue)
    grey = maximum == minimum
    chroma = (maximum - minimum).masked_fill_(grey, 1)
    red_c, green_c, blue_c = ((maximum - channel).div_(chroma).double() for channel in (red, green, blue))
    hue = torch.where(red == maximum, blue_c - green_c,
                      torch.where(green == maximum, 2 + red_c - blue_c, 4 + green_c - red_c)).float()
    hue = torch.fmod(hue.double() / 6 + 1, 1).float()
    return hue.double().mul_(255).trunc_().masked_fill_(grey, 0)  # grey: H = S = 0


def _pil_saturation_levels(chroma: torch.Tensor, maximum: torch.Tensor) -> torch.Tensor:
    """Pillow's ``rgb2hsv_row`` saturation, ``(int)(float(cr / max) * 255.0)`` (0 for grey), to tabulate it."""
    saturation = (chroma / maximum.clamp(min=1)).double().mul_(255).trunc_()
    return saturation.masked_fill_(chroma == 0, 0).clamp_(0, 255)  # entries with chroma > max are never read


def _pil_channel_factors() -> torch.Tensor:
    """Pillow's ``hsv2rgb`` as each output channel's double factor of V per (H, S), ``[3, 256 * 256]``, to tabulate."""
    # i = floor(h * 6.0 / 255.0); f = float(h * 6.0 / 255.0 - i); fs = float(s / 255.0); in double: p = v * (1.0 - fs),
    # q = v * (1.0 - float(fs * f)), t = v * (1.0 - fs * (1.0 - f)), each then rounded half away from zero.
    levels = torch.arange(_LEVELS, dtype=torch.float64)
    hue, saturation = torch.meshgrid(levels, levels, indexing="ij")
    sixths = hue * 6 / 255
    sector = sixths.floor()
    fraction, fs = (sixths - sector).float(), (saturation / 255).float()
    candidates = torch.stack([torch.ones_like(hue), 1 - fs.double(), 1 - (fs * fraction).double(),
                              1 - fs.double() * (1 - fraction.double())])
    roles = torch.tensor(_SECTOR_CHANNELS)[sector.long().remainder(6)].permute(2, 0, 1)
    return candidates.gather(0, roles).reshape(3, -1)


@lru_cache(maxsize=None)
def _pil_hsv_tables(device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pillow's conversions tabulated once per device: few inputs decide them, so one lookup replaces their math."""
    # Hue depends only on (r - g, g - b) (511 x 511 entries), saturation on (max - min, max), each hsv2rgb channel on
    # V times a factor of (H, S); entries no colour reaches are never read.
    differences = torch.arange(1 - _LEVELS, _LEVELS, dtype=torch.float32)
    red_minus_green, green_minus_blue = torch.meshgrid(differences, differences, indexing="ij")
    hue = _pil_hue_levels(red_minus_green, torch.zeros_like(red_minus_green), -green_minus_blue)
    levels = torch.arange(_LEVELS, dtype=torch.float32)
    saturation = _pil_saturation_levels(*torch.meshgrid(levels, levels, indexing="ij"))
    tables = (hue.flatten().to(torch.uint8), saturation.flatten().to(torch.uint8), _pil_channel_factors().flatten())
    return tuple(table.to(device) for table in tables)


def _look_up(table: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """``table[index]`` through ``index_select``, about twice as fast as indexing on CPU for these small tables."""
    return table.index_select(0, index.flatten()).view(index.shape)


def pil_rgb_to_hsv(rgb: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` RGB to HSV bit for bit as Pillow's ``convert("HSV")``, the host hue step's first half."""
    hue_table, saturation_table, _ = _pil_hsv_tables(rgb.device)
    channels = rgb.to(torch.int32)
    red, green, blue = channels.unbind(dim=1)
    minimum, maximum = torch.aminmax(channels, dim=1)
    span = 2 * _LEVELS - 1  # a difference of two channels runs from -255 to 255
    hue = _look_up(hue_table, (red - green + _LEVELS - 1).mul_(span).add_(green - blue + _LEVELS - 1))
    saturation = _look_up(saturation_table, (maximum - minimum).mul_(_LEVELS).add_(maximum))
    return torch.stack([hue, saturation, maximum.to(torch.uint8)], dim=1)


def pil_hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """uint8 ``[B, 3, H, W]`` HSV to RGB bit for bit as Pillow's ``convert("RGB")``, the host hue step's second half."""
    _, _, factors = _pil_hsv_tables(hsv.device)
    channels = hsv.to(torch.int32)
    channel_offsets = torch.arange(3, dtype=torch.int32, device=hsv.device).mul_(_LEVELS**2).view(1, 3, 1, 1)
    index = (channels[:, :1] * _LEVELS).add_(channels[:, 1:2]).add(channel_offsets)
    # (x + 0.5) truncated is C's round for every x >= 0 but 0.5 - 2**-54, which no v * factor gives (all 2**24 checked).
    return _look_up(factors, index).mul_(hsv[:, 2:3]).add_(0.5).to(torch.uint8)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate each sample's hue in Pillow's uint8 HSV, as the host's PIL ``adjust_hue``, so both paths agree exactly."""
    if images.shape[1] == 1:
        return images
    hsv = pil_rgb_to_hsv(images.to(torch.uint8))
    # H moves by np.int32(shift * 255) modulo 256; double, as the host's Python float (the row's float32) multiplies.
    turns = (shifts.double() * 255).trunc_().to(torch.int64).remainder_(_LEVELS).to(torch.uint8)
    hsv[:, 0] += turns.view(-1, 1, 1)  # uint8 wraps around, as numpy's uint8 sum in the host kernel
    return pil_hsv_to_rgb(hsv).to(images.dtype)


def to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Each sample's luma over all its channels, as the host's ``rgb_to_grayscale(num_output_channels=C)``."""
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
    return blurred.view(batch, channels, height, width).round_()  # the host rounds its float blur to uint8


def solarize(images: torch.Tensor) -> torch.Tensor:
    """Invert levels at or above 128 (``>=`` as torchvision's uint8 ``solarize``): level 128 flips on both paths."""
    # On integer levels, x >= 128 exactly when x >= 127.5, and 127.5 - |x - 127.5| is 255 - x there, x below it.
    middle = SOLARIZE_THRESHOLD - 0.5
    return images.sub_(middle).abs_().neg_().add_(middle)


def normalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """torchvision's ``Normalize`` arithmetic (subtract, then divide), so identity rows reproduce the host exactly."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub(mean).div_(std)


def finish_views(batch: dict, config, channels_last: bool = False) -> dict:
    """The model's inputs from a batch of uint8 views, where the views already are (the accelerator): each view
    coloured as its parameter row says (``augment_on_device``; ScaleMix's partners too, then pasted), then
    normalised, contiguous or channels-last if asked; what only travelled with the views is dropped. Views that
    arrive normalised pass through."""
    finished = _finished_views(batch, config)
    if not channels_last:
        return finished
    return {key: [view.contiguous(memory_format=torch.channels_last) if view.dim() == 4 else view for view in views]
            for key, views in finished.items()}


def _finished_views(batch: dict, config) -> dict:
    mean, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    finished = {key: value for key, value in batch.items() if key not in _SHIPPED_ONLY}
    if TARGET_PIXEL_VALUES in batch:
        finished[TARGET_PIXEL_VALUES] = _finished(batch, TARGET_PIXEL_VALUES, TARGET_PHOTOMETRIC, mean, std)
    if SOURCE_MIX_BOX not in batch:
        finished[SOURCE_PIXEL_VALUES] = _finished(batch, SOURCE_PIXEL_VALUES, SOURCE_PHOTOMETRIC, mean, std)
        return finished
    # ScaleMix on the device: where the targets are the unmixed global source views, those are coloured once.
    unmixed = finished.get(TARGET_PIXEL_VALUES, []) if ViewLayout.from_config(config).shares_global_views else []
    source = unmixed + _finished(batch, SOURCE_PIXEL_VALUES, SOURCE_PHOTOMETRIC, mean, std, skip=len(unmixed))
    partners = _finished(batch, SOURCE_MIX_PIXEL_VALUES, SOURCE_MIX_PHOTOMETRIC, mean, std)
    finished[SOURCE_PIXEL_VALUES] = _scale_mixed(source, partners, batch[SOURCE_MIX_BOX])
    return finished


def _finished(batch: dict, pixels_name: str, params_name: str, mean, std, skip: int = 0) -> list[torch.Tensor]:
    """The views under ``pixels_name`` from position ``skip`` on: coloured by their rows where rows came with them,
    normalised."""
    views = batch[pixels_name][skip:]
    if params_name not in batch:
        return [_normalized_levels(view, mean, std) for view in views]
    return [apply_photometric(view, rows, blur_kernel_size(view.shape[-1]), mean, std)
            for view, rows in zip(views, batch[params_name][skip:])]


_SHIPPED_ONLY = (SOURCE_PHOTOMETRIC, TARGET_PHOTOMETRIC, SOURCE_MIX_PIXEL_VALUES, SOURCE_MIX_PHOTOMETRIC, SOURCE_MIX_BOX)


def _scale_mixed(views: list[torch.Tensor], partners: list[torch.Tensor], boxes: list[torch.Tensor]) -> list:
    """The global source views (the first ``len(partners)``) with their partners' boxes pasted in; the rest as are."""
    return [paste_boxes(view, partner, box) for view, partner, box in zip(views, partners, boxes)] + \
        views[len(partners):]


def paste_boxes(views: torch.Tensor, partners: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
    """Each sample's ``(top, bottom, left, right)`` box of its partner pasted into its view, as
    :func:`hf_siamese.views.scale_mix` pastes one."""
    boxes = boxes.to(views.device).view(-1, 4, 1)
    rows = torch.arange(views.shape[-2], device=views.device)
    columns = torch.arange(views.shape[-1], device=views.device)
    inside_rows = (rows >= boxes[:, 0]) & (rows < boxes[:, 1])  # [B, H]
    inside_columns = (columns >= boxes[:, 2]) & (columns < boxes[:, 3])  # [B, W]
    inside = (inside_rows.unsqueeze(2) & inside_columns.unsqueeze(1)).unsqueeze(1)  # [B, 1, H, W]
    return torch.where(inside, partners, views)


def _normalized_levels(views: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """uint8 views as the host's ToDtype(float32, scale=True) and Normalize give them; float views unchanged."""
    if views.dtype != torch.uint8:
        return views
    return normalize(_grey_levels(views).mul_(1.0 / _MAX_LEVEL), mean, std)


def _grey_levels(views: torch.Tensor) -> torch.Tensor:
    """uint8 views as float32 grey levels, contiguous whatever layout they travelled in (collated channels-last):
    the layout changes in the same pass as the dtype."""
    return views.to(torch.float32, memory_format=torch.contiguous_format)
