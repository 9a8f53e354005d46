"""``apply_photometric`` against the host path: the same parameter rows applied per image with torchvision's
functional ops on PIL images (``view_params.apply_photometric_pil``), then ToImage/ToDtype/Normalize.

Differences are in grey levels (x255, before normalisation). The device quantises where PIL does, with PIL's
arithmetic, so every step but the blur gives the host's view bit for bit. The blur's float sums may land on the
other side of a rounding boundary: measured on 1024 images (32 px, ``natural_images``, seed 0; torch 2.14 CPU,
Pillow 13.0) one value in 3.1 million differed, by one level, in the one-channel chain; none in the others.
(Computed in float32 as torchvision's tensor kernels instead, the chain differed by up to 10 levels, mean 0.7.)
"""

import itertools
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as TF

from hf_siamese.device_augment import adjust_hue, apply_photometric, gaussian_kernels, pil_hsv_to_rgb, pil_rgb_to_hsv
from hf_siamese.photometric_params import IDENTITY, PHOTOMETRIC_FIELDS, PhotometricParams
from hf_siamese.view_params import apply_photometric_pil
from hf_siamese.views import IMAGENET_MEAN, IMAGENET_STD

KERNEL_SIZE = 7
GRAY_MEAN, GRAY_STD = (0.45,), (0.225,)
SINGLE_STEPS = ("brightness", "contrast", "saturation", "hue", "grayscale", "blur", "solarize")
FLOAT_SLACK = 1e-3  # float32 rounding of the normalisation undone, in grey levels
BLUR_MISMATCH_FRACTION = 1e-4  # values allowed one level off where a blur ran: its float sums' order


def natural_images(count: int, size: int = 32, seed: int = 0) -> torch.Tensor:
    """uint8 ``[count, 3, size, size]``: smooth colour gradients and a low-frequency wave plus pixel noise, some
    pixels clipped, as in photographs (saturated colours are where hue rotation is hardest)."""
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    rows, columns = ramp[:, None], ramp[None, :]
    images = []
    for _ in range(count):
        start, slope_y, slope_x = rng.uniform(0, 1, (3, 3, 1, 1))
        wave = 0.3 * np.sin(2 * np.pi * (rng.uniform(0.5, 2) * rows + rng.uniform(0.5, 2) * columns))
        pixels = start + (slope_y - 0.5) * rows + (slope_x - 0.5) * columns + wave * rng.uniform(-1, 1, (3, 1, 1))
        images.append(pixels + rng.normal(0, 0.03, (3, size, size)))
    return torch.from_numpy((np.clip(np.stack(images), 0, 1) * 255).round().astype(np.uint8))


def random_rows(count: int, seed: int = 0, hue: float = 0.1, flag_probability: float = 0.5) -> torch.Tensor:
    """Parameter rows drawn as the recipes draw them (factors in [0.6, 1.4], hue in [-hue, hue], sigma in
    [0.1, 2], a random order); every flag set with ``flag_probability``, so that most combinations of steps occur."""
    draws = torch.rand(9, count, generator=torch.Generator().manual_seed(seed))
    jitter, grayscale, blur, solarize = (draws[:4] < flag_probability).float()
    brightness, contrast, saturation = 0.6 + 0.8 * draws[4:7]
    hue_shift, sigma = hue * (2 * draws[7] - 1), 0.1 + 1.9 * draws[8]
    orders = torch.rand(count, 4, generator=torch.Generator().manual_seed(seed + 1)).argsort(dim=1).float()
    return torch.stack([jitter, brightness, contrast, saturation, hue_shift, *orders.T, grayscale, blur, sigma,
                        solarize], dim=1)


def rows_with_only(step: str, count: int, seed: int = 0) -> torch.Tensor:
    """Identity rows but for one step, on for every sample with its own random value (hue over the whole circle)."""
    drawn = random_rows(count, seed, hue=0.5)
    rows = torch.tensor(IDENTITY.as_row()).repeat(count, 1)
    column = PHOTOMETRIC_FIELDS.index
    if step in ("brightness", "contrast", "saturation", "hue"):
        rows[:, column("jitter")] = 1.0
        rows[:, column(step)] = drawn[:, column(step)]
    else:
        rows[:, column(step)] = 1.0
        rows[:, column("blur_sigma")] = drawn[:, column("blur_sigma")]
    return rows


