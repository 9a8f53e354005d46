"""Which views of an image each branch sees, in the order the model takes them: one layout, read by the
transform that draws the views, the collate function that batches them and the model that encodes them.

The source branch takes ``[global_1, (global_2), local_1, ...]``: one global view per loss direction (two with a
symmetric loss), then MultiCrop's local crops. The target branch takes one group per direction, of
``target_views_per_group`` views each (several with MeanEnc, whose target is their mean). Global source view ``d``
is paired with target group ``num_groups - 1 - d``; local crops with every group. When the global views are both
branches' (a symmetric loss without AsymAug or MeanEnc, as BYOL and SimSiam), no target views are drawn and each
global source view is its own target group; ScaleMix then keeps the unmixed draws as the targets.

Torch-free (it only arranges lists), so that the config and the checkpoint's copied code can both import it.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

SOURCE_PIXEL_VALUES = "source_pixel_values"
TARGET_PIXEL_VALUES = "target_pixel_values"
SOURCE_GEOMETRY = "source_geometry"
TARGET_GEOMETRY = "target_geometry"
# With the colour steps on the accelerator: each view's photometric parameter row, beside its uint8 pixels.
SOURCE_PHOTOMETRIC = "source_photometric"
TARGET_PHOTOMETRIC = "target_photometric"
# ScaleMix with the colour steps on the accelerator: each global source view's partner (uint8 pixels and parameter
# row) and the box of it pasted into the view, (top, bottom, left, right); an empty box where the view is not mixed.
SOURCE_MIX_PIXEL_VALUES = "source_mix_pixel_values"
SOURCE_MIX_PHOTOMETRIC = "source_mix_photometric"
SOURCE_MIX_BOX = "source_mix_box"


@dataclass(frozen=True)
class ViewLayout:
    """The views of one image for both branches, derived from a config with :meth:`from_config`."""

    num_groups: int  # global source views = target groups = loss directions
    image_size: int
    num_local: int = 0
    local_size: int = 96
    target_views_per_group: int = 1  # MeanEnc's views per target
    shares_global_views: bool = False  # the global source views are also the targets (no target views drawn)
    scalemix: bool = False
    geometry: bool = False  # each view's crop box travels with it (the Ladder's dense term)
    framework: str = ""  # named in input errors

    @classmethod
    def from_config(cls, config) -> "ViewLayout":
        views_per_group = config.mean_encoding_views if config.mean_encoding else 1
        return cls(
            num_groups=config.num_target_groups,
            image_size=config.image_size,
            num_local=config.multicrop_num_local if config.multicrop else 0,
            local_size=config.multicrop_local_size,
            target_views_per_group=views_per_group,
            shares_global_views=bool(config.symmetric_loss) and not config.asym_aug and views_per_group == 1,
            scalemix=config.scalemix and config.scalemix_probability > 0,
            geometry=config.ladder_dense_weight > 0,
            framework=config.framework,
        )

    @property
    def draws_target_views(self) -> bool:
        """Whether the transform emits target views: always, unless the global source views are the targets
        (then only ScaleMix, whose targets are the unmixed draws)."""
        return not self.shares_global_views or self.scalemix

    def source_recipes(self) -> list[int]:
        """The recipe (first or second view of the paper's pair) of each global source view."""
        return list(range(self.num_groups))

    def target_recipes(self) -> list[int]:
        """The recipe of each target view: group ``g`` uses recipe ``g``, or the second with one direction (as
        MoCo's key is another view than its query)."""
        group_recipes = range(self.num_groups) if self.num_groups > 1 else [1]
        return [recipe for recipe in group_recipes for _ in range(self.target_views_per_group)]

    def read(self, source: Sequence, target: Sequence | None, source_geometry: Sequence | None,
             target_geometry: Sequence | None) -> "ModelViews":
        """The model's inputs arranged in target groups, after checking that they fit this layout."""
        self._check_sources(source, target)
        if target is None:
            groups = [[view] for view in source[:self.num_groups]]
            group_geometry = None if source_geometry is None else list(source_geometry[:self.num_groups])
        else:
            size = self._group_size(target)
            groups = [list(target[start:start + size]) for start in range(0, len(target), size)]
            group_geometry = None if target_geometry is None else list(target_geometry[::size])
        if self.geometry and (source_geometry is None or group_geometry is None):
            raise ValueError(
                f"`{SOURCE_GEOMETRY}` and `{TARGET_GEOMETRY}` are required when `ladder_dense_weight` > 0 (the dense "
                "term matches cells by crop geometry); build the views with MultiViewTransform.from_config."
            )
        return ModelViews(list(source), groups, target is None, source_geometry, group_geometry)

    def _check_sources(self, source: Sequence, target: Sequence | None) -> None:
        if len(source) < self.num_groups:
            raise ValueError(
                f"`{SOURCE_PIXEL_VALUES}` needs at least {self.num_groups} global view(s) for framework "
                f"{self.framework!r} (symmetric_loss={self.num_groups > 1}), got {len(source)}."
            )
        if target is None and self.num_groups == 1:
            raise ValueError(
                f"`{TARGET_PIXEL_VALUES}` is required with one loss direction (framework {self.framework!r}): "
                "the target view must be another view of the image than the source's."
            )

    def _group_size(self, target: Sequence) -> int:
        if not target or len(target) % self.num_groups:
            raise ValueError(f"`{TARGET_PIXEL_VALUES}` must hold {self.num_groups} group(s) of equal size, got "
                             f"{len(target)} views.")
        return len(target) // self.num_groups


@dataclass
class ModelViews:
    """One batch's views as the model encodes them: the source views (globals first), the target groups, and
    each source view's and each group's crop geometry (``None`` without the dense term)."""

    source: list[Any]
    groups: list[list[Any]]
    groups_are_sources: bool  # no target views were given: group d is global source view d
    source_geometry: Sequence[Any] | None = None
    group_geometry: list[Any] | None = None

    @property
    def num_groups(self) -> int:
        return len(self.groups)


def paired_group(direction: int, num_groups: int) -> int:
    """The target group whose target global source view ``direction`` predicts: the other view's (symmetric),
    or the only group."""
    return num_groups - 1 - direction
