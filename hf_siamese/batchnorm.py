"""BatchNorm with per-view statistics, and the variants of AsymBN (Wang et al. 2022, Sec. 4.4).

Views of one size go through the encoder as one batch, yet every reference normalises each view with its own
statistics (one forward per view). Every BatchNorm of the pretraining model is therefore a per-view one: with
``num_views > 1`` (set by :func:`views_in_batch`) it normalises each of that many equal chunks of its input in
turn, so outputs and running statistics are those of separate forwards, in the same order.

AsymBN gives the target projector's BatchNorm the statistics of a larger batch than the source's, lowering the
target's variance. Across processes the target BN is synchronised (:class:`TargetSyncBatchNorm1d`); on one
process the source BN normalises over small ghost batches instead (:class:`GhostBatchNorm1d`), so that the
asymmetry is real there too. Both keep BatchNorm1d's parameters and buffers, so checkpoints are interchangeable.
"""

import contextlib
import functools
import math
from collections.abc import Callable, Iterable

import torch
import torch.distributed as dist
from torch import nn


class PerViewStatistics:
    """Marks a BatchNorm that normalises each of ``num_views`` equal chunks of its batch on its own whenever it
    uses batch statistics; ``num_views`` is set around a forward by :func:`views_in_batch`."""

    num_views: int = 1

    def _splits_views(self, input: torch.Tensor) -> bool:
        """Whether this forward normalises per view: batch statistics in use (as torch decides) and several views."""
        batch_statistics = self.training or (self.running_mean is None and self.running_var is None)
        if self.num_views == 1 or not batch_statistics:
            return False
        if len(input) % self.num_views:
            raise ValueError(f"A batch of {len(input)} does not split into {self.num_views} views of equal size.")
        values_per_channel = len(input) // self.num_views * math.prod(input.shape[2:])
        if self.training and values_per_channel == 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got a view of {input.shape[1:]}.")
        return True


def per_view(forward: Callable) -> Callable:
    """A BatchNorm ``forward`` that normalises each of ``self.num_views`` chunks on its own (see PerViewStatistics)."""

    @functools.wraps(forward)
    def forward_per_view(self, input: torch.Tensor) -> torch.Tensor:
        if not self._splits_views(input):
            return forward(self, input)
        return torch.cat([forward(self, view) for view in input.chunk(self.num_views)])

    return forward_per_view


@contextlib.contextmanager
def views_in_batch(norms: Iterable[PerViewStatistics], num_views: int):
    """Within the block, ``norms`` treat each batch as ``num_views`` views of equal size."""
    norms = list(norms)
    for norm in norms:
        norm.num_views = num_views
    try:
        yield
    finally:
        for norm in norms:
            norm.num_views = 1


class ViewNorms:
    """A model's per-view BatchNorms, found once after it is built (and again after :func:`convert_sync_batchnorm`),
    so that a forward pass does not search the module tree."""

    def __init__(self, model: nn.Module):
        norms = [module for module in model.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm)]
        self.norms = [norm for norm in norms if isinstance(norm, PerViewStatistics)]
        # A backbone's own BatchNorm subclass (timm's BatchNormAct2d) cannot tell views apart.
        self.all_per_view = len(self.norms) == len(norms)

    def views_in_batch(self, num_views: int):
        """Within the block, every per-view BatchNorm treats each batch as ``num_views`` views of equal size."""
        return views_in_batch(self.norms, num_views) if num_views > 1 else contextlib.nullcontext()


class ViewBatchNorm1d(PerViewStatistics, nn.BatchNorm1d):
    forward = per_view(nn.BatchNorm1d.forward)


class ViewBatchNorm2d(PerViewStatistics, nn.BatchNorm2d):
    forward = per_view(nn.BatchNorm2d.forward)


class ViewSyncBatchNorm(PerViewStatistics, nn.SyncBatchNorm):
    forward = per_view(nn.SyncBatchNorm.forward)


class TargetSyncBatchNorm1d(PerViewStatistics, nn.BatchNorm1d):
    """BatchNorm whose batch moments are all-reduced over ``process_group`` (all processes when ``None``).

    For the target branch, which needs no backward: the moments are all-reduced here on any device and backend,
    not by torch's ``SyncBatchNorm``, which runs on GPUs only and which DDP refuses in a CPU module.
    """

    def __init__(self, num_features: int, process_group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

    @per_view
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or not _distributed():
            return super().forward(input)
        if torch.is_grad_enabled() and input.requires_grad:
            raise RuntimeError("TargetSyncBatchNorm1d has no backward; use it on the target branch only.")
        moments = torch.stack([input.sum(0), (input * input).sum(0)]).float()
        count = torch.full((1,), float(len(input)), device=input.device)
        dist.all_reduce(moments, group=self.process_group)
        dist.all_reduce(count, group=self.process_group)  # stays on the device: no host read
        mean = moments[0] / count
        var = moments[1] / count - mean * mean
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp(min=1), self.momentum)
        output = (input - mean) / torch.sqrt(var + self.eps)
        if self.affine:
            output = output * self.weight + self.bias
        return output.to(input.dtype)


