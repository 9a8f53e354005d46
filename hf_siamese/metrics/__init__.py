"""`evaluate` metric modules shipped with hf_siamese and loaded by path, so they work offline.

``evaluate.load("accuracy")`` fetches the module from the Hub; these are the metrics the probes report.
"""

from functools import lru_cache
from pathlib import Path

import torch

METRICS_DIR = Path(__file__).resolve().parent
SHIPPED = ("accuracy", "top_k_accuracy", "mean_iou")


@lru_cache
def load_metric(name: str):
    """The shipped ``evaluate`` metric ``name`` (one of :data:`SHIPPED`), loaded once per process."""
    import evaluate

    if name not in SHIPPED:
        raise ValueError(f"No shipped metric {name!r}; the shipped ones are {list(SHIPPED)}.")
    return evaluate.load(str(METRICS_DIR / name))


def classification_accuracy(logits: torch.Tensor, labels: torch.Tensor, top_k: int = 5) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` of ``logits`` against ``labels`` through the shipped metrics.

    Top-k is left out with ``top_k`` classes or fewer (it would be 1.0 by construction).
    """
    results = {"top1": load_metric("accuracy").compute(
        predictions=logits.argmax(dim=1).tolist(), references=labels.tolist())["accuracy"]}
    if logits.shape[1] > top_k:
        ranked = logits.topk(top_k, dim=1).indices.tolist()
        results[f"top{top_k}"] = load_metric("top_k_accuracy").compute(
            predictions=ranked, references=labels.tolist(), k=top_k)["top_k_accuracy"]
    return results
