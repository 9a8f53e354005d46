"""Multi-view transforms: one image -> the source and target views that ``SiameseForPreTraining`` takes.

Recipes are torchvision ``transforms.v2`` pipelines on PIL images (timm's RandAugment works on PIL). The designs
of Wang et al. (CVPR 2022) change which views the two branches see:

* MultiCrop: extra small local crops, source only; global crops use scale (0.14, 1).
* ScaleMix: each global source view is two source views of the image mixed with a CutMix box (:func:`scale_mix`).
* AsymAug: the source recipe gains RandAugment; the target sees crop + flip + normalise only.
* MeanEnc: n target views per direction, averaged by the model.

The view layout is the model's: ``source = [global_1, (global_2), local_1, ...]``,
``target = [group_1 views..., (group_2 views...)]``. For a symmetric framework without asymmetric augmentation,
the global views are both branches' (as in BYOL and SimSiam, where each view passes through both branches): there is
then no target list, and the model takes each global source view as its own target group (SimSiam reuses the
source projection).
"""

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import default_collate
from torchvision.transforms import RandomResizedCrop, v2

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RAND_AUGMENT = "rand-m10-n2-mstd0.5"  # Asym-Siam's AsymAug source policy
EVAL_CROP_PCT = 0.875  # the ImageNet evaluation view: short side to size / 0.875 (256 for 224), centre crop


@dataclass(frozen=True)
class RecipeView:
    """One view's photometric settings; crop scale and size are chosen by the layout."""

    color_jitter: tuple[float, float, float, float]
    blur_probability: float
    solarize_probability: float
    grayscale_probability: float = 0.2
    blur_sigma: tuple[float, float] = (0.1, 2.0)


# MoCo v2 (Chen et al. 2020, "aug+"): jitter (0.4, 0.4, 0.4, 0.1) p=0.8, grayscale 0.2, blur p=0.5, flip.
# SimSiam uses the same recipe (Chen & He 2021, Sec. 4). Crop scale (0.2, 1).
_MOCOV2 = RecipeView(color_jitter=(0.4, 0.4, 0.4, 0.1), blur_probability=0.5, solarize_probability=0.0)
# BYOL (Grill et al. 2020, Table 6), also MoCo v3: jitter (0.4, 0.4, 0.2, 0.1) p=0.8, grayscale 0.2,
# blur p=1.0 / 0.1 and solarize p=0 / 0.2 on view 1 / view 2. Crop scale (0.08, 1).
_BYOL_1 = RecipeView(color_jitter=(0.4, 0.4, 0.2, 0.1), blur_probability=1.0, solarize_probability=0.0)
_BYOL_2 = RecipeView(color_jitter=(0.4, 0.4, 0.2, 0.1), blur_probability=0.1, solarize_probability=0.2)

# Small grayscale images (Fashion-MNIST, MNIST: 28 px, one channel), BYOL's asymmetric layout cut down to what
# acts on one channel: brightness and contrast only (saturation, hue and grayscale do nothing to an L image), a
# 3 px blur of sigma 0.1-1 px (BYOL's ~10%-of-the-image kernel at 28 px) and solarize on the second view only.
# Crop scale (0.2, 1) as in SimSiam's CIFAR experiments (Chen & He 2021, Sec. A): smaller crops of a centred
# 28 px garment show too little of it; on the validation split 0.2 beat 0.08 by 1.3 points and was level with 0.5
# (docs/benchmarks.md). Blur and solarize probabilities: BYOL's, but MoCo v2's p=0.5 blur on view 1; not tuned.
_SMALL_GRAY_1 = RecipeView(color_jitter=(0.4, 0.4, 0.0, 0.0), blur_probability=0.5, solarize_probability=0.0,
                           grayscale_probability=0.0, blur_sigma=(0.1, 1.0))
_SMALL_GRAY_2 = RecipeView(color_jitter=(0.4, 0.4, 0.0, 0.0), blur_probability=0.1, solarize_probability=0.2,
                           grayscale_probability=0.0, blur_sigma=(0.1, 1.0))

RECIPES: dict[str, tuple[RecipeView, RecipeView]] = {
    "mocov2": (_MOCOV2, _MOCOV2), "byol": (_BYOL_1, _BYOL_2), "small_gray": (_SMALL_GRAY_1, _SMALL_GRAY_2),
}
RECIPE_CROP_MIN = {"mocov2": 0.2, "byol": 0.08, "small_gray": 0.2}


