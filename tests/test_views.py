import numpy as np
import pytest
import torch
from conftest import tiny_config
from images import structured_images
from PIL import Image
from torchvision.transforms import v2

from hf_siamese.device_augment import finish_views
from hf_siamese.views import MultiViewTransform, ViewRecipe, collate_views, scale_mix

IMAGE = structured_images(1)[0]


def layout(config):
    views = MultiViewTransform.from_config(config)(IMAGE)
    target = [tuple(v.shape) for v in views["target_pixel_values"]] if "target_pixel_values" in views else None
    return [tuple(v.shape) for v in views["source_pixel_values"]], target, views


G, L = (3, 32, 32), (3, 16, 16)
DESIGNS = {
    "baseline": {},
    "multicrop": {"multicrop": True, "multicrop_local_size": 16, "multicrop_num_local": 3},
    "scalemix": {"scalemix": True},
    "asym_aug": {"asym_aug": True},
    "mean_encoding": {"mean_encoding": True, "mean_encoding_views": 3},
    "all": {
        "multicrop": True, "multicrop_local_size": 16, "multicrop_num_local": 3, "scalemix": True,
        "asym_aug": True, "mean_encoding": True, "mean_encoding_views": 3,
    },
}


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("framework", ["moco", "mocov3", "byol", "simsiam"])
def test_view_layout_for_every_design_and_framework(framework, design):
    fields = DESIGNS[design]
    config = tiny_config(framework, **fields)
    source, target, _ = layout(config)
    directions = 2 if config.symmetric_loss else 1
    num_local = fields.get("multicrop_num_local", 0)
    per_group = fields.get("mean_encoding_views", 1)
    assert source == [G] * directions + [L] * num_local
    same_views = config.symmetric_loss and not fields.get("asym_aug") and per_group == 1 and not fields.get("scalemix")
    assert target == (None if same_views else [G] * (directions * per_group))


def test_symmetric_baseline_gives_its_global_views_to_both_branches_by_omitting_targets():
    _, _, views = layout(tiny_config("byol"))
    assert "target_pixel_values" not in views and len(views["source_pixel_values"]) == 2
    _, _, moco_views = layout(tiny_config("moco"))
    assert len(moco_views["target_pixel_values"]) == 1


def test_scale_mix_with_probability_one_changes_every_source_view():
    torch.manual_seed(0)
    _, _, views = layout(tiny_config("byol", scalemix=True))
    assert all(s is not t for s, t in zip(views["source_pixel_values"], views["target_pixel_values"]))


def test_asym_aug_target_is_crop_and_flip_only():
    transform = MultiViewTransform.from_config(tiny_config("byol", asym_aug=True))
    steps = [type(step).__name__ for step in transform.global_target[0].photometric.transforms]
    assert steps == ["ToImage", "ToDtype", "Normalize"]
    assert transform.global_target[0].scale == (0.08, 1.0)
    source_steps = [type(step).__name__ for step in transform.global_source[0].photometric.transforms]
    assert "RandAugment" in source_steps


def test_multicrop_switches_global_scale_and_local_scale():
    transform = MultiViewTransform.from_config(tiny_config("moco", multicrop=True, multicrop_local_size=16))
    assert transform.global_source[0].scale == (0.14, 1.0)
    assert transform.local_source.scale == (0.05, 0.14)
    assert transform.local_source.size == 16
    baseline = MultiViewTransform.from_config(tiny_config("moco"))
    assert baseline.global_source[0].scale == (0.2, 1.0)
    assert MultiViewTransform.from_config(tiny_config("byol")).global_source[0].scale == (0.08, 1.0)


def test_crop_min_scale_with_multicrop_is_refused_naming_the_field_that_applies():
    config = tiny_config("moco", multicrop=True, multicrop_local_size=16, crop_min_scale=0.08)
    with pytest.raises(ValueError, match="`crop_min_scale`.*`multicrop_global_scale`"):
        MultiViewTransform.from_config(config)


