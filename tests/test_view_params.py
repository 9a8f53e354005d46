"""Host-drawn view parameters reproduce today's seeded views bit for bit, with the recipes' distributions."""

import math

import numpy as np
import pytest
import torch
from PIL import Image
from scipy import stats
from torchvision.transforms import v2

from hf_siamese.photometric_params import IDENTITY, PhotometricParams
from hf_siamese.recipes import RECIPES
from hf_siamese.view_params import (
    JITTER_PROBABILITY, _coin, apply_photometric_pil, crop_pil, draw_crop, draw_photometric,
)
from hf_siamese.recipes import blur_kernel_size
from hf_siamese.views import _photometric, _to_normalised_tensor, channel_stats

SIZE = 40  # a 5 px blur kernel
SEEDS = range(60)
DRAWS = 4000
RECIPE_VIEWS = [(name, index) for name in RECIPES for index in (0, 1)]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for these 40 px tensors: waking a pool costs more than the work on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def noise_image(mode: str, width: int = SIZE, height: int = SIZE) -> Image.Image:
    """Every colour and brightness, so each photometric step changes some pixels."""
    pixels = np.random.default_rng(0).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels, "RGB").convert(mode)


def seeded(seed: int, draw):
    """``draw()`` under a seeded CPU generator, and the state it leaves; the global generator is restored after."""
    with torch.random.fork_rng(devices=[]):
        torch.default_generator.manual_seed(seed)
        return draw(), torch.get_rng_state()


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(("recipe", "index"), RECIPE_VIEWS)
def test_drawn_photometric_equals_todays_pipeline(recipe, index, mode):
    view, num_channels = RECIPES[recipe][index], len(mode)
    mean, std = channel_stats(num_channels, None, None)
    today = _photometric(view, SIZE, _to_normalised_tensor(mean, std), num_channels, None)
    normalise = v2.Compose(_to_normalised_tensor(mean, std))
    image = noise_image(mode)
    drawn = []

    def explicit():
        drawn.append(draw_photometric(view, num_channels))
        return normalise(apply_photometric_pil(image, drawn[-1], blur_kernel_size(SIZE)))

    for seed in SEEDS:
        expected, state_after_today = seeded(seed, lambda: today(image))
        actual, state_after_explicit = seeded(seed, explicit)
        assert torch.equal(actual, expected), (seed, drawn[-1])
        assert torch.equal(state_after_explicit, state_after_today)  # the same number of draws
    for flag, probability in [("jitter", JITTER_PROBABILITY), ("blur", view.blur_probability),
                              ("solarize", view.solarize_probability), ("grayscale", view.grayscale_probability)]:
        seen = {getattr(params, flag) for params in drawn}
        assert seen == {0.0, 1.0} if 0 < probability < 1 else seen == {float(probability)}, flag


@pytest.mark.parametrize("mode", ["RGB", "L"])
@pytest.mark.parametrize(("width", "height", "scale"), [(57, 43, (0.08, 1.0)), (43, 57, (0.2, 1.0)),
                                                        (100, 20, (0.9, 1.0)), (20, 100, (0.9, 1.0))])  # fallbacks
def test_drawn_crop_equals_torchvisions_crop_and_flip(mode, width, height, scale):
    image = noise_image(mode, width, height)
    torchvision_view = v2.Compose([v2.RandomResizedCrop(SIZE, scale, antialias=True), v2.RandomHorizontalFlip(),
                                   v2.PILToTensor()])
    flips = set()
    for seed in range(20):
        expected_view, state_after_torchvision = seeded(seed, lambda: torchvision_view(image))
        crop, state_after_explicit = seeded(seed, lambda: draw_crop((height, width), SIZE, scale))
        assert torch.equal(state_after_explicit, state_after_torchvision)  # the same draws
        pixels = v2.functional.pil_to_tensor(crop_pil(image, crop.box, crop.flipped, crop.size))  # as DeviceSplitView
        assert pixels.dtype == torch.uint8 and pixels.shape == (len(mode), SIZE, SIZE)
        assert torch.equal(pixels, expected_view)
        top, left, crop_height, crop_width = crop.box
        assert crop.geometry.tolist() == pytest.approx(
            [top / height, left / width, crop_height / height, crop_width / width, float(crop.flipped)])
        flips.add(crop.flipped)
    assert flips == {False, True}


