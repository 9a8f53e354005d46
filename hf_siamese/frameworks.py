"""The four Siamese frameworks in one table: defaults, fields they use, head layouts, loss and its reduction.

The config, the heads and the losses read a framework only from here, so that adding or checking one is one
entry. Standard library only: ``configuration_siamese.py`` imports this file without torch, and both are copied
next to a checkpoint to be loaded with ``trust_remote_code=True``.
"""

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

DIRECTION_REDUCTIONS = ("sum", "mean")


@dataclass(frozen=True)
class HeadLayout:
    """Where a framework puts BatchNorm and biases in its MLPs.

    ``hidden_batch_norm``: ``"all"`` hidden layers, or only the ``"first"``; ``last_batch_norm``: a BN without
    affine parameters after the output layer; ``bias``: whether a Linear not followed by BN has a bias (a Linear
    followed by BN never has one: the BN would cancel it).
    """

    hidden_batch_norm: str = "all"
    last_batch_norm: bool = False
    bias: bool = True


@dataclass(frozen=True)
class Framework:
    """All that sets one framework apart, as its paper gives it, so that the config, heads and losses agree.

    ``defaults``: the config fields it fills when left ``None``. ``unused_fields``: framework-only fields it has no
    use for, which a config must leave unset (checked in this order). ``projector``, ``predictor``: its heads'
    layouts. ``loss``: the name ``hf_siamese.losses.LOSS_CLASSES`` maps to a loss class. ``direction_reduction``:
    how the two directions of a symmetric loss combine, ``"sum"`` or ``"mean"``.
    """

    name: str
    defaults: Mapping[str, Any]
    unused_fields: tuple[str, ...]
    projector: HeadLayout
    predictor: HeadLayout
    loss: str
    direction_reduction: str

    def __post_init__(self):
        # Read-only, so that no caller changes a framework's defaults for every later config.
        object.__setattr__(self, "defaults", MappingProxyType(dict(self.defaults)))
        if self.direction_reduction not in DIRECTION_REDUCTIONS:
            raise ValueError(f"`direction_reduction` must be one of {DIRECTION_REDUCTIONS}, "
                             f"got {self.direction_reduction!r}.")

    def uses(self, field_name: str) -> bool:
        """Whether a framework-only field means something for this framework."""
        return field_name not in self.unused_fields


# Widths are the papers' ResNet-50 ones; the projector's input width is always the backbone's feature width.
# BYOL's heads (Grill et al. 2020, Sec. 3.3: 4096 hidden, 256 out, two layers each), which MoCo v3 takes over for
# ResNet-50 (Chen, Xie, He 2021, Sec. 4).
_BYOL_HEADS = {"projector_num_layers": 2, "projector_hidden_dim": 4096, "projector_dim": 256,
               "predictor_num_layers": 2, "predictor_hidden_dim": 4096}
_TABLE = (
    Framework(
        name="moco",
        # Asym-Siam's baseline "Our MoCo" (Wang et al. 2022, Sec. 3): MoCo v2 (Chen et al. 2020) with a BN projector.
        defaults={
            "projector_num_layers": 3,
            "projector_hidden_dim": 2048,
            "projector_dim": 128,
            "predictor_num_layers": 0,
            "predictor_hidden_dim": None,
            "queue_size": 65536,
            "temperature": 0.2,
            "momentum": 0.999,
            "momentum_final": 0.999,
            "symmetric_loss": False,
            "augmentation": "mocov2",
            "shuffle_bn": True,
        },
        unused_fields=(),
        # Asym-Siam's MoCo projector: Linear-BN-ReLU-Linear-ReLU-Linear (issue spec of "Our MoCo").
        projector=HeadLayout(hidden_batch_norm="first"),
        predictor=HeadLayout(),
        # He et al. 2020, Eq. 1: InfoNCE against a queue of negative keys.
        loss="queue_infonce",
        direction_reduction="sum",
    ),
    Framework(
        name="mocov3",
        # MoCo v3 (Chen, Xie, He 2021), ResNet-50 recipe: tau 1.0, m 0.99 -> 1 on a half-cosine.
        defaults={
            **_BYOL_HEADS,
            "queue_size": 0,
            "temperature": 1.0,
            "momentum": 0.99,
            "momentum_final": 1.0,
            "symmetric_loss": True,
            "augmentation": "byol",
            "shuffle_bn": False,
        },
        unused_fields=("queue_size",),
        # MoCo v3 Sec. 4 / App.: every Linear without bias, BN on hidden layers, projector output BN without affine.
        projector=HeadLayout(last_batch_norm=True, bias=False),
        predictor=HeadLayout(bias=False),
        # Alg. 1: ctr(q1, k2) + ctr(q2, k1), InfoNCE against the keys of the global batch.
        loss="batch_infonce",
        direction_reduction="sum",
    ),
    Framework(
        name="byol",
        # BYOL (Grill et al. 2020, Sec. 3.3): heads 4096 -> 256, tau_base 0.996 -> 1.
        defaults={
            **_BYOL_HEADS,
            "queue_size": 0,
            "temperature": None,
            "momentum": 0.996,
            "momentum_final": 1.0,
            "symmetric_loss": True,
            "augmentation": "byol",
            "shuffle_bn": False,
        },
        unused_fields=("queue_size", "temperature"),
        # BYOL Sec. 3.3: Linear-BN-ReLU-Linear for projector and predictor.
        projector=HeadLayout(),
        predictor=HeadLayout(),
        # Eq. 2: 2 - 2 cos(p, z'); the symmetrised loss is L + L~.
        loss="normalized_mse",
        direction_reduction="sum",
    ),
    Framework(
        name="simsiam",
        # SimSiam (Chen & He 2021, Sec. 4): 3-layer 2048 projector, 2048-512-2048 predictor, no momentum encoder.
        defaults={
            "projector_num_layers": 3,
            "projector_hidden_dim": 2048,
            "projector_dim": 2048,
            "predictor_num_layers": 2,
            "predictor_hidden_dim": 512,
            "queue_size": 0,
            "temperature": None,
            "momentum": None,
            "momentum_final": None,
            "symmetric_loss": True,
            "augmentation": "mocov2",
            "shuffle_bn": False,
        },
        unused_fields=("queue_size", "temperature", "momentum", "momentum_final"),
        # SimSiam Sec. 4: BN on every projector layer including the output (no affine there); predictor BN on hidden.
        projector=HeadLayout(last_batch_norm=True),
        predictor=HeadLayout(),
        # Eq. 1-2: -cos(p, stopgrad(z)), the two directions averaged: 0.5 (D(p1, z2) + D(p2, z1)).
        loss="negative_cosine",
        direction_reduction="mean",
    ),
)

FRAMEWORKS: dict[str, Framework] = {framework.name: framework for framework in _TABLE}


def get_framework(name: str) -> Framework:
    """The table entry of ``name``, with an error naming the config field when there is none."""
    if not isinstance(name, str) or name not in FRAMEWORKS:
        raise ValueError(f"`framework` must be one of {tuple(FRAMEWORKS)}, got {name!r}.")
    return FRAMEWORKS[name]


def frameworks_using(field_name: str) -> tuple[str, ...]:
    """The frameworks for which a framework-only field means something, for error messages."""
    return tuple(framework.name for framework in FRAMEWORKS.values() if framework.uses(field_name))


__all__ = ["FRAMEWORKS", "Framework", "HeadLayout", "frameworks_using", "get_framework"]
