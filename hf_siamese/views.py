"""Multi-view transforms: one image -> the source and target views that ``SiameseForPreTraining`` takes.

Recipes are torchvision ``transforms.v2`` pipelines on PIL images (timm's RandAugment works on PIL). The designs
of Wang et al. (CVPR 2022) change which views the two branches see:

* MultiCrop: extra small local crops, source only; global crops use scale (0.14, 1).
* ScaleMix: each global source view is two source views of the image mixed with a CutMix box (:func:`scale_mix`).
* AsymAug: the source recipe gains RandAugment; the target sees crop + flip + normalise only.
* MeanEnc: n target views per direction, averaged by the model.

Which views are drawn, and under which of the model's argument names, is :class:`~hf_siamese.view_layout.ViewLayout`'s.
"""

import math
from collections.abc import Callable

import torch
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import v2

from .recipes import RECIPE_CROP_MIN, RECIPES, RecipeView, blur_kernel_size
from .photometric_params import IDENTITY
from .view_layout import (
    SOURCE_GEOMETRY, SOURCE_MIX_BOX, SOURCE_MIX_PHOTOMETRIC, SOURCE_MIX_PIXEL_VALUES, SOURCE_PHOTOMETRIC,
    SOURCE_PIXEL_VALUES, TARGET_GEOMETRY, TARGET_PHOTOMETRIC, TARGET_PIXEL_VALUES, ViewLayout,
)
from .view_params import SeparableGaussianBlur, crop_pil, draw_crop, draw_photometric

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_AUGMENT = "rand-m10-n2-mstd0.5"  # Asym-Siam's AsymAug source policy
EVAL_CROP_PCT = 0.875  # the ImageNet evaluation view: short side to size / 0.875 (256 for 224), centre crop


NO_MIX_BOX = (0, 0, 0, 0)  # an empty (top, bottom, left, right) box: nothing pasted