class GhostBatchNorm1d(PerViewStatistics, nn.BatchNorm1d):
    """BatchNorm over consecutive chunks of ``ghost_batch_size`` samples (the last chunk may be smaller).

    Running statistics are updated once per chunk, as if each chunk were a separate device's batch.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ghost_batch_size = ghost_batch_size

    @per_view
    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or len(input) <= self.ghost_batch_size:
            return super().forward(input)
        return torch.cat([super(GhostBatchNorm1d, self).forward(chunk) for chunk in input.split(self.ghost_batch_size)])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def replace_batch_norms(module: nn.Module, make: Callable, kinds: tuple[type, ...] = (nn.BatchNorm1d,)) -> nn.Module:
    """Swap every BatchNorm of exactly one of ``kinds`` in ``module`` for ``make(bn)``, at construction (weights
    are initialised after)."""
    for name, child in module.named_children():
        if type(child) in kinds:
            setattr(module, name, make(child))
        else:
            replace_batch_norms(child, make, kinds)
    return module


def make_per_view(bn: nn.BatchNorm1d | nn.BatchNorm2d) -> ViewBatchNorm1d | ViewBatchNorm2d:
    """The per-view form of ``bn``, holding the same parameter and buffer tensors.

    transformers' flag that the module is initialised is kept too: otherwise the model's ``post_init`` would
    initialise it again and undo what its parent did (timm's zero-init of each residual branch's last BN).
    """
    kind = ViewBatchNorm1d if isinstance(bn, nn.BatchNorm1d) else ViewBatchNorm2d
    per_view_bn = kind(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine,
                       track_running_stats=bn.track_running_stats)
    for name, tensor in [*bn.named_parameters(recurse=False), *bn.named_buffers(recurse=False)]:
        setattr(per_view_bn, name, tensor)
    if hasattr(bn, "_is_hf_initialized"):
        per_view_bn._is_hf_initialized = bn._is_hf_initialized
    return per_view_bn.train(bn.training)


def make_target_sync(process_group=None):
    def make(bn: nn.BatchNorm1d) -> TargetSyncBatchNorm1d:
        return TargetSyncBatchNorm1d(
            bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=bn.affine, process_group=process_group
        )

    return make


def make_ghost(ghost_batch_size: int):
    def make(bn: nn.BatchNorm1d) -> GhostBatchNorm1d:
        return GhostBatchNorm1d(bn.num_features, ghost_batch_size, eps=bn.eps, momentum=bn.momentum, affine=bn.affine)

    return make


def asym_bn_process_group(group_size: int | None):
    """The process group the target BN synchronises over: consecutive ranks in groups of ``group_size``.

    ``None`` (or a size covering every process) means all processes. Must be called on every rank in the same
    order (it is a collective when it creates subgroups). Unlike the reference's fixed groups of 8 GPUs, any size
    dividing the world size works.
    """
    if not _distributed() or group_size is None or group_size >= dist.get_world_size():
        return None
    world = dist.get_world_size()
    if world % group_size:
        raise ValueError(f"`asym_bn_group_size` ({group_size}) must divide the number of processes ({world}).")
    group, _ = dist.new_subgroups(group_size)
    return group


_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, ViewBatchNorm1d, ViewBatchNorm2d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``--sync_bn``: every plain BatchNorm of ``module`` as a ``SyncBatchNorm`` over ``process_group`` (per view
    when it was).

    Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, AsymBN's layers keep their class and process group (it
    converts every BatchNorm subclass, which would make the source's ghost BN and the target's group-synchronised
    BN world-wide SyncBatchNorms and undo the asymmetry). Parameters and buffers are the same tensors.
    """
    if type(module) in _PLAIN_BATCH_NORMS:
        kind = ViewSyncBatchNorm if isinstance(module, PerViewStatistics) else nn.SyncBatchNorm
        synced = kind(module.num_features, module.eps, module.momentum, module.affine, module.track_running_stats,
                      process_group)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
