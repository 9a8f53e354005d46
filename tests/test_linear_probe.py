"""`run_linear_probe.py` end to end on a tiny labelled dataset: both protocols, multi-level, results and card;
the probe's data: one source per split, labels matched by class name, training images kept out of evaluation,
undecodable images skipped and counted."""

import io
import json
import logging
import re
import shutil
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
from hf_siamese.linear_probe import ProbeArguments, align_labels, load_encoder, parse_levels
from hf_siamese.linear_probe import run_linear_probe as probe_job
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


SHADES = {"a_dark": 30, "b_mid": 130, "c_light": 230}  # imagefolder numbers class subfolders alphabetically


def shade_folder(root: Path, count: int, classes=tuple(SHADES), seed: int = 0) -> Path:
    """An image folder: ``count`` noisy grey PNGs in each class subfolder, a class being a grey level."""
    rng = np.random.default_rng(seed)
    for name in classes:
        (root / name).mkdir(parents=True)
        for index in range(count):
            pixels = np.clip(SHADES[name] + rng.normal(0, 8, (28, 28)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels, "L").save(root / name / f"{index}.png")
    return root


def truncated_jpeg(path: Path) -> Path:
    encoded = io.BytesIO()
    Image.new("L", (28, 28), 128).save(encoded, "JPEG")
    path.write_bytes(encoded.getvalue()[: len(encoded.getvalue()) // 2])
    return path


def probe_folders(model_dir, train_dir, eval_dir, **fields) -> list[dict]:
    """kNN (k = 5) and the cached probe of two image folders, at stage 1: this run's records alone."""
    defaults = dict(model_name_or_path=str(model_dir), train_dir=str(train_dir), eval_dir=str(eval_dir), knn_k="5",
                    probe_levels="1",  # a random encoder keeps the grey level best at its first stage
                    num_train_epochs=10, per_device_train_batch_size=16, learning_rate=4.0, disable_tqdm=True,
                    pictures=False)
    return probe_job(ProbeArguments(**{**defaults, **fields}))


def test_each_split_takes_exactly_one_source_checked_under_its_own_field(tmp_path, data):
    folder = shade_folder(tmp_path / "val", 1)
    with pytest.raises(ValueError, match="evaluation data has two sources, `dataset_name` 'fashion_mnist' and "
                                         f"`eval_dir` '{re.escape(str(folder))}'"):
        ProbeArguments(model_name_or_path="m", dataset_name="fashion_mnist", eval_dir=str(folder))
    with pytest.raises(ValueError, match="training data has two sources, `dataset_name` 'fashion_mnist' and "
                                         "`train_data_files`"):
        ProbeArguments(model_name_or_path="m", dataset_name="fashion_mnist", train_data_files=data["train"])
    with pytest.raises(FileNotFoundError, match="`eval_dir` '.*missing': the folder does not exist"):
        ProbeArguments(model_name_or_path="m", train_data_files=data["train"], eval_dir=str(tmp_path / "missing"))
    with pytest.raises(NotADirectoryError, match="`train_dir` '.*test.parquet' is a file"):
        ProbeArguments(model_name_or_path="m", train_dir=data["test"], eval_dir=str(folder))
    with pytest.raises(ValueError, match="`eval_data_files` takes parquet .* is a folder"):
        ProbeArguments(model_name_or_path="m", train_data_files=data["train"], eval_data_files=str(folder))


def test_eval_labels_are_matched_to_the_training_classes_by_name(tmp_path, model_dir, caplog):
    train, full = shade_folder(tmp_path / "train", 8), shade_folder(tmp_path / "val", 6, seed=1)
    for name in ("b_mid", "c_light"):  # without a_dark, imagefolder would number b_mid 0 and c_light 1
        shutil.copytree(full / name, tmp_path / "val_bc" / name)
    whole = by_key(probe_folders(model_dir, train, full))
    first = by_key(probe_folders(model_dir, train, full, max_eval_samples=6))  # rows in path order: a_dark's 6
    with caplog.at_level(logging.WARNING, logger="hf_siamese"):
        bc = by_key(probe_folders(model_dir, train, tmp_path / "val_bc"))
    assert min(bc.values()) >= 0.9
    for key, value in whole.items():  # every image is scored as it is in the whole folder
        assert value * 18 == pytest.approx(first[key] * 6 + bc[key] * 12)
    absent = [record.message for record in caplog.records if "absent from the evaluation data" in record.message]
    assert len(absent) == 1 and "['a_dark']" in absent[0]


def test_an_eval_class_the_training_data_lacks_is_an_error_naming_it_and_both_sources(tmp_path, model_dir):
    train = shade_folder(tmp_path / "train", 4, classes=("b_mid", "c_light"))
    val = shade_folder(tmp_path / "val", 2, seed=1)
    with pytest.raises(ValueError, match=rf"class\(es\) \['a_dark'\] of `eval_dir` '{re.escape(str(val))}' are not "
                                         rf"classes of the training data `train_dir` '{re.escape(str(train))}'"):
        probe_folders(model_dir, train, val)


def test_class_names_on_one_side_only_are_an_error_and_plain_ids_are_taken_as_given():
    def labels(values, names=None):
        feature = datasets.ClassLabel(names=names) if names else datasets.Value("int64")
        return datasets.Dataset.from_dict({"label": values}, features=datasets.Features({"label": feature}))

    named, plain = labels([0, 1], ["cat", "dog"]), labels([1, 0])
    with pytest.raises(ValueError, match="class names \\(a ClassLabel\\) in `train_dir` 'a' but plain integer ids "
                                         "in `eval_data_files` 'b'"):
        align_labels(named, plain, "label", sources=("`train_dir` 'a'", "`eval_data_files` 'b'"))
    assert align_labels(plain, plain, "label") is plain
    reordered = align_labels(named, labels([0, 1], ["dog", "cat"]), "label")
    assert list(reordered["label"]) == [1, 0] and reordered.features["label"].names == ["cat", "dog"]


def test_evaluating_on_the_training_source_is_refused(tmp_path, data):
    folder = shade_folder(tmp_path / "images", 1)
    same = "the probe would score on its training images"
    named = re.escape(str(folder))
    with pytest.raises(ValueError, match=f"`eval_dir` '{named}/\\.'.*`train_dir` '{named}'.*{same}"):
        ProbeArguments(model_name_or_path="m", train_dir=str(folder), eval_dir=f"{folder}/.")
    with pytest.raises(ValueError, match=same):
        ProbeArguments(model_name_or_path="m", dataset_name="fashion_mnist", eval_split="train")
    everything = str(Path(data["train"]).parent / "*.parquet")  # the evaluation file among the training files
    with pytest.raises(ValueError, match=same):
        ProbeArguments(model_name_or_path="m", train_data_files=everything, eval_data_files=data["test"])
    ProbeArguments(model_name_or_path="m", dataset_name="fashion_mnist", eval_split="train[50000:]",
                   train_split="train[:50000]")  # two parts of a split: their shared images are only counted


def test_eval_images_identical_to_training_images_are_counted_in_a_warning(tmp_path, model_dir, data, caplog):
    train, test = (datasets.load_dataset("parquet", data_files=data[name], split="train") for name in ("train", "test"))
    mixed = str(tmp_path / "mixed.parquet")
    datasets.concatenate_datasets([test, train.select(range(3))]).to_parquet(mixed)
    with caplog.at_level(logging.WARNING, logger="hf_siamese"):
        probe(model_dir, {"train": data["train"], "test": mixed}, "--knn_k", "5", "--num_train_epochs", "1")
    assert "3 of 27 evaluation images (11.1%) are byte-identical to training images" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hf_siamese"):
        probe(model_dir, data, "--knn_k", "5", "--num_train_epochs", "1")
    assert "byte-identical" not in caplog.text


def test_a_folder_without_class_subfolders_says_the_probe_needs_them(tmp_path, model_dir):
    flat = tmp_path / "flat"
    flat.mkdir()
    for index, image in enumerate(grey_images(4, seed=2)[0]):
        image.save(flat / f"{index}.png")
    with pytest.raises(ValueError, match=f"evaluation data, `eval_dir` '{re.escape(str(flat))}', has no class "
                                         "subfolders.*one subfolder per class"):
        probe_folders(model_dir, shade_folder(tmp_path / "train", 2), flat)


def test_undecodable_images_are_skipped_logged_with_their_split_and_file_and_counted_once(tmp_path, model_dir,
                                                                                          caplog, capsys):
    train, val = shade_folder(tmp_path / "train", 8), shade_folder(tmp_path / "val", 6, seed=1)
    broken = {"train": truncated_jpeg(train / "b_mid" / "broken.jpg"),
              "eval": truncated_jpeg(val / "c_light" / "broken.jpg")}

    def run(*extra) -> list[dict]:
        caplog.clear()
        with caplog.at_level(logging.WARNING, logger="hf_siamese"):
            run_linear_probe.main(["--model_name_or_path", str(model_dir), "--train_dir", str(train), "--eval_dir",
                                   str(val), "--num_train_epochs", "3", "--per_device_train_batch_size", "8",
                                   "--disable_tqdm", "true", *extra])
        return json.loads((model_dir / "eval_results.json").read_text())["results"]

    def skip_messages(split: str) -> list[str]:
        name = f"{broken[split].parent.name}/{broken[split].name}"
        return [record.message for record in caplog.records
                if f"undecodable {split} image" in record.message and name in record.message]

    records = run("--knn_k", "5")  # pictures on: drawn from the decodable rows
    assert (model_dir / "knn_gallery.png").is_file()
    assert [record["skipped_images"] for record in records] == [{"train": 1, "eval": 1}] * len(records)
    assert {(record["num_train"], record["num_eval"]) for record in records} == {(24, 18)}
    assert len(skip_messages("train")) == len(skip_messages("eval")) == 1
    assert "Skipped undecodable images: 1 train, 1 eval" in capsys.readouterr().out

    records = run("--protocol", "augmented", "--knn_k", "", "--pictures", "false")  # 3 epochs re-read the image
    augmented = [record["skipped_images"] for record in records if record["protocol"] == "augmented"]
    assert augmented == [{"train": 1, "eval": 1}]
    assert len(skip_messages("train")) == 1
