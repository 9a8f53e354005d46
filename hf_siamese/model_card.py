"""A model directory's card, generated from the run, never hand-edited.

A pretraining run leaves ``config.json``, ``training_run.json`` (what the run did), ``metrics.jsonl`` (the loss
curve) and, once probed, ``eval_results.json``; :func:`write_model_card` turns them into ``README.md`` (front
matter with ``model-index``) and ``loss_curve.svg``.
"""

import json
from pathlib import Path

import torch
from huggingface_hub import EvalResult, ModelCard, ModelCardData

from .backbones import create_backbone
from .configuration_siamese import SiameseConfig
from .data import FASHION_MNIST
from .sources import DATASET, describe_source
from .fashion_mnist import HUB_ID as FASHION_MNIST_HUB_ID

TRAINING_RUN = "training_run.json"
EVAL_RESULTS = "eval_results.json"
METRICS = "metrics.jsonl"
LOSS_CURVE = "loss_curve.svg"
PROTOCOL_NAMES = {"knn": "kNN", "cached": "Linear probe", "augmented": "Linear probe (augmented)"}
DENSE_PROTOCOL_NAMES = {"dense_linear": "Frozen linear segmentation probe", "dense_upernet": "UperNet, fine-tuned"}
FRAMEWORK_NAMES = {"moco": "MoCo (Asym-Siam's MoCo v2 + BN projector)", "mocov3": "MoCo v3", "byol": "BYOL",
                   "simsiam": "SimSiam"}
DESIGN_TAGS = {"multicrop": "multicrop", "scalemix": "scalemix", "asym_aug": "asym-aug", "asym_bn": "asym-bn",
               "mean_encoding": "mean-encoding"}
HUB_DATASETS = {FASHION_MNIST: FASHION_MNIST_HUB_ID}  # our short names -> Hub ids, for the card's `datasets`
CITATIONS = """```bibtex
@inproceedings{wang2022asym,
  title     = {On the Importance of Asymmetry for Siamese Representation Learning},
  author    = {Xiao Wang and Haoqi Fan and Yuandong Tian and Daisuke Kihara and Xinlei Chen},
  booktitle = {CVPR},
  year      = {2022}
}
@inproceedings{yoshihashi2023ladder,
  title     = {Ladder Siamese Network: a Method and Insights for Multi-level Self-Supervised Learning},
  author    = {Ryota Yoshihashi and Shuhei Nishimura and Dai Yonebayashi and Yuya Otsuka and Tomohiro Tanaka
               and Takashi Miyazaki},
  booktitle = {ICIP},
  year      = {2023}
}
```"""


def eval_result(record: dict) -> EvalResult:
    """A ``run_linear_probe`` or ``run_dense_probe`` result record as a model-index entry."""
    if record["protocol"] in DENSE_PROTOCOL_NAMES:
        return EvalResult(
            task_type="image-segmentation", task_name="Semantic segmentation",
            dataset_type=record["dataset"], dataset_name=record["dataset"], dataset_split=record["split"],
            metric_type=record["metric"], metric_value=record["value"],
            metric_name=f"{record['metric']}, {DENSE_PROTOCOL_NAMES[record['protocol']]}, level {record['level']}",
        )
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
    """Add ``records`` to an existing card's ``model-index``, replacing earlier values of the same metric."""
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


def is_siamese_model_dir(path: str | Path) -> bool:
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == SiameseConfig.model_type


def write_model_card(model_dir: str | Path, model_id: str | None = None) -> ModelCard:
    """(Re)generate ``README.md`` and ``loss_curve.svg`` of an hf_siamese model directory from its run files."""
    model_dir = Path(model_dir)
    config = SiameseConfig.from_pretrained(model_dir)
    run = _read_json(model_dir / TRAINING_RUN) or {}
    evaluation = _read_json(model_dir / EVAL_RESULTS) or {}
    records = evaluation.get("results", [])
    losses = _loss_points(model_dir / METRICS)
    if losses:
        (model_dir / LOSS_CURVE).write_text(loss_curve_svg(losses))
    model_id = model_id or run.get("hub_model_id") or model_dir.resolve().name
    hub_dataset = HUB_DATASETS.get(_dataset_name(run), _dataset_name(run))
    data = ModelCardData(
        license="apache-2.0", library_name="transformers", pipeline_tag="image-feature-extraction",
        tags=["self-supervised", "image-feature-extraction", "hf_siamese", config.framework, *_design_tags(config)],
        datasets=[hub_dataset] if hub_dataset else None,
        model_name=model_id, eval_results=[eval_result(record) for record in records] or None,
    )
    body = "\n\n".join([
        f"# {model_id}",
        _summary(config),
        "## Training\n\n" + _training_table(config, run) + (f"\n\n![Pretraining loss]({LOSS_CURVE})" if losses else ""),
        "## Evaluation\n\n" + _evaluation_table(records) + _pictures(model_dir, evaluation.get("pictures"))
        + _dense_section(model_dir, records, evaluation.get("dense_pictures")),
        "## Usage\n\n" + _usage(model_id),
        "## Citation\n\n" + CITATIONS,
    ])
    card = ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}\n")
    card.save(model_dir / "README.md")
    return card