def host_view(pixels: torch.Tensor, row: torch.Tensor, mean, std) -> torch.Tensor:
    """One view as the host pipeline computes it: ``view_params.apply_photometric_pil`` (torchvision's functional
    ops on a PIL image in the row's order, tested equal to the recipes' transforms), then the normalisation."""
    params = PhotometricParams.from_row(row.tolist())
    return normalised(apply_photometric_pil(TF.to_pil_image(pixels), params, KERNEL_SIZE), mean, std)


def normalised(image, mean, std) -> torch.Tensor:
    """The host pipeline's last steps: ToImage, ToDtype(float32, scale=True), Normalize."""
    return v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])(image)


def host_views(views: torch.Tensor, rows: torch.Tensor, mean, std) -> torch.Tensor:
    return torch.stack([host_view(pixels, row, mean, std) for pixels, row in zip(views, rows)])


def grey_level_difference(device: torch.Tensor, host: torch.Tensor, std) -> torch.Tensor:
    """|device - host| in grey levels: normalised values times std, times 255."""
    return (device - host).abs() * torch.tensor(std).view(1, -1, 1, 1) * 255


def compare(views: torch.Tensor, rows: torch.Tensor, mean=IMAGENET_MEAN, std=IMAGENET_STD) -> torch.Tensor:
    """Grey-level differences between ``apply_photometric`` and the host path on the same views and rows."""
    device = apply_photometric(views, rows, KERNEL_SIZE, mean, std)
    return grey_level_difference(device, host_views(views, rows, mean, std), std)


def assert_matches(difference: torch.Tensor, blurred: bool = False):
    """Equal to the host's view; where a blur ran, a rare value may be one level off."""
    off = difference > FLOAT_SLACK
    if not blurred:
        assert not off.any(), f"{int(off.sum())} values differ, by up to {difference.max():.3f} grey levels"
        return
    assert difference.max() <= 1 + FLOAT_SLACK, f"{difference.max():.3f} grey levels off"
    assert off.float().mean() <= BLUR_MISMATCH_FRACTION, f"{int(off.sum())} of {off.numel()} values one level off"


VIEWS = natural_images(128)


@pytest.mark.parametrize("step", SINGLE_STEPS)
def test_each_step_alone_matches_the_host(step):
    assert_matches(compare(VIEWS, rows_with_only(step, len(VIEWS))), blurred=step == "blur")


def test_the_whole_chain_matches_the_host():
    assert_matches(compare(VIEWS, random_rows(len(VIEWS))), blurred=True)


def test_the_chain_without_blur_is_the_host_chain_bit_for_bit():
    rows = random_rows(len(VIEWS))
    rows[:, PHOTOMETRIC_FIELDS.index("blur")] = 0.0
    assert_matches(compare(VIEWS, rows))


def test_one_channel_views_match_the_host():
    gray, rows = VIEWS[:, :1].clone(), random_rows(len(VIEWS))
    device = apply_photometric(gray, rows, KERNEL_SIZE, GRAY_MEAN, GRAY_STD)
    assert device.shape == gray.shape
    assert_matches(grey_level_difference(device, host_views(gray, rows, GRAY_MEAN, GRAY_STD), GRAY_STD),
                   blurred=True)


def test_hue_is_pils_uint8_hsv_rotation_bit_for_bit():
    """Shifts over the whole circle, at its ends, and below one step (``int(255 * shift)`` = 0 still round-trips)."""
    edges = torch.tensor([-0.5, 0.5, 1 / 255, -1 / 255, 0.5 / 255, -0.5 / 255, 1e-6, 100 / 255])
    shifts = torch.cat([rows_with_only("hue", len(VIEWS) - len(edges))[:, PHOTOMETRIC_FIELDS.index("hue")], edges])
    expected = torch.stack([TF.pil_to_tensor(TF.adjust_hue(TF.to_pil_image(view), shift))
                            for view, shift in zip(VIEWS, shifts.tolist())])
    assert torch.equal(adjust_hue(VIEWS.float(), shifts), expected.float())  # grey levels in, grey levels out


