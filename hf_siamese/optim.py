"""Optimizers and learning-rate schedules of the Siamese recipes.

MoCo v2 and SimSiam train with momentum SGD, BYOL and MoCo v3 (ResNet) with LARS, MoCo v3 (ViT) with AdamW; all use
a linear warm-up followed by a cosine decay and the linear scaling rule ``lr = base_lr * batch / 256``.
"""

import math
from collections.abc import Callable, Iterable
from functools import partial

import torch
from torch import nn

OPTIMIZERS = ("sgd", "lars", "adamw")


class LARS(torch.optim.Optimizer):
    """Momentum SGD with Layer-wise Adaptive Rate Scaling (You et al. 2017, arXiv:1708.03888).

    Large-batch training diverges when one global lr is too large for some layers; LARS rescales each tensor's
    update by ``trust_coefficient * ||p|| / ||g||`` so every layer moves by a similar relative amount. As in the
    BYOL (Grill et al. 2020) and MoCo v3 (Chen et al. 2021) recipes, groups with ``lars_exclude=True`` (biases and
    normalisation parameters, see :func:`parameter_groups`) get neither weight decay nor the trust ratio.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float,
        weight_decay: float = 0.0,
        momentum: float = 0.9,
        trust_coefficient: float = 0.001,
        eps: float = 1e-8,
    ):
        if lr < 0 or weight_decay < 0 or not 0 <= momentum < 1:
            raise ValueError(f"LARS needs lr, weight_decay >= 0 and 0 <= momentum < 1, got {lr}, {weight_decay}, {momentum}.")
        defaults = dict(
            lr=lr,
            weight_decay=weight_decay,
            momentum=momentum,
            trust_coefficient=trust_coefficient,
            eps=eps,
            lars_exclude=False,
        )
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                grad = p.grad
                if not group["lars_exclude"]:
                    grad = grad.add(p, alpha=group["weight_decay"])
                    param_norm, grad_norm = torch.linalg.vector_norm(p), torch.linalg.vector_norm(grad)
                    trust_ratio = torch.where(
                        (param_norm > 0) & (grad_norm > 0),
                        group["trust_coefficient"] * param_norm / (grad_norm + group["eps"]),
                        torch.ones_like(param_norm),
                    )
                    grad = grad.mul(trust_ratio)
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = grad.clone()
                else:
                    state["momentum_buffer"].mul_(group["momentum"]).add_(grad)
                p.add_(state["momentum_buffer"], alpha=-group["lr"])
        return loss


def parameter_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Split trainable parameters into decayed/adapted weights (ndim > 1) and excluded biases and norm scales.

    BYOL and MoCo v3 exclude 1-d parameters from weight decay and LARS adaptation: decaying a BatchNorm scale or a
    bias only fights the normalisation and does not regularise. Empty groups are dropped.
    """
    trainable = [p for p in model.parameters() if p.requires_grad]
    groups = [
        {"params": [p for p in trainable if p.ndim > 1], "weight_decay": weight_decay, "lars_exclude": False},
        {"params": [p for p in trainable if p.ndim <= 1], "weight_decay": 0.0, "lars_exclude": True},
    ]
    return [group for group in groups if group["params"]]


def build_optimizer(
    model: nn.Module,
    name: str,
    learning_rate: float,
    weight_decay: float,
    momentum: float = 0.9,
    betas: tuple[float, float] = (0.9, 0.999),
) -> torch.optim.Optimizer:
    """The optimizer ``name`` over ``model``'s trainable parameters.

    ``"sgd"`` decays every parameter, as MoCo v2 (Chen et al. 2020, arXiv:2003.04297) and SimSiam do; ``"lars"``
    (BYOL, MoCo v3 ResNet) and ``"adamw"`` (MoCo v3 ViT; Loshchilov & Hutter 2019) use :func:`parameter_groups`.
    """
    if name == "sgd":
        trainable = [p for p in model.parameters() if p.requires_grad]
        return torch.optim.SGD(trainable, lr=learning_rate, momentum=momentum, weight_decay=weight_decay)
    if name == "lars":
        return LARS(parameter_groups(model, weight_decay), lr=learning_rate, momentum=momentum)
    if name == "adamw":
        return torch.optim.AdamW(parameter_groups(model, weight_decay), lr=learning_rate, betas=betas)
    raise ValueError(f"Unknown `optimizer` {name!r}; choose one of {', '.join(OPTIMIZERS)}.")


def _warmup(step: int, warmup_steps: int) -> float:
    return (step + 1) / warmup_steps


def warmup_cosine(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr: linear warm-up, then half-cosine decay to 0 at ``total_steps``.

    Warm-up avoids the early instability of large-batch training (Goyal et al. 2017, arXiv:1706.02677); the cosine
    decay without restarts (Loshchilov & Hutter 2017, arXiv:1608.03983) is the schedule of MoCo v2/v3, BYOL and SimSiam.
    """
    if step < warmup_steps:
        return _warmup(step, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return max(0.0, 0.5 * (1 + math.cos(math.pi * progress)))


def constant_schedule(step: int, total_steps: int, warmup_steps: int) -> float:
    """Multiplier of the base lr: the same linear warm-up as :func:`warmup_cosine`, then 1."""
    return _warmup(step, warmup_steps) if step < warmup_steps else 1.0


SCHEDULES = {"cosine": warmup_cosine, "constant": constant_schedule}


def build_scheduler(
    optimizer: torch.optim.Optimizer, name: str, total_steps: int, warmup_steps: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A per-step ``LambdaLR`` for schedule ``name``; a ``partial`` rather than a lambda keeps it picklable."""
    if name not in SCHEDULES:
        raise ValueError(f"Unknown `lr_scheduler_type` {name!r}; choose one of {', '.join(SCHEDULES)}.")
    schedule = partial(SCHEDULES[name], total_steps=total_steps, warmup_steps=warmup_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)


def scaled_learning_rate(base_lr: float, global_batch_size: int, scale: bool) -> float:
    """``base_lr * global_batch_size / 256`` if ``scale``, else ``base_lr``.

    The linear scaling rule (Goyal et al. 2017, arXiv:1706.02677) keeps the per-sample step size fixed as the batch
    grows; MoCo v3, BYOL and SimSiam quote their lrs as ``base_lr x batch / 256``.
    """
    return base_lr * global_batch_size / 256 if scale else base_lr
