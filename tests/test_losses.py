import math

import pytest
import torch
import torch.nn.functional as F

from hf_siamese import SiameseConfig
from hf_siamese.frameworks import get_framework
from hf_siamese.losses import BatchInfoNCELoss, NegativeCosineLoss, NormalizedMSELoss, QueueInfoNCELoss, build_loss


def test_queue_infonce_matches_hand_computation():
    query = torch.tensor([[2.0, 0.0]])  # normalised inside the loss
    key = torch.tensor([[1.0, 0.0]])
    queue = torch.tensor([[0.0, 1.0], [-1.0, 0.0]])
    # logits = [q.k, q.n1, q.n2] / 0.5 = [2, 0, -2]; label 0
    expected = -math.log(math.exp(2) / (math.exp(2) + math.exp(0) + math.exp(-2)))
    assert QueueInfoNCELoss(temperature=0.5)(query, key, queue).item() == pytest.approx(expected, rel=1e-6)


def test_queue_infonce_gives_no_gradient_to_queue():
    queue = F.normalize(torch.randn(16, 4), dim=1).requires_grad_()
    query = torch.randn(3, 4, requires_grad=True)
    QueueInfoNCELoss(0.2)(query, F.normalize(torch.randn(3, 4), dim=1), queue).backward()
    assert queue.grad is None and query.grad is not None


def test_batch_infonce_matches_hand_computation_and_scales_by_two_tau():
    query = torch.tensor([[3.0, 0.0], [0.0, 0.5]])
    key = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    # logits = identity / tau; each row: -log(e^(1/t) / (e^(1/t) + 1)); then times 2 tau
    for tau in (1.0, 0.2):
        per_row = -math.log(math.exp(1 / tau) / (math.exp(1 / tau) + 1))
        assert BatchInfoNCELoss(tau)(query, key).item() == pytest.approx(per_row * 2 * tau, rel=1e-6)


def test_batch_infonce_positive_is_the_same_index():
    key = F.normalize(torch.randn(4, 8), dim=1)
    aligned = BatchInfoNCELoss(0.2)(key * 5, key)
    shuffled = BatchInfoNCELoss(0.2)(key.roll(1, dims=0) * 5, key)
    assert aligned < shuffled


def test_byol_loss_matches_hand_computation():
    prediction = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    target = torch.tensor([[0.0, 1.0], [1.0, 0.0]])
    # 2 - 2cos: orthogonal -> 2; 45 degrees -> 2 - sqrt(2); averaged
    expected = (2 + (2 - math.sqrt(2))) / 2
    assert NormalizedMSELoss()(prediction, target).item() == pytest.approx(expected, rel=1e-6)


def test_simsiam_loss_matches_hand_computation():
    prediction = torch.tensor([[1.0, 0.0], [-2.0, 0.0]])
    target = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert NegativeCosineLoss()(prediction, target).item() == pytest.approx((-1 + 1) / 2, abs=1e-7)
    assert NegativeCosineLoss()(prediction[:1], target[:1]).item() == pytest.approx(-1.0)


@pytest.mark.parametrize(
    "framework, reduction",
    [
        ("moco", "sum"),  # one direction only (not symmetric): the sum keeps it as is
        ("mocov3", "sum"),  # MoCo v3 Alg. 1: ctr(q1,k2) + ctr(q2,k1)
        ("byol", "sum"),  # BYOL: L + L~
        ("simsiam", "mean"),  # SimSiam Eq. 2: 0.5 (D(p1,z2) + D(p2,z1))
    ],
)
def test_direction_reductions_follow_the_papers(framework, reduction):
    assert get_framework(framework).direction_reduction == reduction


@pytest.mark.parametrize(
    "framework, loss_class, temperature",
    [
        ("moco", QueueInfoNCELoss, 0.2),
        ("mocov3", BatchInfoNCELoss, 1.0),
        ("byol", NormalizedMSELoss, None),
        ("simsiam", NegativeCosineLoss, None),
    ],
)
def test_build_loss_picks_each_frameworks_loss(framework, loss_class, temperature):
    loss = build_loss(SiameseConfig(framework=framework))
    assert type(loss) is loss_class
    assert getattr(loss, "temperature", None) == temperature