def scale_mix(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ScaleMix (Wang et al. 2022, Sec. 4.2): paste a CutMix box of ``b`` into ``a`` (:func:`draw_scale_mix_box`).

    Works on ``[..., H, W]`` tensors (one box for all leading dims), normalised or not.
    """
    if a.shape != b.shape:
        raise ValueError(f"scale_mix needs views of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    top, bottom, left, right = draw_scale_mix_box(*a.shape[-2:], generator=generator)
    mixed = a.clone()
    mixed[..., top:bottom, left:right] = b[..., top:bottom, left:right]
    return mixed


def draw_scale_mix_box(height: int, width: int, generator: torch.Generator | None = None) -> tuple[int, int, int, int]:
    """ScaleMix's box, ``(top, bottom, left, right)``: ``lambda ~ U(0, 1)``, ``floor(H sqrt(1 - lambda)) x
    floor(W sqrt(1 - lambda))`` around a centre drawn uniformly over the image, clipped at the border. Because of
    the clipping the mean pasted fraction is about 0.32, not 0.5."""
    lam, centre_y, centre_x = torch.rand(3, generator=generator).tolist()
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = math.floor(height * cut), math.floor(width * cut)
    cy, cx = int(centre_y * height), int(centre_x * width)
    return max(cy - box_h // 2, 0), min(cy + box_h // 2, height), max(cx - box_w // 2, 0), min(cx + box_w // 2, width)


def image_mode(num_channels: int) -> str:
    """The PIL mode a model with ``num_channels`` input channels is fed."""
    return "L" if num_channels == 1 else "RGB"


class ViewRecipe:
    """A RandomResizedCrop and horizontal flip whose geometry can be reported, then photometric steps.

    The geometry (``[top, left, height, width, flipped]``, the crop box as fractions of the original image) is
    what the Ladder's dense term needs to match cells of two views of one image.
    """

    def __init__(self, size: int, scale: tuple[float, float], photometric: v2.Compose):
        self.size = size
        self.scale = tuple(scale)
        self.photometric = photometric

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return self.with_geometry(image)[0]

    def with_geometry(self, image: Image.Image) -> tuple[torch.Tensor, torch.Tensor]:
        crop = draw_crop((image.height, image.width), self.size, self.scale)
        return self.photometric(crop_pil(image, crop.box, crop.flipped, self.size)), crop.geometry


class DeviceSplitView:
    """The host's half of a view whose colour steps run on the accelerator: the crop, flip (and AsymAug's
    RandAugment) applied here to a uint8 tensor, the colour steps' parameters drawn here, as :class:`ViewRecipe`
    draws them, for :func:`hf_siamese.device_augment.finish_views` to apply in batch."""

    def __init__(self, size: int, scale: tuple[float, float], view: RecipeView | None, num_channels: int,
                 rand_augment: Callable | None = None):
        self.size, self.scale, self.view = size, tuple(scale), view
        self.num_channels, self.rand_augment = num_channels, rand_augment

    def with_geometry(self, image: Image.Image) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """``({"pixel_values": uint8 view, "photometric": parameter row}, geometry)``; a view without colour steps
        gets the identity row."""
        crop = draw_crop((image.height, image.width), self.size, self.scale)
        view = crop_pil(image, crop.box, crop.flipped, self.size)
        if self.rand_augment is not None:
            view = self.rand_augment(view)
        params = draw_photometric(self.view, self.num_channels) if self.view is not None else IDENTITY
        return {"pixel_values": v2.functional.pil_to_tensor(view), "photometric": torch.tensor(params.as_row())}, \
            crop.geometry

    def mix_partner(self, image: Image.Image | None, like: torch.Tensor) -> dict[str, torch.Tensor]:
        """ScaleMix's second view of ``image`` and the box of it to paste, drawn as :func:`scale_mix` draws them;
        with ``image=None`` (no mix) an empty box over a blank view, so that every sample ships the same parts."""
        if image is None:
            partner = {"pixel_values": torch.zeros_like(like), "photometric": torch.tensor(IDENTITY.as_row())}
            box = NO_MIX_BOX
        else:
            partner = self.with_geometry(image)[0]
            box = draw_scale_mix_box(*like.shape[-2:])
        return {"mix_pixel_values": partner["pixel_values"], "mix_photometric": partner["photometric"],
                "mix_box": torch.tensor(box)}


_ARGUMENT_NAMES = {
    ("source", "pixel_values"): SOURCE_PIXEL_VALUES, ("source", "geometry"): SOURCE_GEOMETRY,
    ("source", "photometric"): SOURCE_PHOTOMETRIC, ("source", "mix_pixel_values"): SOURCE_MIX_PIXEL_VALUES,
    ("source", "mix_photometric"): SOURCE_MIX_PHOTOMETRIC, ("source", "mix_box"): SOURCE_MIX_BOX,
    ("target", "pixel_values"): TARGET_PIXEL_VALUES, ("target", "geometry"): TARGET_GEOMETRY,
    ("target", "photometric"): TARGET_PHOTOMETRIC,
}


class MultiViewTransform:
    """One image -> its views, keyed by the model's argument names (``source_pixel_values``, and
    ``target_pixel_values`` / ``source_geometry`` / ``target_geometry`` where the layout has them).

    Build it from a config with :meth:`from_config`; which views are drawn is the :class:`ViewLayout`'s.
    """

    def __init__(
        self,
        layout: ViewLayout,
        *,
        num_channels: int = 3,
        recipe: str = "mocov2",
        crop_min_scale: float | None = None,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        local_scale: tuple[float, float] = (0.05, 0.14),
        global_scale: tuple[float, float] = (0.14, 1.0),
        scalemix_probability: float = 0.0,
        asym_aug: bool = False,
        uint8_views: bool = False,
        augment_on_device: bool = False,
    ):
        if recipe not in RECIPES:
            raise ValueError(f"`augmentation` must be one of {sorted(RECIPES)}, got {recipe!r}.")
        if layout.num_local and crop_min_scale is not None:
            raise ValueError(f"`crop_min_scale` ({crop_min_scale}) does not apply with MultiCrop, whose global crops use "
                             f"`multicrop_global_scale` ({list(global_scale)}); set that instead.")
        self.layout, self.augment_on_device = layout, augment_on_device
        self.uint8_views = uint8_views or augment_on_device
        self.scalemix_probability = scalemix_probability if layout.scalemix else 0.0
        self.mode = image_mode(num_channels)
        mean, std = channel_stats(num_channels, image_mean, image_std)
        crop_min = crop_min_scale if crop_min_scale is not None else RECIPE_CROP_MIN[recipe]
        global_scale = tuple(global_scale) if layout.num_local else (crop_min, 1.0)
        first, second = RECIPES[recipe]
        finish = [v2.PILToTensor()] if self.uint8_views else _to_normalised_tensor(mean, std)
        source = _view_maker(num_channels, finish, _rand_augment(mean) if asym_aug else None, augment_on_device)
        self.global_source = [source(first, layout.image_size, global_scale),
                              source(second, layout.image_size, global_scale)]
        self.local_source = source(first, layout.local_size, tuple(local_scale))
        if asym_aug:  # the weak target: crop (0.08, 1) + flip only
            self.global_target = [source(None, layout.image_size, (0.08, 1.0))] * 2
        else:
            self.global_target = self.global_source

    @classmethod
    def from_config(cls, config, uint8_views: bool = False, augment_on_device: bool = False) -> "MultiViewTransform":
        """The config's views. ``uint8_views``: coloured here, normalised later; ``augment_on_device``: uint8 views
        with parameter rows, coloured and normalised later (both by :func:`hf_siamese.device_augment.finish_views`)."""
        return cls(
            ViewLayout.from_config(config),
            num_channels=config.num_channels,
            recipe=config.augmentation,
            crop_min_scale=config.crop_min_scale,
            image_mean=config.image_mean,
            image_std=config.image_std,
            local_scale=config.multicrop_local_scale,
            global_scale=config.multicrop_global_scale,
            scalemix_probability=config.scalemix_probability,
            asym_aug=config.asym_aug,
            uint8_views=uint8_views,
            augment_on_device=augment_on_device,
        )

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, list[torch.Tensor]]:
        image, layout = self._as_pil(image), self.layout
        global_views = [self.global_source[recipe].with_geometry(image) for recipe in layout.source_recipes()]
        if layout.shares_global_views:
            target = list(global_views) if layout.draws_target_views else []  # ScaleMix mixes only the source's
        else:
            target = [self.global_target[recipe].with_geometry(image) for recipe in layout.target_recipes()]
        source = [(self._maybe_scale_mix(view, self.global_source[recipe], image), geometry)
                  for (view, geometry), recipe in zip(global_views, layout.source_recipes())]
        source += [self.local_source.with_geometry(image) for _ in range(layout.num_local)]
        return self._named(source, target)

    def _named(self, source: list[tuple], target: list[tuple]) -> dict[str, list[torch.Tensor]]:
        """The views (their crop geometry with the dense term; their parameter rows and ScaleMix partners when
        coloured on the device) under the model's argument names."""
        views = {}
        for branch, drawn in (("source", source), ("target", target)):
            parts = [{**(view if isinstance(view, dict) else {"pixel_values": view}),
                      **({"geometry": geometry} if self.layout.geometry else {})} for view, geometry in drawn]
            for part in dict.fromkeys(name for view in parts for name in view):  # first-seen order
                views[_ARGUMENT_NAMES[branch, part]] = [view[part] for view in parts if part in view]
        return views

    def _maybe_scale_mix(self, view, recipe: ViewRecipe | DeviceSplitView, image: Image.Image):
        """The view mixed with a second view of the image (ScaleMix), or, with the colour steps on the device, the
        view with its partner and box for :func:`~hf_siamese.device_augment.finish_views` to mix."""
        if not self.scalemix_probability:
            return view
        mixed = bool(torch.rand(()) < self.scalemix_probability)
        if self.augment_on_device:
            return {**view, **recipe.mix_partner(image if mixed else None, like=view["pixel_values"])}
        return scale_mix(view, recipe(image)) if mixed else view

    def _as_pil(self, image: Image.Image | torch.Tensor) -> Image.Image:
        if isinstance(image, torch.Tensor):
            image = v2.functional.to_pil_image(image)
        return image if image.mode == self.mode else image.convert(self.mode)


