"""One loss level of a Siamese model (Ladder Siamese: one per listed backbone stage): its heads, its MoCo queue,
and the typed values that flow through it.

Like the modeling file, this imports only torch and same-directory modules, so that it is copied next to saved
weights and loads with ``trust_remote_code``.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_without_grad
from .heads import build_predictor, build_projector


@dataclass
class LevelFeatures:
    """A level's encoder features of a batch: pooled ``[B, C]`` and, with the dense term, per cell ``[B, cells, C]``."""

    pooled: torch.Tensor
    cells: torch.Tensor | None = None


@dataclass
class SourceOutput:
    """A level's source heads on a batch: projection ``z`` and prediction ``p`` (``p = z`` without a predictor),
    and the same per cell with the dense term."""

    projection: torch.Tensor
    prediction: torch.Tensor
    cell_projection: torch.Tensor | None = None
    cell_prediction: torch.Tensor | None = None

    def chunk(self, chunks: int) -> list["SourceOutput"]:
        """One output per view of a batch that holds ``chunks`` views."""

        def split(tensor: torch.Tensor | None) -> list:
            return [None] * chunks if tensor is None else list(tensor.chunk(chunks))

        return [SourceOutput(*parts) for parts in zip(split(self.projection), split(self.prediction),
                                                       split(self.cell_projection), split(self.cell_prediction))]

    def as_target(self) -> "Target":
        """These projections as a target under stop-gradient (SimSiam's target of a view the source encoded)."""
        return Target(self.projection.detach(), None if self.cell_projection is None else self.cell_projection.detach())


@dataclass
class Target:
    """A level's target for one target group: its embedding, and with the dense term its first view's cells."""

    embedding: torch.Tensor
    cells: torch.Tensor | None = None

    def normalized(self) -> "Target":
        return Target(F.normalize(self.embedding, dim=-1), None if self.cells is None else F.normalize(self.cells, dim=-1))

    def per_group(self, groups: int, views: int) -> list["Target"]:
        """The targets of a batch of ``groups x views`` views, per group: the mean embedding over its views (MeanEnc)
        and its first view's cells."""
        embedding = self.embedding.unflatten(0, (groups, views, -1)).mean(dim=1)
        cells = None if self.cells is None else self.cells.unflatten(0, (groups, views, -1))[:, 0]
        return [Target(embedding[group], None if cells is None else cells[group]) for group in range(groups)]


class LevelHeads(nn.Module):
    """One loss level's heads and queue.

    Source projector and predictor; the target projector (an EMA copy, absent for SimSiam, whose target heads are
    the source's under stop-gradient); with the dense term the same three applied to every cell (1x1-conv MLPs);
    with MoCo the level's FIFO queue of keys.
    """

    def __init__(self, config, width: int, cell_width: int):
        super().__init__()
        momentum_target, dense = config.uses_momentum_target, bool(config.ladder_dense_weight)
        self.projector = build_projector(config, width)
        self.predictor = build_predictor(config)
        self.target_projector = build_projector(config, width) if momentum_target else None
        self.dense_projector = build_projector(config, cell_width) if dense else None
        self.dense_predictor = build_predictor(config) if dense else None
        self.target_dense_projector = build_projector(config, cell_width) if dense and momentum_target else None
        if config.queue_size:
            self.register_buffer("queue", torch.empty(config.queue_size, config.projector_dim))
            self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._queue_snapshot: torch.Tensor | None = None

    def project(self, features: LevelFeatures) -> SourceOutput:
        projection, prediction = _project(self.projector, self.predictor, features.pooled)
        if features.cells is None:
            return SourceOutput(projection, prediction)
        return SourceOutput(projection, prediction, *_project(self.dense_projector, self.dense_predictor, features.cells))

    @property
    def target_heads(self) -> tuple[nn.Module, nn.Module | None]:
        """The projector and dense projector that make targets: the EMA copies, or SimSiam's own."""
        if self.target_projector is None:
            return self.projector, self.dense_projector
        return self.target_projector, self.target_dense_projector

    def project_target(self, features: LevelFeatures) -> Target:
        """The target heads' (un-normalised) projections."""
        projector, dense_projector = self.target_heads
        cells = None if features.cells is None else _per_cell(dense_projector, features.cells)
        return Target(projector(features.pooled), cells)

    def target_source_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each target head with the source head it follows."""
        pairs = [(self.target_projector, self.projector), (self.target_dense_projector, self.dense_projector)]
        return [(target, source) for target, source in pairs if target is not None]

    @property
    def has_queue(self) -> bool:
        return hasattr(self, "queue")

    @torch.no_grad()
    def reset_queue(self) -> None:
        self.queue.copy_(F.normalize(torch.randn_like(self.queue), dim=1))
        self.queue_ptr.zero_()

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Replace the oldest keys of the queue with ``keys`` gathered from every process."""
        keys = gather_without_grad(keys)
        queue_size = self.queue.shape[0]
        check_queue_fits(queue_size, len(keys), "global batch size x target groups")
        # Positions computed on the device: reading the pointer on the host would wait for the GPU every step.
        positions = (self.queue_ptr + torch.arange(len(keys), device=self.queue.device)) % queue_size
        self.queue.index_copy_(0, positions, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + len(keys)) % queue_size)

    def negatives(self) -> torch.Tensor | None:
        """The queue as this step's loss sees it, or ``None`` without a queue.

        The queue is updated in place after the loss, whose backward needs the keys it saw: they are copied into a
        tensor reused from step to step (a fresh allocation per step is slower). Two forwards before one backward
        make autograd refuse loudly.
        """
        if not self.has_queue:
            return None
        snapshot = self._queue_snapshot
        if snapshot is None or (snapshot.shape, snapshot.device, snapshot.dtype) != (
                self.queue.shape, self.queue.device, self.queue.dtype):
            snapshot = self._queue_snapshot = torch.empty_like(self.queue)
        return snapshot.copy_(self.queue)


def check_queue_fits(queue_size: int, keys_per_step: int, keys_are: str) -> None:
    """MoCo enqueues every process's keys at each forward; the queue must hold a whole number of them."""
    if queue_size % keys_per_step:
        raise ValueError(f"`queue_size` ({queue_size}) must be a multiple of the keys enqueued per step "
                         f"({keys_per_step} = {keys_are}).")


def _project(projector: nn.Module, predictor: nn.Module | None, features: torch.Tensor):
    projection = _per_cell(projector, features)
    return projection, _per_cell(predictor, projection) if predictor is not None else projection


def _per_cell(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply an MLP head to ``[B, C]`` features, or to every cell of ``[B, cells, C]`` (a 1x1-conv MLP)."""
    if features.dim() == 2:
        return head(features)
    batch, cells, _ = features.shape
    return head(features.flatten(0, 1)).view(batch, cells, -1)