def _pictures(model_dir: Path, pictures: dict | None) -> str:
    """The probe's gallery and map, when they are in the model directory."""
    if not pictures or not all((model_dir / pictures[key]).is_file() for key in ("gallery", "embedding_map")):
        return ""
    return (f"\n\n![Nearest training images of evaluation images]({pictures['gallery']})\n\n"
            f"Each row: an evaluation image, then its nearest training images by the kNN probe's cosine similarity (red: "
            f"another class).\n\n![{pictures['map_method']} of the evaluation features]({pictures['embedding_map']})\n\n"
            f"{pictures['map_method']} of {pictures['map_points']} evaluation images' features, coloured by class.")


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.is_file() else None


def _loss_points(path: Path) -> list[tuple[int, float]]:
    if not path.is_file():
        return []
    records = (json.loads(line) for line in path.read_text().splitlines() if line.strip())
    return [(record["step"], record["loss"]) for record in records if "loss" in record]


def _design_tags(config: SiameseConfig) -> list[str]:
    tags = [tag for field, tag in DESIGN_TAGS.items() if getattr(config, field)]
    return tags + (["ladder-siamese"] if config.ladder_levels and len(config.ladder_levels) > 1 else [])


def _designs(config: SiameseConfig) -> str:
    parts = []
    if config.multicrop:
        parts.append(f"MultiCrop ({config.multicrop_num_local} x {config.multicrop_local_size} px local crops)")
    if config.scalemix:
        parts.append(f"ScaleMix (p = {config.scalemix_probability})")
    if config.asym_aug:
        parts.append("AsymAug (RandAugment on the source only)")
    if config.asym_bn:
        parts.append("AsymBN (synchronised target BN, ghost-batch source BN)")
    if config.mean_encoding:
        parts.append(f"MeanEnc ({config.mean_encoding_views} target views)")
    return ", ".join(parts) or "none"


def _summary(config: SiameseConfig) -> str:
    ladder = (f" Ladder Siamese losses at levels {list(config.ladder_levels)}."
              if config.ladder_levels and len(config.ladder_levels) > 1 else "")
    return (
        f"A self-supervised image encoder: {FRAMEWORK_NAMES[config.framework]} on a timm `{config.backbone}` "
        f"backbone ({config.image_size} px, {config.num_channels} channel{'s' if config.num_channels > 1 else ''}), "
        f"trained with hf_siamese. Asymmetric designs "
        f"(Wang et al., CVPR 2022): {_designs(config)}.{ladder} `AutoModel` gives the source encoder: "
        f"`pooler_output` is the {_feature_width(config)}-d feature the evaluation below probes."
    )


def _feature_width(config: SiameseConfig) -> str:
    with torch.device("meta"):  # the architecture only: no weights allocated or initialised
        return str(create_backbone(config).num_features)


def _training_table(config: SiameseConfig, run: dict) -> str:
    rows = [("framework", config.framework), ("backbone", f"`{config.backbone}`"),
            ("input", f"{config.image_size} px, {config.num_channels} channel(s)"),
            ("view recipe", config.augmentation), ("asymmetric designs", _designs(config)),
            ("ladder levels", list(config.ladder_levels) if config.ladder_levels else "last only")]
    if run:
        epochs = f" ({run['epochs']:.2f} epochs)" if run.get("epochs") is not None else ""
        rows += [
            ("data", _data(run)),
            *([("started from", f"`{run['model_name_or_path']}`")] if run.get("model_name_or_path") else []),
            *([("resumed from", f"`{run['resumed_from']}`")] if run.get("resumed_from") else []),
            ("steps", f"{run['steps']}{epochs}"),
            ("batch", f"{run['global_batch']} ({run['per_device_train_batch_size']} per process x "
                      f"{run['processes']} process(es) x {run['gradient_accumulation_steps']} accumulation)"),
            ("optimizer", f"{run['optimizer']}, lr {run['learning_rate']:.4g} ({run['base_learning_rate']} per 256), "
                          f"weight decay {run['weight_decay']}, {run['lr_scheduler_type']}, "
                          f"{run['warmup_steps']} warm-up steps"),
            ("precision", run["mixed_precision"]), ("seed", run["seed"]), ("hardware", run["hardware"]),
            ("wall time", _duration(run["train_seconds"])),
        ]
    return "| | |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def _data(run: dict) -> str:
    """What the run read; runs recorded before the source record give the name or paths alone."""
    if isinstance(run.get("data"), dict):
        return describe_source(run["data"])
    return run.get("dataset_name") or run.get("data") or "-"