def scale_mix(
    a: torch.Tensor, b: torch.Tensor, generator: torch.Generator | None = None
) -> torch.Tensor:
    """ScaleMix (Wang et al. 2022, Sec. 4.2): paste a CutMix box of ``b`` into ``a``.

    ``lambda ~ U(0, 1)``; the box is ``floor(H sqrt(1 - lambda)) x floor(W sqrt(1 - lambda))`` around a centre
    drawn uniformly over the image, clipped at the border. Because of the clipping the mean pasted fraction is
    about 0.32, not 0.5. Works on ``[..., H, W]`` tensors (one box for all leading dims), normalised or not.
    """
    if a.shape != b.shape:
        raise ValueError(f"scale_mix needs views of one shape, got {tuple(a.shape)} and {tuple(b.shape)}.")
    height, width = a.shape[-2:]
    lam, centre_y, centre_x = torch.rand(3, generator=generator).tolist()
    cut = math.sqrt(1.0 - lam)
    box_h, box_w = math.floor(height * cut), math.floor(width * cut)
    cy, cx = int(centre_y * height), int(centre_x * width)
    top, bottom = max(cy - box_h // 2, 0), min(cy + box_h // 2, height)
    left, right = max(cx - box_w // 2, 0), min(cx + box_w // 2, width)
    mixed = a.clone()
    mixed[..., top:bottom, left:right] = b[..., top:bottom, left:right]
    return mixed


def image_mode(num_channels: int) -> str:
    """The PIL mode a model with ``num_channels`` input channels is fed."""
    return "L" if num_channels == 1 else "RGB"


def _blur_kernel(size: int) -> int:
    """An odd kernel about a tenth of the image, as BYOL's 23 px at 224."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


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
        top, left, height, width = RandomResizedCrop.get_params(image, self.scale, (3 / 4, 4 / 3))
        view = v2.functional.resized_crop(image, top, left, height, width, [self.size, self.size], antialias=True)
        flipped = bool(torch.rand(()) < 0.5)
        if flipped:
            view = v2.functional.horizontal_flip(view)
        image_width, image_height = image.size
        geometry = torch.tensor(
            [top / image_height, left / image_width, height / image_height, width / image_width, float(flipped)]
        )
        return self.photometric(view), geometry


class MultiViewTransform:
    """One image -> ``{"source": [Tensor, ...], "target": [Tensor, ...]}`` in the model's view layout.

    Build it from a config with :meth:`from_config`; the arguments mirror the config fields.
    """

    def __init__(
        self,
        *,
        image_size: int,
        num_channels: int = 3,
        recipe: str = "mocov2",
        crop_min_scale: float | None = None,
        symmetric: bool = True,
        image_mean: tuple[float, ...] | None = None,
        image_std: tuple[float, ...] | None = None,
        multicrop_num_local: int = 0,
        multicrop_local_size: int = 96,
        multicrop_local_scale: tuple[float, float] = (0.05, 0.14),
        multicrop_global_scale: tuple[float, float] = (0.14, 1.0),
        scalemix_probability: float = 0.0,
        asym_aug: bool = False,
        mean_encoding_views: int = 1,
        return_geometry: bool = False,
    ):
        if recipe not in RECIPES:
            raise ValueError(f"`augmentation` must be one of {sorted(RECIPES)}, got {recipe!r}.")
        if multicrop_num_local and crop_min_scale is not None:
            raise ValueError(f"`crop_min_scale` ({crop_min_scale}) does not apply with MultiCrop, whose global crops use "
                             f"`multicrop_global_scale` ({list(multicrop_global_scale)}); set that instead.")
        self.num_channels = num_channels
        self.symmetric = symmetric
        self.num_local = multicrop_num_local
        self.scalemix_probability = scalemix_probability
        self.asym_aug = asym_aug
        self.mean_encoding_views = mean_encoding_views
        self.return_geometry = return_geometry
        self.mode = image_mode(num_channels)
        mean, std = channel_stats(num_channels, image_mean, image_std)
        crop_min = crop_min_scale if crop_min_scale is not None else RECIPE_CROP_MIN[recipe]
        global_scale = tuple(multicrop_global_scale) if multicrop_num_local else (crop_min, 1.0)
        first, second = RECIPES[recipe]
        rand_augment = _rand_augment(mean) if asym_aug else None

        def source(view: RecipeView, size: int, scale) -> ViewRecipe:
            return ViewRecipe(size, scale, _photometric(view, size, mean, std, num_channels, rand_augment))

        self.global_source = [source(first, image_size, global_scale), source(second, image_size, global_scale)]
        self.local_source = source(first, multicrop_local_size, tuple(multicrop_local_scale))
        if asym_aug:
            # AsymAug's weak target: crop (0.08, 1) + flip + normalise only.
            weak = ViewRecipe(image_size, (0.08, 1.0), v2.Compose(_to_normalised_tensor(mean, std)))
            self.global_target = [weak, weak]
        else:
            self.global_target = self.global_source

    @classmethod
    def from_config(cls, config) -> "MultiViewTransform":
        return cls(
            image_size=config.image_size,
            num_channels=config.num_channels,
            recipe=config.augmentation,
            crop_min_scale=config.crop_min_scale,
            symmetric=config.symmetric_loss,
            image_mean=config.image_mean,
            image_std=config.image_std,
            multicrop_num_local=config.multicrop_num_local if config.multicrop else 0,
            multicrop_local_size=config.multicrop_local_size,
            multicrop_local_scale=config.multicrop_local_scale,
            multicrop_global_scale=config.multicrop_global_scale,
            scalemix_probability=config.scalemix_probability if config.scalemix else 0.0,
            asym_aug=config.asym_aug,
            mean_encoding_views=config.mean_encoding_views if config.mean_encoding else 1,
            return_geometry=config.ladder_dense_weight > 0,
        )

    @property
    def num_target_groups(self) -> int:
        """Global source views per image, one per loss direction: the config's ``num_target_groups``."""
        return 2 if self.symmetric else 1

    def __call__(self, image: Image.Image | torch.Tensor) -> dict[str, list[torch.Tensor]]:
        image = self._as_pil(image)
        num_directions = self.num_target_groups
        # Which recipe each branch uses per direction: symmetric -> view d in both branches; one direction ->
        # source takes recipe 1, target recipe 2 (two independent views, as MoCo's query and key).
        source_recipes = list(range(num_directions))
        target_recipes = list(range(num_directions)) if self.symmetric else [1]
        same_views = self.symmetric and not self.asym_aug and self.mean_encoding_views == 1

        global_views = [self.global_source[r].with_geometry(image) for r in source_recipes]
        if same_views:
            # No target list: the model takes the source's global views. ScaleMix mixes only the source's.
            target = list(global_views) if self.scalemix_probability else []
        else:
            target = [
                self.global_target[r].with_geometry(image)
                for r in target_recipes
                for _ in range(self.mean_encoding_views)
            ]
        source = [(self._maybe_scale_mix(view, self.global_source[r], image), geometry)
                  for (view, geometry), r in zip(global_views, source_recipes)]
        source += [self.local_source.with_geometry(image) for _ in range(self.num_local)]
        views = {"source": [view for view, _ in source]}
        if target:
            views["target"] = [view for view, _ in target]
        if self.return_geometry:
            views["source_geometry"] = [geometry for _, geometry in source]
            if target:
                views["target_geometry"] = [geometry for _, geometry in target]
        return views

    def _maybe_scale_mix(self, view: torch.Tensor, recipe: Callable, image: Image.Image) -> torch.Tensor:
        if self.scalemix_probability and torch.rand(()) < self.scalemix_probability:
            return scale_mix(view, recipe(image))
        return view

    def _as_pil(self, image: Image.Image | torch.Tensor) -> Image.Image:
        if isinstance(image, torch.Tensor):
            image = v2.functional.to_pil_image(image)
        return image if image.mode == self.mode else image.convert(self.mode)


def collate_views(samples: list[dict[str, list[torch.Tensor]]]) -> dict[str, list[torch.Tensor]]:
    """Stack each view position into a batch: ``{"source_pixel_values": [...], "target_pixel_values": [...]}``
    (no target views when the global source views are both branches'; ``source_geometry``/``target_geometry``
    when the views carry their crop geometry).

    Stacking goes through ``default_collate``, which in a DataLoader worker stacks straight into shared memory
    instead of copying the batch there afterwards.
    """
    names = {"source": "source_pixel_values", "target": "target_pixel_values",
             "source_geometry": "source_geometry", "target_geometry": "target_geometry"}
    return {name: [default_collate([sample[key][i] for sample in samples]) for i in range(len(samples[0][key]))]
            for key, name in names.items() if key in samples[0]}


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


def _photometric(view: RecipeView, size, mean, std, num_channels, rand_augment) -> v2.Compose:
    """The colour and blur steps of a recipe, applied after the crop and flip (``ViewRecipe``)."""
    brightness, contrast, saturation, hue = view.color_jitter
    if num_channels == 1:
        saturation, hue = 0.0, 0.0  # no colour to change in a grayscale image
    steps = [rand_augment] if rand_augment is not None else []
    steps.append(v2.RandomApply([v2.ColorJitter(brightness, contrast, saturation, hue)], p=0.8))
    if view.grayscale_probability:
        steps.append(v2.RandomGrayscale(p=view.grayscale_probability))
    steps += [
        v2.RandomApply([SeparableGaussianBlur(_blur_kernel(size), sigma=view.blur_sigma)], p=view.blur_probability),
        v2.RandomSolarize(threshold=128, p=view.solarize_probability),
    ]
    return v2.Compose(steps + _to_normalised_tensor(mean, std))


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
