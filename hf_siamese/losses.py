"""Siamese losses: InfoNCE against a queue (MoCo) or the batch (MoCo v3), and negative cosine (BYOL, SimSiam).

Every loss takes ``(prediction, target)``: ``prediction`` from the source branch (with gradient), ``target`` from
the target branch, L2-normalised and without gradient. Which loss a framework uses, and how it combines the two
directions of a symmetric loss (BYOL and MoCo v3 sum them, SimSiam averages them), is its entry in
:data:`hf_siamese.frameworks.FRAMEWORKS`.
"""

import torch
import torch.nn.functional as F
from torch import nn

from .distributed import gather_without_grad, rank
from .frameworks import get_framework


class QueueInfoNCELoss(nn.Module):
    """MoCo's InfoNCE (He et al. 2020, Eq. 1): the positive key against a queue of negative keys.

    ``CE([q.k, q.queue] / tau, label 0)`` with ``q``, ``k`` and the queue L2-normalised.

    Example:
        >>> loss = QueueInfoNCELoss(temperature=0.2)
        >>> q, k = torch.randn(4, 128), F.normalize(torch.randn(4, 128), dim=1)
        >>> queue = F.normalize(torch.randn(65536, 128), dim=1)
        >>> loss(q, k, queue).shape
        torch.Size([])
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, prediction: torch.Tensor, target: torch.Tensor, queue: torch.Tensor) -> torch.Tensor:
        query = F.normalize(prediction, dim=1)
        positive = (query * target).sum(dim=1, keepdim=True)
        negatives = query @ queue.detach().T
        logits = torch.cat([positive, negatives], dim=1) / self.temperature
        # Cross-entropy with label 0, without NLLLoss (no deterministic CUDA kernel: `--deterministic` refuses it).
        return -logits.log_softmax(dim=1)[:, 0].mean()


class BatchInfoNCELoss(nn.Module):
    """MoCo v3's InfoNCE (Chen et al. 2021, Alg. 1): each query against the keys of the whole global batch.

    Keys are gathered across processes; the positive of query ``i`` on rank ``r`` is key ``r * B + i``. The loss
    is multiplied by ``2 * tau`` as in the paper, which makes its gradient scale independent of ``tau``.

    Example:
        >>> loss = BatchInfoNCELoss(temperature=1.0)
        >>> loss(torch.randn(4, 256), F.normalize(torch.randn(4, 256), dim=1)).shape
        torch.Size([])
    """

    def __init__(self, temperature: float):
        super().__init__()
        self.temperature = temperature

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        query = F.normalize(prediction, dim=1)
        keys = gather_without_grad(target)
        logits = query @ keys.T / self.temperature
        # Cross-entropy with label rank * B + i, without NLLLoss (as in QueueInfoNCELoss).
        log_positives = logits.log_softmax(dim=1).narrow(1, rank() * len(query), len(query)).diagonal()
        return -log_positives.mean() * (2 * self.temperature)


class NormalizedMSELoss(nn.Module):
    """BYOL's loss (Grill et al. 2020, Eq. 2): ``2 - 2 cos(p, z')``, averaged over the batch.

    Example:
        >>> NormalizedMSELoss()(torch.randn(4, 256), F.normalize(torch.randn(4, 256), dim=1)).shape
        torch.Size([])
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return (2 - 2 * F.cosine_similarity(prediction, target, dim=1)).mean()


class NegativeCosineLoss(nn.Module):
    """SimSiam's loss (Chen & He 2021, Eq. 1): ``-cos(p, stopgrad(z))``, averaged over the batch.

    The two directions are averaged, giving ``-0.5 (cos(p1, z2') + cos(p2, z1'))`` (Eq. 2).

    Example:
        >>> NegativeCosineLoss()(torch.randn(4, 2048), F.normalize(torch.randn(4, 2048), dim=1)).shape
        torch.Size([])
    """

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return -F.cosine_similarity(prediction, target, dim=1).mean()


LOSS_CLASSES: dict[str, type[nn.Module]] = {
    "queue_infonce": QueueInfoNCELoss,
    "batch_infonce": BatchInfoNCELoss,
    "normalized_mse": NormalizedMSELoss,
    "negative_cosine": NegativeCosineLoss,
}


def build_loss(config) -> nn.Module:
    """The loss ``config.framework``'s table entry names, so that each framework's loss is chosen in one place."""
    framework = get_framework(config.framework)
    loss_class = LOSS_CLASSES[framework.loss]
    return loss_class(config.temperature) if framework.uses("temperature") else loss_class()
