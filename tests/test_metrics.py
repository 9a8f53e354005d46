"""The evaluate metric modules shipped in hf_siamese/metrics load offline and compute what they say."""

import os
import subprocess
import sys

import numpy as np
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
    with pytest.raises(ValueError, match="shipped ones are \\['accuracy', 'top_k_accuracy', 'mean_iou'\\]"):
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


# Two maps of different shapes; class 3 is in neither, 255 pixels are unlabelled (their predictions do not count).
# Counted (reference, prediction) pixels: (0,0) (0,1) (1,1) (1,1) (2,2) | (2,2) (2,0) (0,0).
IOU_REFERENCES = [np.array([[0, 0, 1], [1, 2, 255]]), np.array([[2, 2], [0, 255]])]
IOU_PREDICTIONS = [np.array([[0, 1, 1], [1, 2, 2]]), np.array([[2, 0], [0, 0]])]
# class 0: intersection 2, reference 3, predicted 3 -> IoU 2/4, accuracy 2/3; class 1: 2, 2, 3 -> 2/3, 1;
# class 2: 2, 3, 2 -> 2/3, 2/3; class 3: absent -> NaN, NaN. Correct pixels: 6 of 8.
IOU_PER_CATEGORY = [1 / 2, 2 / 3, 2 / 3, np.nan]
ACCURACY_PER_CATEGORY = [2 / 3, 1, 2 / 3, np.nan]


def test_mean_iou_by_hand_with_ignored_pixels_and_an_absent_class():
    result = load_metric("mean_iou").compute(predictions=IOU_PREDICTIONS, references=IOU_REFERENCES, num_labels=4)
    assert set(result) == {"mean_iou", "mean_accuracy", "overall_accuracy", "per_category_iou",
                           "per_category_accuracy"}
    np.testing.assert_allclose(result["per_category_iou"], IOU_PER_CATEGORY)
    np.testing.assert_allclose(result["per_category_accuracy"], ACCURACY_PER_CATEGORY)
    assert result["mean_iou"] == pytest.approx((1 / 2 + 2 / 3 + 2 / 3) / 3)  # the absent class is left out
    assert result["mean_accuracy"] == pytest.approx((2 / 3 + 1 + 2 / 3) / 3)
    assert result["overall_accuracy"] == pytest.approx(6 / 8)


def test_mean_iou_accumulates_batches_and_reads_nested_lists():
    metric = load_metric("mean_iou")
    for prediction, reference in zip(IOU_PREDICTIONS, IOU_REFERENCES):
        metric.add_batch(predictions=[prediction.tolist()], references=[reference.tolist()])
    np.testing.assert_allclose(metric.compute(num_labels=4)["per_category_iou"], IOU_PER_CATEGORY)


def test_mean_iou_leaves_excluded_classes_out_of_the_means_only():
    result = load_metric("mean_iou").compute(predictions=IOU_PREDICTIONS, references=IOU_REFERENCES, num_labels=4,
                                             excluded_labels=[0])
    assert result["mean_iou"] == pytest.approx(2 / 3) and result["mean_accuracy"] == pytest.approx((1 + 2 / 3) / 2)
    assert result["overall_accuracy"] == pytest.approx(6 / 8)
    np.testing.assert_allclose(result["per_category_iou"], IOU_PER_CATEGORY)


def test_mean_iou_a_class_only_predicted_scores_zero_iou_and_no_accuracy():
    result = load_metric("mean_iou").compute(predictions=[[[0, 2]]], references=[[[0, 0]]], num_labels=3)
    np.testing.assert_allclose(result["per_category_iou"], [1 / 2, np.nan, 0])
    np.testing.assert_allclose(result["per_category_accuracy"], [1 / 2, np.nan, np.nan])
    assert result["mean_iou"] == pytest.approx(1 / 4) and result["mean_accuracy"] == pytest.approx(1 / 2)
    filled = load_metric("mean_iou").compute(predictions=[[[0, 2]]], references=[[[0, 0]]], num_labels=3,
                                             nan_to_num=-1)
    np.testing.assert_allclose(filled["per_category_accuracy"], [1 / 2, -1, -1])


def test_mean_iou_reduce_labels_label_map_and_ignore_index_as_the_hub_metric():
    metric = load_metric("mean_iou")
    reduced = metric.compute(predictions=[[[0, 0, 1, 1]]], references=[[[0, 1, 2, 255]]], num_labels=2,
                             reduce_labels=True)  # reference 0 -> ignored, 1 -> 0, 2 -> 1
    np.testing.assert_allclose(reduced["per_category_iou"], [1, 1])
    swapped = metric.compute(predictions=[[[2, 1]]], references=[[[1, 2]]], num_labels=3, label_map={1: 2, 2: 1})
    np.testing.assert_allclose(swapped["per_category_iou"], [np.nan, 1, 1])
    ignored = metric.compute(predictions=[[[0, 1]]], references=[[[0, 1]]], num_labels=2, ignore_index=1)
    np.testing.assert_allclose(ignored["per_category_iou"], [1, np.nan])
    with pytest.raises(ValueError, match="prediction labels must be in \\[0, 2\\)"):
        metric.compute(predictions=[[[0, 2]]], references=[[[0, 1]]], num_labels=2)