def _dataset_name(run: dict) -> str | None:
    """The dataset the card's metadata names: a dataset read by name, not local files."""
    data = run.get("data")
    if isinstance(data, dict):
        return data["name"] if data["kind"] == DATASET else None
    return run.get("dataset_name")


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes} min" if hours else f"{minutes} min {seconds} s"


def _dense_section(model_dir: Path, records: list[dict], pictures: dict | None) -> str:
    """Dense transfer: the dense probe's mIoU and pixel accuracy per protocol and level, and its picture."""
    scores: dict[tuple, dict] = {}
    for record in (r for r in records if r["protocol"] in DENSE_PROTOCOL_NAMES):
        key = (record["protocol"], str(record["level"]), record["dataset"], record["split"])
        scores.setdefault(key, {})[record["metric"]] = record["value"]
    if not scores:
        return ""
    rows = ["| probe | level | mIoU | pixel accuracy | dataset | split |", "|---|---|---|---|---|---|"]
    rows += [f"| {DENSE_PROTOCOL_NAMES[protocol]} | {level} | {values.get('mean_iou', float('nan')) * 100:.2f}% | "
             f"{values.get('pixel_accuracy', float('nan')) * 100:.2f}% | {dataset} | {split} |"
             for (protocol, level, dataset, split), values in scores.items()]
    picture = ""
    if pictures and (model_dir / pictures["examples"]).is_file():
        picture = (f"\n\n![{pictures['title']}]({pictures['examples']})\n\nEvaluation scenes, their label maps and "
                   f"the {pictures['title']}'s prediction.")
    return "\n\n### Dense transfer\n\n" + "\n".join(rows) + picture


def _evaluation_table(records: list[dict]) -> str:
    records = [record for record in records if record["protocol"] not in DENSE_PROTOCOL_NAMES]
    if not records:
        return "Not evaluated yet: `python run_linear_probe.py --model_name_or_path <this directory> ...` fills this in."
    rows = ["| probe | level | metric | value | dataset | split |", "|---|---|---|---|---|---|"]
    for record in records:
        probe = f"kNN, k={record['k']}" if record["protocol"] == "knn" else PROTOCOL_NAMES[record["protocol"]]
        rows.append(f"| {probe} | {record['level']} | {record['metric']} | {record['value'] * 100:.2f}% | "
                    f"{record['dataset']} | {record['split']} |")
    return "\n".join(rows)


def _usage(model_id: str) -> str:
    return f"""```python
import hf_siamese  # pip install hf_siamese: registers the model with the Auto classes
from transformers import AutoImageProcessor, AutoModel, pipeline

processor = AutoImageProcessor.from_pretrained("{model_id}")
encoder = AutoModel.from_pretrained("{model_id}")
features = encoder(**processor(images, return_tensors="pt")).pooler_output

# without hf_siamese installed: the modeling code ships with the weights
encoder = AutoModel.from_pretrained("{model_id}", trust_remote_code=True)

# as a pipeline: one pooled feature vector per image
extractor = pipeline("image-feature-extraction", model="{model_id}", pool=True)

# as a plain timm model (no hf_siamese needed to load the export)
from hf_siamese.timm_export import export_timm
import timm
export_timm("{model_id}", "encoder-timm")
backbone = timm.create_model("local-dir:encoder-timm", pretrained=True)
```"""


def loss_curve_svg(points: list[tuple[int, float]], width: int = 640, height: int = 320) -> str:
    """The loss against the step as a standalone SVG line chart (no plotting library needed)."""
    margin = 48
    steps, losses = [p[0] for p in points], [p[1] for p in points]
    low, high = min(losses), max(losses)
    span_x, span_y = max(steps[-1] - steps[0], 1), max(high - low, 1e-12)

    def x(step):
        return margin + (step - steps[0]) / span_x * (width - 2 * margin)

    def y(loss):
        return height - margin - (loss - low) / span_y * (height - 2 * margin)

    line = " ".join(f"{x(s):.1f},{y(v):.1f}" for s, v in points)
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" '
        f'font-size="12">\n<rect width="100%" height="100%" fill="white"/>\n'
        f'<line x1="{margin}" y1="{height - margin}" x2="{width - margin}" y2="{height - margin}" stroke="black"/>\n'
        f'<line x1="{margin}" y1="{margin}" x2="{margin}" y2="{height - margin}" stroke="black"/>\n'
        f'<polyline fill="none" stroke="#1f77b4" stroke-width="2" points="{line}"/>\n'
        f'<text x="{width / 2}" y="{height - 12}" text-anchor="middle">step ({steps[0]} to {steps[-1]})</text>\n'
        f'<text x="8" y="{margin - 8}">loss {high:.4g}</text>\n'
        f'<text x="8" y="{height - margin + 16}">{low:.4g}</text>\n'
        f"</svg>\n"
    )