def _view_maker(num_channels: int, finish: list, rand_augment: Callable | None, augment_on_device: bool) -> Callable:
    """``make(view, size, scale)``: one view's recipe, its colour steps on the host (then ``finish``: to a
    normalised or a uint8 tensor) or drawn for the device; a ``view`` of ``None`` has none (AsymAug's weak target)."""

    def make(view: RecipeView | None, size: int, scale) -> ViewRecipe | DeviceSplitView:
        if augment_on_device:
            return DeviceSplitView(size, scale, view, num_channels, None if view is None else rand_augment)
        if view is None:
            return ViewRecipe(size, scale, v2.Compose(finish))
        return ViewRecipe(size, scale, _photometric(view, size, finish, num_channels, rand_augment))

    return make


def collate_views(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """Stack each view position of each argument into a batch, under the same names.

    Stacking goes through ``default_collate``, which in a DataLoader worker stacks straight into shared memory
    instead of copying the batch there afterwards.
    """
    return {name: [_stacked([sample[name][i] for sample in samples]) for i in range(len(views))]
            for name, views in samples[0].items()}


def _stacked(tensors: list[torch.Tensor]) -> torch.Tensor:
    """One batch of ``tensors``; images whose memory is channels-last (``pil_to_tensor``'s uint8 views) are
    stacked as they lie, a copy rather than a transposition, into a channels-last batch of the same shape."""
    if tensors[0].dim() != 3:
        return default_collate(tensors)
    as_they_lie = [tensor.permute(1, 2, 0) for tensor in tensors]
    if all(tensor.is_contiguous() for tensor in as_they_lie):
        return default_collate(as_they_lie).permute(0, 3, 1, 2)
    return default_collate(tensors)


def channel_stats(num_channels, mean, std) -> tuple[tuple[float, ...], tuple[float, ...]]:
    if mean is None or std is None:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
        if num_channels == 1:
            mean, std = (sum(mean) / 3,), (sum(std) / 3,)
    if len(mean) != num_channels or len(std) != num_channels:
        raise ValueError(
            f"`image_mean` and `image_std` need {num_channels} values (num_channels), got {len(mean)} and {len(std)}."
        )
    return tuple(mean), tuple(std)


def _to_normalised_tensor(mean, std) -> list:
    return [v2.ToImage(), v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]


def _rand_augment(mean) -> Callable:
    from timm.data.auto_augment import rand_augment_transform

    fill = tuple(round(255 * m) for m in mean)
    return rand_augment_transform(RAND_AUGMENT, {"translate_const": 100, "img_mean": fill})


def _photometric(view: RecipeView, size, finish: list, num_channels, rand_augment) -> v2.Compose:
    """The colour and blur steps of a recipe, applied after the crop and flip (``ViewRecipe``)."""
    brightness, contrast, saturation, hue = view.color_jitter
    if num_channels == 1:
        saturation, hue = 0.0, 0.0  # no colour to change in a grayscale image
    steps = [rand_augment] if rand_augment is not None else []
    steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=0.8))
    if view.grayscale_probability:
        steps.append(v2.RandomGrayscale(p=view.grayscale_probability))
    steps += [
        v2.RandomApply([SeparableGaussianBlur(blur_kernel_size(size), sigma=view.blur_sigma)], p=view.blur_probability),
        v2.RandomSolarize(threshold=128, p=view.solarize_probability),
    ]
    return v2.Compose(steps + finish)


