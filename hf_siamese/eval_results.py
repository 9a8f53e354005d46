"""Where a probe's results go: ``eval_results.json`` beside the model (merged with earlier probes') and its card.

The classification probe (``run_linear_probe.py``) and the dense probe (``run_dense_probe.py``) write the same
file, so one model card shows both; a rerun of a probe replaces its own records and pictures only.
"""

import json
import logging
from pathlib import Path

from .model_card import EVAL_RESULTS, add_eval_results_to_model_card, is_siamese_model_dir, write_model_card

logger = logging.getLogger(__name__)

RECORD_IDENTITY = ("dataset", "split", "protocol", "level", "metric", "k")


def results_dir(model_name_or_path: str, output_dir: str | None, default_root: str) -> Path:
    """Where the results go: ``output_dir``, else the model's own directory, else a folder for the Hub id."""
    model_dir = Path(model_name_or_path)
    if output_dir:
        folder = Path(output_dir)
    elif model_dir.is_dir():
        folder = model_dir
    else:  # a Hub id: a folder of its own, so that two models' results never mix
        folder = Path(default_root) / model_name_or_path.replace("/", "__")
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def write_eval_results(model_name_or_path: str, output_dir: Path, results: list[dict],
                       pictures: dict[str, dict | None]) -> Path:
    """Merge ``results`` and ``pictures`` (entry name -> what a probe drew, ``None``: nothing new) into
    ``eval_results.json``, and regenerate the model card when ``output_dir`` is the model's own directory."""
    model_dir = Path(model_name_or_path)
    path = output_dir / EVAL_RESULTS
    saved = json.loads(path.read_text()) if path.is_file() else {}
    if saved.get("model_name_or_path") != model_name_or_path:
        saved = {}  # another model's results: never mixed
    replaced = {_identity(record) for record in results}
    merged = [record for record in saved.get("results", []) if _identity(record) not in replaced] + results
    drawn = {name: picture or saved.get(name) for name, picture in pictures.items()}
    kept = {name: value for name, value in saved.items() if name not in ("model_name_or_path", "results", *drawn)}
    written = {"model_name_or_path": model_name_or_path, "results": merged, **kept,
               **{name: picture for name, picture in drawn.items() if picture}}
    path.write_text(json.dumps(written, indent=2))
    if output_dir.resolve() == model_dir.resolve():  # the model's own directory: its card shows the results
        if is_siamese_model_dir(model_dir):
            write_model_card(model_dir)
        elif (model_dir / "README.md").is_file():
            add_eval_results_to_model_card(model_dir / "README.md", results)
    logger.info("Wrote %d results to %s", len(results), path)
    return path


def _identity(record: dict) -> tuple:
    return tuple(record.get(key) for key in RECORD_IDENTITY)
