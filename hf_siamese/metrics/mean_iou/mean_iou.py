"""Mean intersection over union (mIoU) of semantic segmentation label maps, with per-class IoU and pixel accuracy.

The same inputs, arguments and output keys as the Hub's ``evaluate-metric/mean_iou`` (what transformers'
semantic-segmentation example reports), shipped with hf_siamese so that it loads offline:
``evaluate.load("<path>/hf_siamese/metrics/mean_iou")``. Written from the definition: over all pixels of all maps
whose reference is not ``ignore_index``, class ``c``'s IoU is ``|pred = c and ref = c| / |pred = c or ref = c|``
and its accuracy ``|pred = c and ref = c| / |ref = c|``; a class absent from both gets NaN and is left out of the
means (``nanmean``). Labels outside ``[0, num_labels)`` that are not ``ignore_index`` are an error (the Hub drops
them silently).
"""

from collections.abc import Iterable

import datasets
import evaluate
import numpy as np

_DESCRIPTION = "Mean IoU: per-class intersection over union of predicted and reference label maps, averaged."
_INPUTS = """
Args:
    predictions (`list[ndarray]`): predicted label maps, 2-D, integers in [0, num_labels).
    references (`list[ndarray]`): reference label maps, the same shapes; `ignore_index` marks unlabelled pixels.
    num_labels (`int`): number of classes.
    ignore_index (`int`, defaults to 255): reference value of pixels left out everywhere.
    nan_to_num (`float`, *optional*): replaces NaN in every result (classes absent from both maps).
    label_map (`dict[int, int]`, *optional*): old id -> new id, applied to references.
    reduce_labels (`bool`, defaults to False): reference 0 (background) becomes `ignore_index` and every other
        id drops by one (ADE20k's convention): background pixels leave the count altogether.
    excluded_labels (`list[int]`, defaults to ()): classes left out of `mean_iou` and `mean_accuracy` only,
        e.g. `[0]` for the mean over foreground classes; their pixels still count, so a foreground pixel
        predicted as background still lowers its class's IoU. Not in the Hub metric.
Returns:
    mean_iou (`float`): nanmean of per_category_iou over the classes not excluded.
    mean_accuracy (`float`): nanmean of per_category_accuracy over the classes not excluded.
    overall_accuracy (`float`): correct pixels / counted pixels.
    per_category_iou (`ndarray`): [num_labels], NaN for a class absent from predictions and references.
    per_category_accuracy (`ndarray`): [num_labels], NaN for a class absent from the references.
Example:
    >>> result = mean_iou.compute(predictions=[[[0, 1], [1, 1]]], references=[[[0, 1], [0, 255]]], num_labels=3)
    >>> result["mean_iou"], result["overall_accuracy"], result["per_category_iou"].tolist()
    (0.5, 0.6666666666666666, [0.5, 0.5, nan])
"""


def confusion_matrix(predictions: Iterable, references: Iterable, num_labels: int, ignore_index: int) -> np.ndarray:
    """``[reference, prediction]`` pixel counts over every map: all the metric's numbers are sums of it."""
    counts = np.zeros(num_labels * num_labels, np.int64)
    for prediction, reference in zip(predictions, references, strict=True):
        prediction, reference = np.asarray(prediction, np.int64), np.asarray(reference, np.int64)
        if prediction.shape != reference.shape:
            raise ValueError(f"mean_iou: a prediction of shape {prediction.shape} for a reference of {reference.shape}")
        counted = reference != ignore_index
        prediction, reference = prediction[counted], reference[counted]
        for name, labels in (("prediction", prediction), ("reference", reference)):
            if labels.size and (labels.min() < 0 or labels.max() >= num_labels):
                raise ValueError(f"mean_iou: {name} labels must be in [0, {num_labels}) or the reference "
                                 f"ignore_index {ignore_index}, found {labels.min()}..{labels.max()}")
        counts += np.bincount(reference * num_labels + prediction, minlength=num_labels * num_labels)
    return counts.reshape(num_labels, num_labels)


def relabelled(reference, ignore_index: int, label_map: dict | None, reduce_labels: bool) -> np.ndarray:
    """The reference after ``label_map`` (all ids at once) and then ADE20k's ``reduce_labels``."""
    reference = np.asarray(reference, np.int64)
    if label_map:
        mapped = reference.copy()
        for old, new in label_map.items():
            mapped[reference == old] = new
        reference = mapped
    if reduce_labels:
        reference = np.where((reference == 0) | (reference == ignore_index), ignore_index, reference - 1)
    return reference


def ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    """``numerator / denominator``, NaN where the denominator is 0 (a class with nothing to score), no warning."""
    return np.divide(numerator, denominator, out=np.full(np.shape(numerator), np.nan), where=denominator > 0)


def nanmean(values: np.ndarray) -> float:
    """Mean of the non-NaN values, NaN (without numpy's warning) when there are none."""
    kept = values[~np.isnan(values)]
    return float(kept.mean()) if kept.size else float("nan")


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class MeanIoU(evaluate.Metric):
    def _info(self):
        label_map = datasets.Sequence(datasets.Sequence(datasets.Value("uint16")))
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features({"predictions": label_map, "references": label_map}),
        )

    def _compute(self, predictions, references, num_labels: int, ignore_index: int = 255,
                 nan_to_num: float | None = None, label_map: dict | None = None, reduce_labels: bool = False,
                 excluded_labels: Iterable[int] = ()):
        if len(references) == 0:
            raise ValueError("mean_iou needs at least one reference label map.")
        references = (relabelled(reference, ignore_index, label_map, reduce_labels) for reference in references)
        confusion = confusion_matrix(predictions, references, num_labels, ignore_index)
        intersection = np.diag(confusion)
        reference_area, predicted_area = confusion.sum(axis=1), confusion.sum(axis=0)
        per_category_iou = ratio(intersection, reference_area + predicted_area - intersection)
        per_category_accuracy = ratio(intersection, reference_area)
        averaged = np.ones(num_labels, bool)
        averaged[list(excluded_labels)] = False
        results = {
            "mean_iou": nanmean(per_category_iou[averaged]),
            "mean_accuracy": nanmean(per_category_accuracy[averaged]),
            "overall_accuracy": float(ratio(intersection.sum(), confusion.sum())),
            "per_category_iou": per_category_iou,
            "per_category_accuracy": per_category_accuracy,
        }
        if nan_to_num is not None:
            results = {name: np.nan_to_num(value, nan=nan_to_num) for name, value in results.items()}
        return results
