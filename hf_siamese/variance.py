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

    Each probe image is augmented ``num_views`` times by the source transform and by the target transform
    (callables image -> tensor); the views go through the branch's encoder and projector in training mode, as in
    training, and BatchNorm statistics are restored afterwards so that measuring does not change the model.
    """

    def __init__(
        self,
        images: list,
        source_transform: Callable,
        target_transform: Callable,
        num_views: int = 4,
        batch_size: int = 256,
    ):
        self.images = images
        self.source_transform = source_transform
        self.target_transform = target_transform
        self.num_views = num_views
        self.batch_size = batch_size

    @classmethod
    def from_view_transform(cls, images: list, view_transform, num_views: int = 4) -> "VarianceMonitor":
        """Use the first global source and target recipes of a :class:`~hf_siamese.views.MultiViewTransform`."""
        return cls(images, view_transform.global_source[0], view_transform.global_target[-1], num_views)

    @torch.no_grad()
    def measure(self, model) -> VarianceReport:
        source = self._branch_variance(*model.source_branch(), self.source_transform)
        target = self._branch_variance(*model.target_branch(), self.target_transform)
        return VarianceReport(source=source, target=target)

    def _branch_variance(self, encoder: nn.Module, projector: nn.Module, transform: Callable) -> float:
        device = next(encoder.parameters()).device
        embeddings = []
        with _training_mode_without_side_effects(encoder, projector):
            for _ in range(self.num_views):
                views = torch.stack([transform(image) for image in self.images]).to(device)
                chunks = [projector(encoder(chunk).pooler_output) for chunk in views.split(self.batch_size)]
                embeddings.append(F.normalize(torch.cat(chunks).float(), dim=-1))
        return float(view_variance(torch.stack(embeddings)))


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
