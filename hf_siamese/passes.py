"""Which views share a forward pass, and which BatchNorm statistics each view gets: one planner for both branches.

Every reference encodes each view on its own, so each view (or, for the target, each MeanEnc group) has its own
BatchNorm statistics. With ``batch_views`` the views of one size still go through the encoder as one batch, and
the per-view BatchNorms (:mod:`hf_siamese.batchnorm`) normalise each statistics group of that batch on its own.
Torch-free: the plan is made from the views' shapes.
"""

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import groupby


@dataclass(frozen=True)
class ForwardPass:
    """Views encoded as one batch, in ``statistics`` order: each inner tuple (view indices) is normalised together,
    and all of them are of one size."""

    statistics: tuple[tuple[int, ...], ...]

    @property
    def views(self) -> tuple[int, ...]:
        return tuple(view for group in self.statistics for view in group)


def plan_source_passes(shapes: Sequence, num_global: int, batched: bool, joint_local_bn: bool) -> list[ForwardPass]:
    """The source views as passes: each run of same-size global views or local crops shares a pass when
    ``batched``, else each view has its own; local crops normalised jointly (``multicrop_joint_bn``) always share
    one, with one set of statistics."""
    passes = []
    for run in _same_size_runs(shapes, range(num_global)):
        passes += _one_statistics_per_view(run, batched)
    for run in _same_size_runs(shapes, range(num_global, len(shapes))):
        passes += [ForwardPass((run,))] if joint_local_bn else _one_statistics_per_view(run, batched)
    return passes


def plan_target_passes(groups: Sequence[Sequence[int]], shapes: Sequence, batched: bool,
                       shuffled: bool) -> list[ForwardPass]:
    """The target groups (view indices) as passes, one set of statistics per group (MeanEnc's views of a group are
    normalised together). Groups share one pass when ``batched`` and alike in size, except under shuffling BN,
    which permutes each group's batch on its own as MoCo does."""
    groups = [tuple(group) for group in groups]
    alike = len({(len(group), shapes[group[0]]) for group in groups}) == 1
    if batched and alike and not shuffled:
        return [ForwardPass(tuple(groups))]
    return [ForwardPass((group,)) for group in groups]


def _one_statistics_per_view(run: tuple[int, ...], batched: bool) -> list[ForwardPass]:
    if batched:
        return [ForwardPass(tuple((view,) for view in run))]
    return [ForwardPass(((view,),)) for view in run]


def _same_size_runs(shapes: Sequence, indices: range) -> list[tuple[int, ...]]:
    """``indices`` cut into runs of consecutive views of one shape (MultiCrop's local crops of one size)."""
    return [tuple(run) for _, run in groupby(indices, key=lambda index: tuple(shapes[index]))]
