"""BatchNorm variants for AsymBN (Wang et al. 2022, Sec. 4.4).

AsymBN gives the target projector's BatchNorm the statistics of a larger batch than the source's, lowering the
target's variance. Across processes the target BN is synchronised (:class:`TargetSyncBatchNorm1d`); on one
process the source BN normalises over small ghost batches instead (:class:`GhostBatchNorm1d`), so that the
asymmetry is real there too. Both keep BatchNorm1d's parameters and buffers, so checkpoints are interchangeable.
"""

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn


class TargetSyncBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm whose batch moments are all-reduced over ``process_group`` (all processes when ``None``).

    For the target branch, which needs no backward: the moments are all-reduced here on any device and backend,
    not by torch's ``SyncBatchNorm``, which runs on GPUs only and which DDP refuses in a CPU module.
    """

    def __init__(self, num_features: int, process_group=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.process_group = process_group

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


class GhostBatchNorm1d(nn.BatchNorm1d):
    """BatchNorm over consecutive chunks of ``ghost_batch_size`` samples (the last chunk may be smaller).

    Running statistics are updated once per chunk, as if each chunk were a separate device's batch.
    """

    def __init__(self, num_features: int, ghost_batch_size: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.ghost_batch_size = ghost_batch_size

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if not self.training or len(input) <= self.ghost_batch_size:
            return super().forward(input)
        return torch.cat([super(GhostBatchNorm1d, self).forward(chunk) for chunk in input.split(self.ghost_batch_size)])


def _distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def replace_batch_norms(module: nn.Module, make: callable) -> nn.Module:
    """Swap every ``BatchNorm1d`` in ``module`` for ``make(bn)``, at construction (weights are initialised after)."""
    for name, child in module.named_children():
        if type(child) is nn.BatchNorm1d:
            setattr(module, name, make(child))
        else:
            replace_batch_norms(child, make)
    return module


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


_PLAIN_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)


def convert_sync_batchnorm(module: nn.Module, process_group=None) -> nn.Module:
    """``--sync_bn``: every plain BatchNorm of ``module`` as a ``SyncBatchNorm`` over ``process_group``.

    Unlike ``nn.SyncBatchNorm.convert_sync_batchnorm``, AsymBN's layers keep their class and process group (it
    converts every BatchNorm subclass, which would make the source's ghost BN and the target's group-synchronised
    BN world-wide SyncBatchNorms and undo the asymmetry). Parameters and buffers are the same tensors.
    """
    if type(module) in _PLAIN_BATCH_NORMS:
        synced = nn.SyncBatchNorm(module.num_features, module.eps, module.momentum, module.affine,
                                  module.track_running_stats, process_group)
        if module.affine:
            synced.weight, synced.bias = module.weight, module.bias
        synced.running_mean, synced.running_var = module.running_mean, module.running_var
        synced.num_batches_tracked = module.num_batches_tracked
        synced.train(module.training)
        return synced
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module
