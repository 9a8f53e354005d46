"""`run_linear_probe.py` end to end on a tiny labelled dataset: both protocols, multi-level, results and card."""

import json
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from conftest import tiny_config
from huggingface_hub import ModelCard
from PIL import Image
from transformers import TimmWrapperConfig, TimmWrapperImageProcessor, TimmWrapperModel

import run_linear_probe
from hf_siamese import SiameseModel
from hf_siamese.linear_probe import ProbeArguments, load_encoder, parse_levels
from hf_siamese.probing import InputSpec

ROOT = Path(__file__).resolve().parents[1]
BRIGHTNESS = (30, 90, 160, 230)  # the class of an image is its grey level: learnable from any encoder


def grey_images(count: int, seed: int) -> tuple[list[Image.Image], list[int]]:
    rng = np.random.default_rng(seed)
    labels = [index % len(BRIGHTNESS) for index in range(count)]
    images = [
        Image.fromarray(np.clip(BRIGHTNESS[label] + rng.normal(0, 8, (28, 28)), 0, 255).astype(np.uint8), "L")
        for label in labels
    ]
    return images, labels


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> dict[str, str]:
    directory = tmp_path_factory.mktemp("probe_data")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    files = {}
    for split, count, seed in (("train", 48, 0), ("test", 24, 1)):
        images, labels = grey_images(count, seed)
        files[split] = str(directory / f"{split}.parquet")
        datasets.Dataset.from_dict({"image": images, "label": labels}, features=features).to_parquet(files[split])
    return files


@pytest.fixture
def model_dir(tmp_path) -> Path:
    torch.manual_seed(0)
    SiameseModel(tiny_config(num_channels=1)).save_pretrained(tmp_path / "model")
    return tmp_path / "model"


def probe(model_dir, data, *extra) -> list[dict]:
    run_linear_probe.main([
        "--model_name_or_path", str(model_dir), "--train_data_files", data["train"], "--eval_data_files",
        data["test"], "--num_train_epochs", "30", "--per_device_train_batch_size", "16", "--learning_rate", "4.0",
        "--disable_tqdm", "true", "--pictures", "false", *extra,
    ])
    return json.loads((Path(model_dir) / "eval_results.json").read_text())["results"]


def by_key(results):
    return {(r["protocol"], r["level"], r["metric"], r.get("k")): r["value"] for r in results}


def test_cached_protocol_on_every_level(model_dir, data):
    results = by_key(probe(model_dir, data, "--probe_levels", "all", "--knn_k", "5,200"))
    levels = [1, 2, 3, 4]
    expected = {("knn", level, "top1_accuracy", k) for level in levels for k in (5, 48)}  # k=200 capped at 48
    expected |= {("cached", level, "top1_accuracy", None) for level in levels}
    assert set(results) == expected  # 4 classes: no top-5
    assert all(results["cached", level, "top1_accuracy", None] >= 0.9 for level in levels)
    assert results["knn", 1, "top1_accuracy", 5] >= 0.9  # deep random features lose the grey level's direction

    card = ModelCard.load(model_dir / "README.md")  # an hf_siamese directory: the card is generated
    metrics = {result.metric_name: result.metric_value for result in card.data.eval_results}
    assert len(metrics) == len(results)
    assert metrics["Top1 accuracy, Linear probe, stage 2"] == results["cached", 2, "top1_accuracy", None]
    assert metrics["Top1 accuracy, kNN (k=5), stage 4"] == results["knn", 4, "top1_accuracy", 5]
    assert f"| Linear probe | 2 | top1_accuracy | {results['cached', 2, 'top1_accuracy', None] * 100:.2f}% |" in card.text

    probe(model_dir, data, "--probe_levels", "all", "--knn_k", "5,200")  # again: results replaced, not duplicated
    assert len(ModelCard.load(model_dir / "README.md").data.eval_results) == len(card.data.eval_results)
    probe(model_dir, data, "--probe_levels", "2", "--knn_k", "", "--protocol", "augmented", "--num_train_epochs", "1")
    merged = by_key(json.loads((model_dir / "eval_results.json").read_text())["results"])
    assert set(merged) == set(results) | {("augmented", 2, "top1_accuracy", None)}  # other probes' results kept


