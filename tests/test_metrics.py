"""The evaluate metric modules shipped in hf_siamese/metrics load offline and compute what they say."""

import os
import subprocess
import sys

import pytest
import torch

from hf_siamese.metrics import classification_accuracy, load_metric


def test_accuracy_module_loads_by_path_offline():
    metric = load_metric("accuracy")
    assert metric.compute(predictions=[0, 1, 1, 2], references=[0, 1, 0, 2]) == {"accuracy": 0.75}


def test_top_k_accuracy_counts_a_reference_anywhere_in_the_first_k():
    metric = load_metric("top_k_accuracy")
    ranked = [[3, 1, 0], [2, 0, 1], [1, 2, 3]]
    assert metric.compute(predictions=ranked, references=[0, 0, 0], k=3)["top_k_accuracy"] == pytest.approx(2 / 3)
    assert metric.compute(predictions=ranked, references=[0, 0, 0], k=2)["top_k_accuracy"] == pytest.approx(1 / 3)
    with pytest.raises(ValueError, match="k=4 needs 4 ranked labels"):
        metric.compute(predictions=ranked, references=[0, 0, 0], k=4)


def test_unknown_metric_names_the_shipped_ones():
    with pytest.raises(ValueError, match="shipped ones are \\['accuracy', 'top_k_accuracy'\\]"):
        load_metric("f1")


def test_classification_accuracy_matches_a_direct_computation():
    generator = torch.Generator().manual_seed(0)
    logits, labels = torch.randn(200, 10, generator=generator), torch.randint(0, 10, (200,), generator=generator)
    result = classification_accuracy(logits, labels)
    top5 = (logits.topk(5, dim=1).indices == labels[:, None]).any(dim=1).float().mean().item()
    assert result == pytest.approx({"top1": (logits.argmax(1) == labels).float().mean().item(), "top5": top5})
    assert set(classification_accuracy(logits[:, :5], labels.clamp(max=4))) == {"top1"}  # top-5 of 5 classes is 1
    assert set(classification_accuracy(logits[:, :6], labels.clamp(max=5))) == {"top1", "top5"}


def test_documented_call_works_after_a_plain_import_hf_siamese():
    """A fresh interpreter: an import of ``hf_siamese.metrics`` done by another test cannot hide a missing one."""
    code = ("import hf_siamese; "
            "print(hf_siamese.metrics.load_metric('accuracy').compute(predictions=[0, 1], references=[0, 0]))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert result.returncode == 0, result.stderr
    assert "{'accuracy': 0.5}" in result.stdout
