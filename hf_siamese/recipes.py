"""The view recipes' photometric settings, as plain numbers.

Torch-free, so that the config can name the recipes it accepts (and be copied next to a checkpoint) while the
transforms that apply them live in :mod:`hf_siamese.views`.
"""

from dataclasses import dataclass


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
AUGMENTATIONS = tuple(RECIPES)


def blur_kernel_size(size: int) -> int:
    """The blur's odd kernel for views of ``size`` px: about a tenth of the view, as BYOL's 23 px at 224."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)
