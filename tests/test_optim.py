"""LARS, parameter groups, optimizer and schedule factories of hf_siamese.optim, against hand-computed values."""

import copy
import io
import math
import pickle

import pytest
import torch
from torch import nn

from hf_siamese.optim import (
    LARS,
    build_optimizer,
    build_scheduler,
    constant_schedule,
    parameter_groups,
    scaled_learning_rate,
    warmup_cosine,
)

LR, WD, MOMENTUM, TRUST, EPS = 0.5, 0.1, 0.9, 0.02, 1e-8


def lars_pair():
    """A 2-d weight [[3, 4]] (norm 5) in an adapted group and a bias in an excluded group that also sets a decay."""
    weight = nn.Parameter(torch.tensor([[3.0, 4.0]], dtype=torch.float64))
    bias = nn.Parameter(torch.tensor([1.0, -2.0], dtype=torch.float64))
    optimizer = LARS(
        [{"params": [weight]}, {"params": [bias], "weight_decay": WD, "lars_exclude": True}],
        lr=LR,
        weight_decay=WD,
        momentum=MOMENTUM,
        trust_coefficient=TRUST,
        eps=EPS,
    )
    return weight, bias, optimizer


def lars_direction(p: list[float], g: list[float]) -> list[float]:
    """(g + wd p) scaled by the trust ratio trust * ||p|| / (||g + wd p|| + eps)."""
    decayed = [gi + WD * pi for gi, pi in zip(g, p)]
    ratio = TRUST * math.hypot(*p) / (math.hypot(*decayed) + EPS)
    return [ratio * d for d in decayed]


def test_lars_two_steps_match_hand_computation():
    weight, bias, optimizer = lars_pair()
    weight.grad = torch.tensor([[0.6, 0.8]], dtype=torch.float64)
    bias.grad = torch.tensor([0.5, 0.5], dtype=torch.float64)
    optimizer.step()

    # g + wd p = [0.9, 1.2] (norm 1.5), so the trust ratio is 0.02 * 5 / 1.5 and the first buffer is that direction.
    buf_w = lars_direction([3.0, 4.0], [0.6, 0.8])
    assert buf_w == pytest.approx([0.06, 0.08])
    p_w = [p - LR * b for p, b in zip([3.0, 4.0], buf_w)]
    assert weight.detach().flatten().tolist() == pytest.approx(p_w, rel=1e-12)
    # Excluded bias: plain SGD with neither its group's weight decay nor the trust ratio.
    assert bias.detach().tolist() == pytest.approx([1.0 - LR * 0.5, -2.0 - LR * 0.5], rel=1e-12)

    weight.grad = torch.tensor([[-0.3, 0.1]], dtype=torch.float64)
    bias.grad = torch.tensor([0.2, -0.4], dtype=torch.float64)
    optimizer.step()

    buf_w = [MOMENTUM * b + d for b, d in zip(buf_w, lars_direction(p_w, [-0.3, 0.1]))]
    p_w = [p - LR * b for p, b in zip(p_w, buf_w)]
    assert weight.detach().flatten().tolist() == pytest.approx(p_w, rel=1e-12)
    assert optimizer.state[weight]["momentum_buffer"].flatten().tolist() == pytest.approx(buf_w, rel=1e-12)
    buf_b = [MOMENTUM * 0.5 + 0.2, MOMENTUM * 0.5 - 0.4]
    assert bias.detach().tolist() == pytest.approx([0.75 - LR * buf_b[0], -2.25 - LR * buf_b[1]], rel=1e-12)


def test_lars_zero_norm_uses_unit_trust_ratio_and_skips_params_without_grad():
    zero = nn.Parameter(torch.zeros(2, 2))
    idle = nn.Parameter(torch.ones(2, 2))
    optimizer = LARS([zero, idle], lr=0.1, weight_decay=WD)
    zero.grad = torch.full((2, 2), 2.0)
    with torch.no_grad():
        optimizer.step()
    assert torch.allclose(zero, torch.full((2, 2), -0.2))
    assert torch.equal(idle, torch.ones(2, 2)) and idle not in optimizer.state


def test_lars_state_dict_round_trip_gives_identical_next_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    inputs = torch.randn(8, 4)

    def step(model, optimizer):
        optimizer.zero_grad()
        model(inputs).pow(2).mean().backward()
        optimizer.step()

    optimizer = LARS(parameter_groups(model, WD), lr=0.1, trust_coefficient=0.01)
    step(model, optimizer)
    step(model, optimizer)
    restored = copy.deepcopy(model)
    restored_optimizer = LARS(parameter_groups(restored, WD), lr=0.1, trust_coefficient=0.01)
    checkpoint = io.BytesIO()  # through bytes, as a checkpoint: a live state_dict shares the momentum buffers
    torch.save(optimizer.state_dict(), checkpoint)
    checkpoint.seek(0)
    restored_optimizer.load_state_dict(torch.load(checkpoint, weights_only=True))
    fresh = copy.deepcopy(model)
    fresh_optimizer = LARS(parameter_groups(fresh, WD), lr=0.1, trust_coefficient=0.01)

    for m, o in ((model, optimizer), (restored, restored_optimizer), (fresh, fresh_optimizer)):
        step(m, o)
    for a, b in zip(model.parameters(), restored.parameters()):
        assert torch.equal(a, b)
    assert [group["lars_exclude"] for group in restored_optimizer.param_groups] == [False, True]
    # Without the loaded momentum buffers the step differs, so the round trip is what made them equal.
    assert not all(torch.equal(a, b) for a, b in zip(model.parameters(), fresh.parameters()))


