"""Projector and predictor MLPs, one builder for every framework.

A head is a list of :class:`HeadBlock` (Linear, optional BatchNorm, optional ReLU), in the spirit of lightly's
``ProjectionHead``. Each framework contributes only its layouts (the ``projector`` and ``predictor``
:class:`HeadLayout` of its entry in :data:`hf_siamese.frameworks.FRAMEWORKS`, from its paper); the widths and
depths come from :class:`SiameseConfig`.
"""

from dataclasses import dataclass
from itertools import pairwise

from torch import nn

from .frameworks import HeadLayout, get_framework


@dataclass(frozen=True)
class HeadBlock:
    """One Linear layer and what follows it."""

    in_dim: int
    out_dim: int
    bias: bool
    batch_norm: bool
    batch_norm_affine: bool
    relu: bool


def mlp_blocks(dims: list[int], layout: HeadLayout) -> list[HeadBlock]:
    """Blocks of an MLP with widths ``dims = [in, hidden..., out]`` laid out as ``layout`` says."""
    blocks = []
    num_layers = len(dims) - 1
    for index, (in_dim, out_dim) in enumerate(pairwise(dims)):
        is_last = index == num_layers - 1
        if is_last:
            batch_norm = layout.last_batch_norm
        else:
            batch_norm = layout.hidden_batch_norm == "all" or index == 0
        blocks.append(
            HeadBlock(
                in_dim=in_dim,
                out_dim=out_dim,
                bias=layout.bias and not batch_norm,
                batch_norm=batch_norm,
                batch_norm_affine=not is_last,
                relu=not is_last,
            )
        )
    return blocks


class ProjectionHead(nn.Sequential):
    """An MLP built from :class:`HeadBlock` s: ``Linear [-> BatchNorm1d] [-> ReLU]`` per block.

    Example:
        >>> head = ProjectionHead(mlp_blocks([512, 1024, 128], FRAMEWORKS["byol"].projector))
        >>> head(torch.randn(8, 512)).shape
        torch.Size([8, 128])
    """

    def __init__(self, blocks: list[HeadBlock]):
        layers: list[nn.Module] = []
        for block in blocks:
            layers.append(nn.Linear(block.in_dim, block.out_dim, bias=block.bias))
            if block.batch_norm:
                layers.append(nn.BatchNorm1d(block.out_dim, affine=block.batch_norm_affine))
            if block.relu:
                layers.append(nn.ReLU(inplace=True))
        super().__init__(*layers)
        self.out_dim = blocks[-1].out_dim


def build_projector(config, in_dim: int) -> ProjectionHead:
    """The framework's projector from ``in_dim`` (the backbone's feature width) to ``config.projector_dim``."""
    dims = [in_dim] + [config.projector_hidden_dim] * (config.projector_num_layers - 1) + [config.projector_dim]
    return ProjectionHead(mlp_blocks(dims, get_framework(config.framework).projector))


def build_predictor(config) -> ProjectionHead | None:
    """The framework's predictor, ``projector_dim -> projector_dim``; ``None`` when it has none (MoCo)."""
    if not config.predictor_num_layers:
        return None
    hidden = [config.predictor_hidden_dim] * (config.predictor_num_layers - 1)
    dims = [config.projector_dim, *hidden, config.projector_dim]
    return ProjectionHead(mlp_blocks(dims, get_framework(config.framework).predictor))
