"""The pretraining objective: which prediction meets which target, and how the terms add up.

Per loss level (one, or one per Ladder level): each global source view predicts the target of its paired group
(:func:`~hf_siamese.view_layout.paired_group`), each MultiCrop local crop every group's target (averaged over the
crops), and with the Ladder's dense term each global view's cells the matched cells of its paired group's first
view. A framework sums or averages its directions (the framework table); levels are weighted by
``ladder_weights``; the dense term by ``ladder_dense_weight``.
"""

from dataclasses import dataclass

import torch
from torch import nn

from .dense import dense_cosine_loss, grid_side, matched_cells
from .frameworks import get_framework
from .levels import SourceOutput, Target
from .losses import build_loss
from .view_layout import ModelViews, paired_group


@dataclass
class LevelLoss:
    """One level's unweighted terms: global views, local crops (MultiCrop) and matched cells (dense term)."""

    global_term: torch.Tensor
    local_term: torch.Tensor | None = None
    dense_term: torch.Tensor | None = None

    def total(self, dense_weight: float) -> torch.Tensor:
        total = self.global_term if self.local_term is None else self.global_term + self.local_term
        return total if self.dense_term is None else total + dense_weight * self.dense_term


@dataclass
class Losses:
    """The total loss and its parts: global, local and dense terms summed over levels with their weights, and
    each level's unweighted total."""

    loss: torch.Tensor
    global_loss: torch.Tensor
    local_loss: torch.Tensor | None
    dense_loss: torch.Tensor | None
    level_losses: dict[int, torch.Tensor]


class SiameseObjective(nn.Module):
    """The framework's loss between source predictions and targets, over directions, crops, cells and levels."""

    def __init__(self, config, level_weights: dict[int, float]):
        super().__init__()
        self.criterion = build_loss(config)
        self.reduce_directions = torch.mean if get_framework(config.framework).direction_reduction == "mean" else torch.sum
        self.level_weights = level_weights
        self.dense_weight = config.ladder_dense_weight

    def forward(self, sources: dict[int, list[SourceOutput]], targets: dict[int, list[Target]],
                negatives: dict[int, torch.Tensor | None], views: ModelViews) -> Losses:
        levels = {level: self.level_loss(sources[level], targets[level], negatives[level], views)
                  for level in self.level_weights}
        return self._weighted(levels)

    def level_loss(self, sources: list[SourceOutput], targets: list[Target], negatives: torch.Tensor | None,
                   views: ModelViews) -> LevelLoss:
        """One level's global, local (MultiCrop) and dense terms."""
        global_term, local_term = self._pair_terms([source.prediction for source in sources],
                                                   [target.embedding for target in targets], negatives)
        dense_term = None
        if self.dense_weight:
            dense_term = self._dense_term([source.cell_prediction for source in sources],
                                          [target.cells for target in targets], views)
        return LevelLoss(global_term, local_term, dense_term)

    def _pair_terms(self, predictions, targets, negatives) -> tuple[torch.Tensor, torch.Tensor | None]:
        num_groups = len(targets)
        global_terms, local_terms = [], []
        local_predictions = predictions[num_groups:]
        for direction in range(num_groups):
            target = targets[paired_group(direction, num_groups)]
            global_terms.append(self._pair_loss(predictions[direction], target, negatives))
            if local_predictions:
                local_terms.append(torch.stack([self._pair_loss(p, target, negatives) for p in local_predictions]).mean())
        local = self.reduce_directions(torch.stack(local_terms)) if local_terms else None
        return self.reduce_directions(torch.stack(global_terms)), local

    def _pair_loss(self, prediction: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        # In fp32 whatever the branches' dtypes (16-bit source and fp32 target under DeepSpeed bf16/fp16).
        prediction, target = prediction.float(), target.float()
        if negatives is not None:
            return self.criterion(prediction, target, negatives)
        return self.criterion(prediction, target)

    def _dense_term(self, cell_predictions, cell_targets, views: ModelViews) -> torch.Tensor:
        """Matched-cell loss between each global source view and the first view of its paired target group."""
        num_groups, terms = len(cell_targets), []
        for direction in range(num_groups):
            group = paired_group(direction, num_groups)
            predictions, targets = cell_predictions[direction], cell_targets[group]
            index, valid = matched_cells(views.source_geometry[direction], views.group_geometry[group],
                                         grid_side(predictions.shape[1]), grid_side(targets.shape[1]))
            terms.append(dense_cosine_loss(predictions.float(), targets.float(), index, valid))
        return self.reduce_directions(torch.stack(terms))

    def _weighted(self, levels: dict[int, LevelLoss]) -> Losses:
        """The total loss (levels weighted by `ladder_weights`) and its parts."""
        weighted = [(self.level_weights[level], loss) for level, loss in levels.items()]
        global_loss = _weighted_sum((weight, loss.global_term) for weight, loss in weighted)
        local_loss = _weighted_sum((weight, loss.local_term) for weight, loss in weighted)
        dense_loss = _weighted_sum((weight, loss.dense_term) for weight, loss in weighted)
        loss = global_loss if local_loss is None else global_loss + local_loss
        if dense_loss is not None:
            loss = loss + self.dense_weight * dense_loss
        level_losses = {level: loss.total(self.dense_weight) for level, loss in levels.items()}
        return Losses(loss, global_loss, local_loss, dense_loss, level_losses)


def _weighted_sum(terms) -> torch.Tensor | None:
    """``sum(weight * term)`` over the terms that exist; ``None`` when none does."""
    weighted = [weight * term for weight, term in terms if term is not None]
    return sum(weighted[1:], weighted[0]) if weighted else None