def test_views_report_their_crop_geometry_when_asked():
    config = tiny_config("byol", ladder_levels=[3, 4], ladder_dense_weight=1.0)
    image = structured_images(1, size=40)[0]
    views = MultiViewTransform.from_config(config)(image)
    assert len(views["source_geometry"]) == 2 and "target_geometry" not in views  # the targets are the source's
    moco_views = MultiViewTransform.from_config(tiny_config("moco", ladder_levels=[3, 4], ladder_dense_weight=1.0))(image)
    assert len(moco_views["source_geometry"]) == len(moco_views["target_geometry"]) == 1
    for geometry in views["source_geometry"]:
        top, left, height, width, flipped = geometry.tolist()
        assert 0 <= top and 0 <= left and top + height <= 1 + 1e-6 and left + width <= 1 + 1e-6
        assert flipped in (0.0, 1.0)
    assert "source_geometry" not in MultiViewTransform.from_config(tiny_config("byol"))(image)


def test_view_geometry_describes_the_crop():
    # A left-to-right ramp: the mean of a crop tells where it was taken and whether it was flipped.
    ramp = Image.fromarray(np.tile(np.linspace(0, 255, 64).astype("uint8"), (64, 1)), "L")
    recipe = ViewRecipe(16, (0.1, 0.5), v2.Compose([v2.ToImage(), v2.ToDtype(torch.float32, scale=True)]))
    torch.manual_seed(0)
    for _ in range(10):
        view, geometry = recipe.with_geometry(ramp)
        top, left, height, width, flipped = geometry.tolist()
        assert view[0, 0, 0 if not flipped else -1].item() == pytest.approx(left, abs=0.05)
        assert view[0, 0, -1 if not flipped else 0].item() == pytest.approx(left + width, abs=0.05)


def test_grayscale_images_and_models():
    config = tiny_config("simsiam", num_channels=1, multicrop=True, multicrop_local_size=16, multicrop_num_local=2)
    views = MultiViewTransform.from_config(config)(structured_images(1, mode="L")[0])
    assert [tuple(v.shape) for v in views["source_pixel_values"]] == [(1, 32, 32)] * 2 + [(1, 16, 16)] * 2
    rgb_input = MultiViewTransform.from_config(config)(IMAGE)  # converted to the configured channels
    assert rgb_input["source_pixel_values"][0].shape[0] == 1


def test_collate_stacks_positions_and_names_them_as_the_model_does():
    transform = MultiViewTransform.from_config(tiny_config("simsiam"))
    batch = collate_views([transform(image) for image in structured_images(4)])
    assert list(batch) == ["source_pixel_values"]
    assert [tuple(v.shape) for v in batch["source_pixel_values"]] == [(4, *G)] * 2
    moco = MultiViewTransform.from_config(tiny_config("moco"))
    samples = [moco(image) for image in structured_images(4)]
    moco_batch = collate_views(samples)
    assert list(moco_batch) == ["source_pixel_values", "target_pixel_values"]
    assert torch.equal(moco_batch["target_pixel_values"][0][2], samples[2]["target_pixel_values"][0])


def test_uint8_views_collate_as_they_lie_and_reach_the_model_contiguous():
    # pil_to_tensor's views are channels-last in memory; stacking them as such is a copy, not a transposition.
    config = tiny_config("moco")
    for options in ({"augment_on_device": True}, {}):  # coloured where the model runs, or in the workers
        transform = MultiViewTransform.from_config(config, uint8_views=True, **options)
        samples = [transform(image) for image in structured_images(4)]
        batch = collate_views(samples)
        views = batch["source_pixel_values"][0]
        assert views.dtype == torch.uint8 and views.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(views, torch.stack([sample["source_pixel_values"][0] for sample in samples]))
        plain = {key: [tensor.contiguous() for tensor in tensors] for key, tensors in batch.items()}
        expected = finish_views(plain, config)["source_pixel_values"][0]
        finished = finish_views(batch, config)["source_pixel_values"][0]
        assert finished.is_contiguous() and torch.equal(finished, expected)
        asked = finish_views(batch, config, channels_last=True)["source_pixel_values"][0]
        assert asked.is_contiguous(memory_format=torch.channels_last) and torch.equal(asked, expected)
        assert all(rows.is_contiguous() for rows in batch.get("target_photometric", []))  # rows stack as before


