"""Source/target variance: the central quantity of Wang et al. (CVPR 2022, Sec. 3.3).

The paper's finding: keeping the variance of the target's encodings lower than the source's helps. For K
augmented views of each of N images, with unit-norm embeddings ``z``, the unbiased per-image variance is
``K / (K - 1) * (1 - ||mean_k z_k||^2)``; :func:`view_variance` averages it over images.
:class:`VarianceMonitor` measures it for both branches on a fixed probe set, loggable during training.
"""

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .view_layout import SOURCE_PIXEL_VALUES, TARGET_PIXEL_VALUES


def view_variance(embeddings: torch.Tensor) -> torch.Tensor:
    """Mean over images of the unbiased variance of ``K`` unit embeddings per image.

    Args:
        embeddings: ``[K, N, D]``, K views of N images, each row L2-normalised.

    Example:
        >>> same = F.normalize(torch.randn(1, 10, 32), dim=-1).expand(4, 10, 32)  # 4 identical views
        >>> round(float(view_variance(same)), 6)
        0.0
    """
    num_views = embeddings.shape[0]
    if num_views < 2:
        raise ValueError(f"view_variance needs at least 2 views per image, got K={num_views}.")
    mean_norm_sq = embeddings.float().mean(dim=0).pow(2).sum(dim=-1)
    return (num_views / (num_views - 1) * (1 - mean_norm_sq)).mean()


@dataclass
class VarianceReport:
    source: float
    target: float

    @property
    def ratio(self) -> float:
        """``rho = V_target / V_source``: below 1 is the asymmetry the paper recommends."""
        return self.target / self.source

    def as_dict(self, prefix: str = "variance/") -> dict[str, float]:
        return {f"{prefix}source": self.source, f"{prefix}target": self.target, f"{prefix}ratio": self.ratio}


class VarianceMonitor:
    """Measures ``V_source``, ``V_target`` and ``rho`` of a [`SiameseForPreTraining`] on a fixed probe set.

    The encodings are the ones the design trains on: each probe image goes ``num_draws`` times through the
    training view transform (image -> its ``source_pixel_values`` and ``target_pixel_values``); every source view
    is one source encoding (ScaleMix's mixed views and MultiCrop's local crops included) and every group of
    ``target_group`` target views one target encoding (MeanEnc: the normalised mean of the group's projections). Without
    target views the targets are the first ``num_global`` source views, one encoding each, as the model takes
    them. Views go through the branch's encoder and projector in training mode, as in training, and BatchNorm
    statistics are restored afterwards so that measuring does not change the model.
    """

    def __init__(self, images: list, view_transform: Callable[..., dict], *, num_global: int, target_group: int = 1,
                 num_draws: int = 4, batch_size: int = 256):
        self.images = images
        self.view_transform = view_transform
        self.num_global = num_global
        self.target_group = target_group
        self.num_draws = num_draws
        self.batch_size = batch_size

    @classmethod
    def from_view_transform(cls, images: list, view_transform, num_draws: int = 4) -> "VarianceMonitor":
        """For a :class:`~hf_siamese.views.MultiViewTransform`: its global views and MeanEnc group size."""
        layout = view_transform.layout
        return cls(images, view_transform, num_global=layout.num_groups, target_group=layout.target_views_per_group,
                   num_draws=num_draws)

    @torch.no_grad()
    def measure(self, model) -> VarianceReport:
        draws = [self._views() for _ in range(self.num_draws)]
        source = self._encodings(*model.source_branch(), [draw[SOURCE_PIXEL_VALUES] for draw in draws], group=1)
        shared = TARGET_PIXEL_VALUES not in draws[0]  # the targets are the global source views, one encoding each
        targets = [draw[SOURCE_PIXEL_VALUES][: self.num_global] if shared else draw[TARGET_PIXEL_VALUES]
                   for draw in draws]
        target = self._encodings(*model.target_branch(), targets, group=1 if shared else self.target_group)
        return VarianceReport(source=float(view_variance(source)), target=float(view_variance(target)))

    def _views(self) -> dict[str, list[torch.Tensor]]:
        """One draw of the training views of every probe image, stacked per view position: ``[N, C, H, W]``."""
        samples = [self.view_transform(image) for image in self.images]
        return {key: [torch.stack(position) for position in zip(*(sample[key] for sample in samples))]
                for key in (SOURCE_PIXEL_VALUES, TARGET_PIXEL_VALUES) if key in samples[0]}

    def _encodings(self, encoder: nn.Module, projector: nn.Module, draws: list[list[torch.Tensor]],
                   group: int) -> torch.Tensor:
        """``[K, N, D]`` unit encodings: per draw, the mean projection of each group of ``group`` views."""
        device = next(encoder.parameters()).device
        encodings = []
        with _training_mode_without_side_effects(encoder, projector):
            for views in draws:
                projections = [self._project(encoder, projector, view.to(device)) for view in views]
                for start in range(0, len(projections), group):
                    encodings.append(F.normalize(torch.stack(projections[start:start + group]).mean(0), dim=-1))
        return torch.stack(encodings)

    def _project(self, encoder: nn.Module, projector: nn.Module, views: torch.Tensor) -> torch.Tensor:
        return torch.cat([projector(encoder(chunk).pooler_output) for chunk in views.split(self.batch_size)]).float()


class _training_mode_without_side_effects:
    """Train mode for the given modules; their buffers (BN running stats) and modes are restored on exit."""

    def __init__(self, *modules: nn.Module):
        self.modules = modules

    def __enter__(self):
        self.modes = [[m.training for m in module.modules()] for module in self.modules]
        self.buffers = [[b.clone() for b in module.buffers()] for module in self.modules]
        for module in self.modules:
            module.train()

    def __exit__(self, *exc):
        for module, modes, buffers in zip(self.modules, self.modes, self.buffers):
            for submodule, mode in zip(module.modules(), modes):
                submodule.training = mode
            for buffer, saved in zip(module.buffers(), buffers):
                buffer.copy_(saved)
