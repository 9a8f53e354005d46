"""Top-1 accuracy: the fraction of predictions equal to their reference label.

The same inputs and output key as the Hub's ``evaluate-metric/accuracy``, shipped with hf_siamese so that it
loads offline: ``evaluate.load("<path>/hf_siamese/metrics/accuracy")``.
"""

import datasets
import evaluate

_DESCRIPTION = "Top-1 accuracy: the fraction of `predictions` equal to `references`."
_INPUTS = """
Args:
    predictions (`list[int]`): predicted labels.
    references (`list[int]`): true labels.
Returns:
    accuracy (`float`): in [0, 1].
Example:
    >>> accuracy.compute(predictions=[0, 1, 1], references=[0, 1, 0])
    {'accuracy': 0.6666666666666666}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class Accuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Value("int64"), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references):
        if not references:
            raise ValueError("accuracy needs at least one reference label.")
        correct = sum(int(p == r) for p, r in zip(predictions, references))
        return {"accuracy": correct / len(references)}
