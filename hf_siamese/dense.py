"""The Ladder's dense (local) term: spatially corresponding cells of two views of one image.

Two views are crops of one image, so a cell of one view's feature map and the cell of the other view that shows
the same image point should agree (a non-contrastive, local version of the Siamese loss, as in Yoshihashi et al.
2022's global/local losses). Correspondence comes from the crop geometry each view carries:
``[top, left, height, width, flipped]``, the crop box as fractions of the original image.
"""

import math

import torch
import torch.nn.functional as F


def cell_centres(side: int, device=None) -> torch.Tensor:
    """``[side * side, 2]`` (y, x) centres of a ``side x side`` grid of cells in [0, 1] view coordinates."""
    steps = (torch.arange(side, device=device, dtype=torch.float32) + 0.5) / side
    y, x = torch.meshgrid(steps, steps, indexing="ij")
    return torch.stack([y.flatten(), x.flatten()], dim=1)


def matched_cells(source_geometry: torch.Tensor, target_geometry: torch.Tensor, source_side: int,
                  target_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For every source cell, the index of the target cell showing the same image point, and whether it exists.

    Args:
        source_geometry, target_geometry: ``[B, 5]`` crop geometry of each view.
        source_side, target_side: the feature grids' side lengths (square maps).

    Returns:
        ``index`` ``[B, source_side**2]`` (row-major target cell) and ``valid`` of the same shape: False where the
        source cell's centre falls outside the target crop (no corresponding cell, ignored by the loss).
    """
    centres = cell_centres(source_side, source_geometry.device)
    top, left, height, width, flipped = (source_geometry[:, i : i + 1] for i in range(5))
    x_view = torch.where(flipped > 0.5, 1 - centres[:, 1], centres[:, 1])
    y_image = top + centres[:, 0] * height
    x_image = left + x_view * width
    top, left, height, width, flipped = (target_geometry[:, i : i + 1] for i in range(5))
    y_target = (y_image - top) / height
    x_target = (x_image - left) / width
    valid = (y_target >= 0) & (y_target < 1) & (x_target >= 0) & (x_target < 1)
    x_target = torch.where(flipped > 0.5, 1 - x_target, x_target)
    row = (y_target * target_side).floor().clamp(0, target_side - 1).long()
    column = (x_target * target_side).floor().clamp(0, target_side - 1).long()
    return row * target_side + column, valid


def dense_cosine_loss(predictions: torch.Tensor, targets: torch.Tensor, index: torch.Tensor,
                      valid: torch.Tensor) -> torch.Tensor:
    """``2 - 2 cos`` between each valid source cell's prediction and its matched target cell, averaged.

    Args:
        predictions: ``[B, N, D]`` source cells; targets: ``[B, M, D]`` target cells, L2-normalised, no gradient;
        index, valid: ``[B, N]`` from :func:`matched_cells`.
    """
    matched = targets.gather(1, index.unsqueeze(-1).expand(-1, -1, targets.shape[-1]))
    per_cell = 2 - 2 * F.cosine_similarity(predictions, matched, dim=-1)
    # A masked mean, not per_cell[valid]: no host read, and zero (with a graph) when no cell overlaps.
    weights = valid.to(per_cell.dtype)
    return (per_cell * weights).sum() / weights.sum().clamp(min=1)


def grid_side(num_cells: int) -> int:
    side = math.isqrt(num_cells)
    if side * side != num_cells:
        raise ValueError(f"The dense term needs square feature maps, got {num_cells} cells.")
    return side