def eval_transform(image_size: int, num_channels: int, image_mean=None, image_std=None,
                   crop_pct: float = EVAL_CROP_PCT) -> v2.Compose:
    """Deterministic evaluation view, normalised as in training.

    ``crop_pct=1`` resizes the whole image to ``image_size``; below 1 it is the ImageNet protocol: resize the
    short side to ``image_size / crop_pct`` (256 for 224 at 0.875), then take the central ``image_size`` square.
    """
    if not 0 < crop_pct <= 1:
        raise ValueError(f"`crop_pct` must be in (0, 1], got {crop_pct}.")
    mean, std = channel_stats(num_channels, image_mean, image_std)
    if crop_pct == 1:
        geometry = [v2.Resize((image_size, image_size), antialias=True)]
    else:
        geometry = [v2.Resize(round(image_size / crop_pct), antialias=True), v2.CenterCrop(image_size)]
    return v2.Compose([*geometry, *_to_normalised_tensor(mean, std)])


def linear_probe_transform(image_size: int, num_channels: int, image_mean=None, image_std=None) -> v2.Compose:
    """Training view of the augmented linear probe (SimSiam, MoCo v3): RandomResizedCrop + flip, no colour."""
    mean, std = channel_stats(num_channels, image_mean, image_std)
    return v2.Compose([
        v2.RandomResizedCrop(image_size, antialias=True), v2.RandomHorizontalFlip(), *_to_normalised_tensor(mean, std)
    ])
