"""The Hub side of a model repository: the model card's ``model-index`` (evaluation results)."""

from pathlib import Path

from huggingface_hub import EvalResult, ModelCard

PROTOCOL_NAMES = {"knn": "kNN", "cached": "Linear probe", "augmented": "Linear probe (augmented)"}


def eval_result(record: dict) -> EvalResult:
    """A ``run_linear_probe`` result record as a model-index entry."""
    protocol = PROTOCOL_NAMES[record["protocol"]]
    if record["protocol"] == "knn":
        protocol += f" (k={record['k']})"
    level = "" if record["level"] == "last" else f", stage {record['level']}"
    top = record["metric"].removesuffix("_accuracy").capitalize()
    # model-index groups results by task and dataset, so the probe is named in the metric, not the task.
    return EvalResult(
        task_type="image-classification", task_name="Image classification on frozen features",
        dataset_type=record["dataset"], dataset_name=record["dataset"], dataset_split=record["split"],
        metric_type="accuracy", metric_name=f"{top} accuracy, {protocol}{level}", metric_value=record["value"],
    )


def add_eval_results_to_model_card(card_path: str | Path, records: list[dict]) -> ModelCard:
    """Add ``records`` to the card's ``model-index``, replacing earlier results of the same probe and dataset."""
    card = ModelCard.load(card_path)
    new = [eval_result(record) for record in records]
    replaced = {_identity(result) for result in new}
    kept = [result for result in card.data.eval_results or [] if _identity(result) not in replaced]
    card.data.eval_results = kept + new
    card.data.model_name = card.data.model_name or Path(card_path).resolve().parent.name
    card.save(card_path)
    return card


def _identity(result: EvalResult) -> tuple:
    return result.dataset_type, result.dataset_split, result.metric_name
