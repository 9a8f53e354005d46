"""Top-k accuracy: the fraction of examples whose reference label is among the k highest-ranked predictions.

``predictions`` are ranked label lists (best first, e.g. ``logits.topk(5).indices``); ``compute(k=5)`` scores
the first ``k`` of each. Shipped with hf_siamese so that it loads offline:
``evaluate.load("<path>/hf_siamese/metrics/top_k_accuracy")``.
"""

import datasets
import evaluate

_DESCRIPTION = "Top-k accuracy: the fraction of `references` found among the first `k` ranked `predictions`."
_INPUTS = """
Args:
    predictions (`list[list[int]]`): labels ranked from most to least likely, at least `k` per example.
    references (`list[int]`): true labels.
    k (`int`, defaults to 5): how many ranked labels count.
Returns:
    top_k_accuracy (`float`): in [0, 1].
Example:
    >>> top_k_accuracy.compute(predictions=[[2, 0], [1, 2]], references=[0, 0], k=2)
    {'top_k_accuracy': 0.5}
"""


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _INPUTS)
class TopKAccuracy(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation="",
            inputs_description=_INPUTS,
            features=datasets.Features(
                {"predictions": datasets.Sequence(datasets.Value("int64")), "references": datasets.Value("int64")}
            ),
        )

    def _compute(self, predictions, references, k: int = 5):
        if not references:
            raise ValueError("top_k_accuracy needs at least one reference label.")
        short = next((ranked for ranked in predictions if len(ranked) < k), None)
        if short is not None:
            raise ValueError(f"top_k_accuracy with k={k} needs {k} ranked labels per example, got {len(short)}.")
        correct = sum(int(r in ranked[:k]) for ranked, r in zip(predictions, references))
        return {"top_k_accuracy": correct / len(references)}