def _collate_reporting_shared_memory(samples):
    """collate_views, plus whether each stacked tensor was born in shared memory (checked inside the worker)."""
    batch = collate_views(samples)
    return batch, [v.is_shared() for v in batch["source_pixel_values"] + batch["target_pixel_values"]]


def test_collate_in_a_worker_stacks_straight_into_shared_memory():
    # Otherwise the worker's queue copies every batch into shared memory again (~20 ms per 60 MB batch).
    transform = MultiViewTransform.from_config(tiny_config("moco", multicrop=True, multicrop_local_size=16,
                                                           multicrop_num_local=2))
    samples = [transform(image) for image in structured_images(4)]
    assert not any(v.is_shared() for v in collate_views(samples)["source_pixel_values"])  # no worker: plain tensors
    loader = torch.utils.data.DataLoader(samples, batch_size=4, num_workers=1,
                                         collate_fn=_collate_reporting_shared_memory)
    batch, born_shared = next(iter(loader))
    assert born_shared == [True] * (len(batch["source_pixel_values"]) + len(batch["target_pixel_values"]))
    assert torch.equal(batch["source_pixel_values"][0], collate_views(samples)["source_pixel_values"][0])


def test_scale_mix_shape_and_pixels_come_from_a_or_b():
    a, b = torch.randn(3, 40, 30), torch.randn(3, 40, 30)
    mixed = scale_mix(a, b, generator=torch.Generator().manual_seed(1))
    assert mixed.shape == a.shape
    from_a, from_b = mixed == a, mixed == b
    assert torch.all(from_a | from_b)
    assert torch.all(from_a.all(0) | from_b.all(0))  # whole pixels, all channels from one view


def test_scale_mix_mean_pasted_fraction_is_about_a_third():
    a, b = torch.zeros(1, 224, 224), torch.ones(1, 224, 224)
    generator = torch.Generator().manual_seed(0)
    fractions = torch.tensor([scale_mix(a, b, generator=generator).mean().item() for _ in range(10_000)])
    assert fractions.mean().item() == pytest.approx(0.32, abs=0.02)


def test_scale_mix_is_deterministic_under_a_seeded_generator():
    a, b = torch.randn(3, 32, 32), torch.randn(3, 32, 32)
    first = scale_mix(a, b, generator=torch.Generator().manual_seed(7))
    second = scale_mix(a, b, generator=torch.Generator().manual_seed(7))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="one shape"):
        scale_mix(a, b[:, :16])


@pytest.mark.parametrize("mode, size, kernel", [("RGB", 224, 23), ("L", 32, 3), ("RGB", 96, 9)])
def test_separable_blur_draws_and_blurs_as_torchvision(mode, size, kernel):
    from hf_siamese.views import SeparableGaussianBlur

    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).convert(mode)
    for seed in range(3):
        torch.manual_seed(seed)
        ours = np.asarray(SeparableGaussianBlur(kernel, sigma=(0.1, 2.0))(image)).astype(int)
        torch.manual_seed(seed)
        reference = np.asarray(v2.GaussianBlur(kernel, sigma=(0.1, 2.0))(image)).astype(int)
        assert ours.shape == reference.shape
        assert np.abs(ours - reference).max() <= 1  # float rounding of the two passes
        assert (ours != reference).mean() < 1e-3
    assert not np.array_equal(ours, np.asarray(image))  # it does blur