@pytest.mark.parametrize("probability", [0.7, 0.8, 0.5])  # float32(0.7) < 0.7 < float32(0.8)
def test_coins_compare_in_float32_as_random_apply_does(monkeypatch, probability):
    threshold = torch.tensor([probability], dtype=torch.float32)
    for draw in (threshold, threshold.nextafter(torch.zeros(1)), threshold.nextafter(torch.ones(1))):
        random_apply_runs = not bool(draw >= probability)
        monkeypatch.setattr(torch, "rand", lambda *size, value=draw.clone(): value)
        assert _coin(probability) == random_apply_runs, draw.item()


def test_identity_params_leave_the_view_unchanged():
    image = noise_image("RGB")
    assert np.array_equal(np.asarray(apply_photometric_pil(image, IDENTITY, 5)), np.asarray(image))


def draw_many(recipe: str, index: int, num_channels: int = 3) -> list[PhotometricParams]:
    draws, _ = seeded(1234, lambda: [draw_photometric(RECIPES[recipe][index], num_channels) for _ in range(DRAWS)])
    return draws


@pytest.fixture(scope="module")
def byol_second():
    """BYOL's second view: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2, blur 0.1, solarize 0.2."""
    return draw_many("byol", 1)


def assert_binomial(flags, probability: float):
    """The observed rate lies within five binomial standard deviations of ``probability``."""
    band = 5 * math.sqrt(probability * (1 - probability) / len(flags))
    assert abs(np.mean(flags) - probability) <= band, (np.mean(flags), probability)


def assert_uniform(samples, low: float, high: float):
    assert min(samples) >= low and max(samples) <= high
    assert stats.kstest(samples, "uniform", args=(low, high - low)).pvalue > 1e-3


@pytest.mark.parametrize(("flag", "probability"), [("jitter", 0.8), ("grayscale", 0.2), ("blur", 0.1),
                                                   ("solarize", 0.2)])
def test_flags_follow_their_probabilities(byol_second, flag, probability):
    assert_binomial([getattr(params, flag) for params in byol_second], probability)


def test_mocov2_blurs_half_the_views():
    assert_binomial([params.blur for params in draw_many("mocov2", 0)], 0.5)


@pytest.mark.parametrize(("field", "low", "high"), [("brightness", 0.6, 1.4), ("contrast", 0.6, 1.4),
                                                    ("saturation", 0.8, 1.2), ("hue", -0.1, 0.1)])
def test_jitter_factors_are_uniform(byol_second, field, low, high):
    assert_uniform([getattr(params, field) for params in byol_second if params.jitter], low, high)


@pytest.mark.parametrize(("recipe", "index", "low", "high"), [("byol", 0, 0.1, 2.0), ("small_gray", 0, 0.1, 1.0)])
def test_blur_sigma_is_uniform(recipe, index, low, high):
    assert_uniform([params.blur_sigma for params in draw_many(recipe, index) if params.blur], low, high)


def test_order_is_a_permutation_and_skipped_steps_are_no_ops(byol_second):
    assert all(sorted(params.order) == [0.0, 1.0, 2.0, 3.0] for params in byol_second)
    assert len({params.order for params in byol_second}) == 24
    skipped = [params for params in byol_second if not params.jitter]
    assert all((p.brightness, p.contrast, p.saturation, p.hue, p.order) == (1.0, 1.0, 1.0, 0.0, IDENTITY.order)
               for p in skipped)
    assert all(params.blur_sigma == IDENTITY.blur_sigma for params in byol_second if not params.blur)


def test_one_channel_views_draw_no_saturation_or_hue():
    draws = draw_many("mocov2", 0, num_channels=1)
    assert {(params.saturation, params.hue) for params in draws} == {(1.0, 0.0)}
    assert_uniform([params.brightness for params in draws if params.jitter], 0.6, 1.4)


def test_rows_round_trip(byol_second):
    assert all(PhotometricParams.from_row(params.as_row()) == params for params in byol_second)