def small_model() -> nn.Sequential:
    model = nn.Sequential(nn.Linear(4, 3), nn.BatchNorm1d(3), nn.Linear(3, 2))
    model[2].requires_grad_(False)
    return model


def test_parameter_groups_exclude_1d_and_frozen_parameters():
    model = small_model()
    decayed, excluded = parameter_groups(model, weight_decay=0.05)
    assert decayed["weight_decay"] == 0.05 and not decayed["lars_exclude"]
    assert excluded["weight_decay"] == 0.0 and excluded["lars_exclude"]
    assert [id(p) for p in decayed["params"]] == [id(model[0].weight)]
    assert [id(p) for p in excluded["params"]] == [id(model[0].bias), id(model[1].weight), id(model[1].bias)]

    only_weights = parameter_groups(nn.Linear(3, 2, bias=False), weight_decay=0.05)
    assert len(only_weights) == 1 and not only_weights[0]["lars_exclude"]


def test_build_optimizer_types_groups_and_unknown_name():
    model = small_model()
    sgd = build_optimizer(model, "sgd", learning_rate=0.03, weight_decay=1e-4, momentum=0.8)
    assert type(sgd) is torch.optim.SGD and len(sgd.param_groups) == 1
    (group,) = sgd.param_groups
    assert len(group["params"]) == 4 and (group["lr"], group["weight_decay"], group["momentum"]) == (0.03, 1e-4, 0.8)

    lars = build_optimizer(model, "lars", learning_rate=0.2, weight_decay=1.5e-6, momentum=0.8)
    assert type(lars) is LARS
    assert [(g["weight_decay"], g["lars_exclude"], g["momentum"]) for g in lars.param_groups] == [
        (1.5e-6, False, 0.8),
        (0.0, True, 0.8),
    ]

    adamw = build_optimizer(model, "adamw", learning_rate=1e-3, weight_decay=0.1, betas=(0.9, 0.95))
    assert type(adamw) is torch.optim.AdamW
    assert [(g["weight_decay"], g["betas"]) for g in adamw.param_groups] == [(0.1, (0.9, 0.95)), (0.0, (0.9, 0.95))]

    with pytest.raises(ValueError, match=r"`optimizer`.*sgd, lars, adamw"):
        build_optimizer(model, "adam", learning_rate=1e-3, weight_decay=0.0)


def test_warmup_cosine_and_constant_values():
    total, warmup = 110, 10
    assert warmup_cosine(0, total, warmup) == pytest.approx(0.1)
    assert warmup_cosine(9, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(10, total, warmup) == pytest.approx(1.0)
    assert warmup_cosine(60, total, warmup) == pytest.approx(0.5)
    assert warmup_cosine(total - 1, total, warmup) == pytest.approx(0.0, abs=1e-3)
    assert warmup_cosine(total, total, warmup) == 0.0
    decay = [warmup_cosine(step, total, warmup) for step in range(warmup, total + 1)]
    assert all(a >= b >= 0.0 for a, b in zip(decay, decay[1:]))
    assert warmup_cosine(0, 5, 0) == 1.0

    assert [constant_schedule(step, total, warmup) for step in (0, 4, 9, 10, 109)] == pytest.approx(
        [0.1, 0.5, 1.0, 1.0, 1.0]
    )


@pytest.mark.parametrize(
    "name, expected",
    [
        ("cosine", [0.2, 0.4, 0.4, 0.2 * (1 + math.cos(math.pi / 4)), 0.2, 0.2 * (1 + math.cos(3 * math.pi / 4))]),
        ("constant", [0.2, 0.4, 0.4, 0.4, 0.4, 0.4]),
    ],
)
def test_build_scheduler_drives_the_learning_rate(name, expected):
    optimizer = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=0.4)
    scheduler = build_scheduler(optimizer, name, total_steps=6, warmup_steps=2)
    lrs = []
    for _ in expected:
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs == pytest.approx(expected)
    pickle.dumps(scheduler)  # a lambda here would not pickle

    with pytest.raises(ValueError, match=r"`lr_scheduler_type`.*cosine, constant"):
        build_scheduler(optimizer, "linear", total_steps=6, warmup_steps=2)


def test_scaled_learning_rate_follows_the_linear_scaling_rule():
    assert scaled_learning_rate(0.03, 256, scale=True) == pytest.approx(0.03)
    assert scaled_learning_rate(0.03, 512, scale=True) == pytest.approx(0.06)
    assert scaled_learning_rate(0.03, 4096, scale=False) == 0.03