def as_pil_image(pixels: torch.Tensor, mode: str) -> Image.Image:
    """uint8 ``[N, 3]`` triples as a one-row PIL image of ``mode``, for Pillow's own conversions."""
    if mode == "RGB":
        return Image.fromarray(pixels.numpy()[None], "RGB")
    return Image.merge(mode, [Image.fromarray(np.ascontiguousarray(pixels[None, :, channel].numpy()), "L")
                              for channel in range(3)])


def through_tensor(convert, pixels: torch.Tensor) -> torch.Tensor:
    """``[N, 3]`` triples through a ``[B, 3, H, W]`` conversion, as one ``[1, 3, 1, N]`` image."""
    return convert(pixels.T.reshape(1, 3, 1, -1)).reshape(3, -1).T


def edge_colours() -> torch.Tensor:
    """Greys (max = min), pure primaries and secondaries, two channels tied at the max, near-greys, at every level."""
    level = torch.arange(256)
    zero, full = torch.zeros_like(level), torch.full_like(level, 255)
    triples = [(level, level, level), (level, zero, zero), (zero, level, zero), (zero, zero, level),
               (level, level, zero), (level, zero, level), (zero, level, level), (full, full, level),
               (level, full, full), (full, level, full), (level, level, (level + 1).clamp(max=255)),
               (level, (level - 1).clamp(min=0), level)]
    return torch.cat([torch.stack(triple, dim=1) for triple in triples]).to(torch.uint8)


def colours_per_hue_entry() -> torch.Tensor:
    """One colour (min channel 0) for each reachable ``(r - g, g - b)`` pair, the key of the device's hue table."""
    differences = torch.arange(-255, 256)
    red_minus_green, green_minus_blue = torch.meshgrid(differences, differences, indexing="ij")
    green = torch.stack([torch.zeros_like(red_minus_green), -red_minus_green, green_minus_blue]).amax(dim=0)
    colours = torch.stack([green + red_minus_green, green, green - green_minus_blue], dim=-1).reshape(-1, 3)
    return colours[colours.amax(dim=1) <= 255].to(torch.uint8)