def test_augmented_protocol_and_chosen_levels(model_dir, data):
    results = by_key(probe(model_dir, data, "--protocol", "augmented", "--probe_levels", "2,last", "--knn_k", ""))
    assert set(results) == {("augmented", 2, "top1_accuracy", None), ("augmented", "last", "top1_accuracy", None)}
    assert results["augmented", "last", "top1_accuracy", None] >= 0.9


def test_a_timm_wrapped_model_through_automodel(tmp_path, data):
    pretrained_cfg = {"input_size": [1, 32, 32], "mean": [0.5], "std": [0.25], "crop_pct": 1.0,
                      "interpolation": "bilinear", "num_classes": 0}
    config = TimmWrapperConfig(architecture="resnet18", num_classes=0, pretrained_cfg=pretrained_cfg,
                               model_args={"in_chans": 1})
    torch.manual_seed(0)
    TimmWrapperModel(config).save_pretrained(tmp_path)
    (tmp_path / "README.md").write_text("---\nlicense: mit\n---\n# Somebody's timm model\n")
    assert TimmWrapperImageProcessor(pretrained_cfg=pretrained_cfg).data_config["input_size"] == (1, 32, 32)
    model, spec = load_encoder(ProbeArguments(model_name_or_path=str(tmp_path), dataset_name="unused"))
    assert type(model).__name__ == "TimmWrapperModel"
    assert spec == InputSpec(image_size=32, num_channels=1, image_mean=(0.5,), image_std=(0.25,))
    results = by_key(probe(tmp_path, data, "--knn_k", "5"))
    assert set(results) == {("knn", "last", "top1_accuracy", 5), ("cached", "last", "top1_accuracy", None)}
    assert min(results.values()) > 0.4  # chance is 0.25; random deep features keep part of the grey level
    card = ModelCard.load(tmp_path / "README.md")  # not ours: results merged into its model-index, text kept
    assert card.data.license == "mit" and "# Somebody's timm model" in card.text
    assert {r.metric_name: r.metric_value for r in card.data.eval_results}["Top1 accuracy, Linear probe"] == \
        results["cached", "last", "top1_accuracy", None]
    before = (tmp_path / "README.md").read_text()
    probe(tmp_path, data, "--knn_k", "", "--num_train_epochs", "1", "--output_dir", str(tmp_path / "elsewhere"))
    assert (tmp_path / "elsewhere" / "eval_results.json").is_file()
    assert (tmp_path / "README.md").read_text() == before  # results written elsewhere leave the card alone
    with pytest.raises(ValueError, match="`probe_levels` 'all' needs an hf_siamese model"):
        probe(tmp_path, data, "--probe_levels", "all")


def test_levels_and_arguments_are_checked():
    model = SiameseModel(tiny_config())
    assert parse_levels("all", model) == [1, 2, 3, 4]
    assert parse_levels("3, last, 3", model) == [3, "last"]
    with pytest.raises(ValueError, match="`probe_levels` entry '5' is not a level of this model; valid: 1..4"):
        parse_levels("5", model)
    with pytest.raises(ValueError, match="`mixed_precision` must be one of \\['no', 'bf16', 'fp16'\\], got 'int8'"):
        ProbeArguments(model_name_or_path="m", dataset_name="fashion_mnist", mixed_precision="int8")
    with pytest.raises(ValueError, match="`protocol` must be one of"):
        ProbeArguments(model_name_or_path="x", protocol="finetune")
    with pytest.raises(ValueError, match="No eval data: set `dataset_name` \\(with `eval_split`\\), `eval_dir`"):
        ProbeArguments(model_name_or_path="x", train_dir="images")
    with pytest.raises(ValueError, match="`knn_k` must be comma-separated integers"):
        ProbeArguments(model_name_or_path="x", knn_k="twenty").knn_neighbours


def test_missing_label_column_is_named(model_dir, data):
    with pytest.raises(ValueError, match="`label_column` 'class'"):
        probe(model_dir, data, "--label_column", "class")


def test_help_lists_the_fields():
    result = subprocess.run([sys.executable, str(ROOT / "run_linear_probe.py"), "--help"], capture_output=True,
                            text=True, check=True)
    for name in ("--protocol", "--probe_levels", "--knn_k", "--eval_data_files", "--max_eval_samples"):
        assert name in result.stdout