def test_rgb_to_hsv_is_pillows_bit_for_bit():
    random = torch.randint(0, 256, (200_000, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    colours = torch.cat([random, edge_colours(), colours_per_hue_entry()])
    expected = torch.from_numpy(np.asarray(as_pil_image(colours, "RGB").convert("HSV"))[0].copy())
    assert torch.equal(through_tensor(pil_rgb_to_hsv, colours), expected)


def test_hsv_to_rgb_is_pillows_bit_for_bit():
    """Random triples, and every (H, S) pair (the device's factor table) at V = 255, 1 and a random level."""
    generator = torch.Generator().manual_seed(0)
    hue, saturation = torch.meshgrid(torch.arange(256), torch.arange(256), indexing="ij")
    values = (torch.full_like(hue, 255), torch.ones_like(hue), torch.randint(0, 256, hue.shape, generator=generator))
    grids = [torch.stack([hue, saturation, value], dim=-1).reshape(-1, 3) for value in values]
    triples = torch.cat([torch.randint(0, 256, (200_000, 3), generator=generator), *grids]).to(torch.uint8)
    expected = torch.from_numpy(np.asarray(as_pil_image(triples, "HSV").convert("RGB"))[0].copy())
    assert torch.equal(through_tensor(pil_hsv_to_rgb, triples), expected)


def test_a_zero_hue_shift_is_skipped_as_on_the_host():
    """The host skips hue 0; the device must not round-trip those colours through uint8 HSV either."""
    rows = rows_with_only("hue", len(VIEWS))
    rows[:, PHOTOMETRIC_FIELDS.index("hue")] = 0.0
    output = apply_photometric(VIEWS, rows, KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(output, normalised(VIEWS, IMAGENET_MEAN, IMAGENET_STD))
    assert torch.equal(output, host_views(VIEWS, rows, IMAGENET_MEAN, IMAGENET_STD))


def test_saturation_and_hue_leave_one_channel_views_alone():
    gray, rows = VIEWS[:, :1].clone(), torch.cat([rows_with_only(step, len(VIEWS)) for step in ("saturation", "hue")])
    expected = normalised(torch.cat([gray, gray]), GRAY_MEAN, GRAY_STD)
    assert torch.equal(apply_photometric(torch.cat([gray, gray]), rows, KERNEL_SIZE, GRAY_MEAN, GRAY_STD), expected)


def test_identity_parameters_give_the_normalised_input():
    rows = torch.tensor(IDENTITY.as_row()).repeat(len(VIEWS), 1)
    output = apply_photometric(VIEWS, rows, KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert torch.equal(output, normalised(VIEWS, IMAGENET_MEAN, IMAGENET_STD))


def rows_in_every_order(hue: float) -> torch.Tensor:
    """Strong jitter (brightness 1.4, contrast 0.6, saturation 1.4, the given hue shift), once in each of the 24
    orders, so that clamping and the grey each step blends towards make the order visible."""
    strong = PhotometricParams(1.0, 1.4, 0.6, 1.4, hue, (0.0, 1.0, 2.0, 3.0), 0.0, 0.0, 1.0, 0.0)
    return torch.tensor([replace(strong, order=tuple(map(float, order))).as_row()
                         for order in itertools.permutations(range(4))])


HUES = [0.25, 0.0]


@pytest.mark.parametrize("hue", HUES)
def test_each_order_matches_the_host(hue):
    rows = rows_in_every_order(hue)
    assert_matches(compare(VIEWS[:1].repeat(len(rows), 1, 1, 1), rows))


@pytest.mark.parametrize("hue", HUES)
def test_the_drawn_order_matters(hue):
    """Brightness, contrast, saturation, hue and the reverse order differ by many grey levels."""
    rows = rows_in_every_order(hue)[[0, -1]]
    device = apply_photometric(VIEWS[:1].repeat(2, 1, 1, 1), rows, KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    assert grey_level_difference(device[:1], device[1:], IMAGENET_STD).max() > 10


def test_a_batch_gives_what_each_sample_gives_alone():
    rows = random_rows(len(VIEWS), seed=1, flag_probability=0.7)
    batch = apply_photometric(VIEWS, rows, KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
    alone = torch.cat([apply_photometric(VIEWS[i : i + 1], rows[i : i + 1], KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
                       for i in range(len(VIEWS))])
    torch.testing.assert_close(batch, alone, rtol=0, atol=1e-5)


def test_solarize_inverts_from_128_on_as_torchvision():
    levels = torch.arange(256, dtype=torch.uint8).view(1, 1, 16, 16)
    rows = rows_with_only("solarize", 1)
    device = apply_photometric(levels, rows, KERNEL_SIZE, (0.0,), (1.0,))
    assert torch.equal((device * 255).round().to(torch.uint8), TF.solarize(levels, threshold=128))


def test_gaussian_kernels_are_the_host_blur_weights():
    sigmas = torch.tensor([0.1, 0.7, 2.0])
    offsets = torch.arange(KERNEL_SIZE, dtype=torch.float32) - (KERNEL_SIZE - 1) / 2
    expected = torch.stack([torch.softmax(-offsets.pow(2) / (2 * s * s), dim=0) for s in sigmas.tolist()])
    torch.testing.assert_close(gaussian_kernels(sigmas, KERNEL_SIZE), expected)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_matches_the_host():
    """Element-wise steps are IEEE float32 operations on both devices; the blur's sums (cuDNN's) may round apart."""
    rows = random_rows(len(VIEWS))
    on_cuda = apply_photometric(VIEWS.cuda(), rows.cuda(), KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD).cpu()
    assert_matches(grey_level_difference(on_cuda, host_views(VIEWS, rows, IMAGENET_MEAN, IMAGENET_STD),
                                         IMAGENET_STD), blurred=True)


def test_mismatched_parameter_rows_are_refused():
    with pytest.raises(ValueError, match="params"):
        apply_photometric(VIEWS, random_rows(len(VIEWS) - 1), KERNEL_SIZE, IMAGENET_MEAN, IMAGENET_STD)
