"""run_dense_probe.py: the frozen linear segmentation probe and UperNet fine-tuning on Fashion-MNIST scenes, end to
end on a tiny encoder; the probe head, the level choice and the scores on their own."""

import json

import numpy as np
import pytest
import torch
from datasets import Dataset, Features, Image
from huggingface_hub import ModelCard

import run_dense_probe
from hf_siamese import SiameseConfig, SiameseForPreTraining, SiameseModel, dense_probe
from hf_siamese.dense_probe import (
    DenseProbeArguments, LinearSegmentationHead, fit_linear_head, predict_linear, score, stage_names,
)
from hf_siamese.scenes import save_scenes

TINY_SMALL_IMAGE_ENCODER = dict(backbone="resnet18", framework="byol", image_size=28, num_channels=1,
                                small_image_stem=True, backbone_kwargs={"channels": [8, 16, 32, 64]},
                                projector_hidden_dim=32, projector_dim=16, predictor_hidden_dim=32)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("dense") / "model"
    torch.manual_seed(0)
    SiameseForPreTraining(SiameseConfig(**TINY_SMALL_IMAGE_ENCODER)).save_pretrained(directory)
    return directory


def probe(model_dir, *extra):
    run_dense_probe.main(["--model_name_or_path", str(model_dir), "--num_train_scenes", "48", "--num_eval_scenes",
                          "16", "--num_train_epochs", "2", "--per_device_train_batch_size", "16", *extra])
    return json.loads((model_dir / "eval_results.json").read_text())


def test_the_linear_probe_writes_miou_per_class_and_a_picture_into_the_card(model_dir):
    saved = probe(model_dir, "--probe_levels", "multi")
    records = {record["metric"]: record for record in saved["results"] if record["protocol"] == "dense_linear"}
    miou, accuracy = records["mean_iou"], records["pixel_accuracy"]
    assert 0 <= miou["value"] <= 1 and 0 < accuracy["value"] <= 1
    assert (miou["level"], miou["num_train"], miou["num_eval"], miou["dataset"]) == ("multi", 48, 16,
                                                                                       "fashion_mnist_scenes")
    assert miou["learning_rate"] == 3e-2  # the linear protocol's default
    assert set(miou["per_class_iou"]) == {"background", "T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                                          "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"}
    assert saved["dense_pictures"]["examples"] == "dense_examples.png" and (model_dir / "dense_examples.png").is_file()
    card = ModelCard.load(model_dir / "README.md")
    assert "### Dense transfer" in card.text and "| Frozen linear segmentation probe | multi |" in card.text
    assert "![linear probe, level multi](dense_examples.png)" in card.text
    assert any(result.task_type == "image-segmentation" for result in card.data.eval_results)


def test_upernet_fine_tuning_adds_its_own_records(model_dir):
    saved = probe(model_dir, "--protocol", "upernet", "--num_train_epochs", "1", "--upernet_hidden_size", "16",
                  "--pictures", "false")
    protocols = {(record["protocol"], record["metric"]) for record in saved["results"]}
    assert {("dense_upernet", "mean_iou"), ("dense_upernet", "pixel_accuracy")} <= protocols
    assert "| UperNet, fine-tuned | multi |" in (model_dir / "README.md").read_text()


def test_probe_levels_name_the_encoders_stages():
    stages = ["stem", "stage1", "stage2", "stage3", "stage4"]
    assert stage_names("last", stages) == ["stage4"]
    assert stage_names("multi", stages) == ["stage1", "stage2", "stage3", "stage4"]
    assert stage_names("2,4", stages) == ["stage2", "stage4"]
    with pytest.raises(ValueError, match=r"stages are 1\.\.4"):
        stage_names("5", stages)
    assert stage_names("1", ["stem1", "stem2", "block1", "block2"]) == ["block1"]  # a backbone with two stems
    with pytest.raises(ValueError, match="`probe_levels` must be"):
        stage_names("deep", stages)
    with pytest.raises(ValueError, match="`protocol` must be one of"):
        DenseProbeArguments(model_name_or_path="x", protocol="mask2former")


def test_each_protocol_has_its_own_default_learning_rate_and_a_given_one_wins():
    assert DenseProbeArguments(model_name_or_path="x").learning_rate == 3e-2
    assert DenseProbeArguments(model_name_or_path="x", protocol="upernet").learning_rate == 1e-3
    assert DenseProbeArguments(model_name_or_path="x", protocol="upernet", learning_rate=0.1).learning_rate == 0.1


def test_the_linear_head_learns_labels_that_its_features_hold():
    # Two levels at two resolutions; the label is the argmax of the coarse map's channels as the head upsamples it.
    generator = torch.Generator().manual_seed(0)
    coarse = torch.randn(64, 3, 4, 4, generator=generator)
    fine = torch.randn(64, 2, 8, 8, generator=generator)
    labels = torch.nn.functional.interpolate(coarse, size=(8, 8), mode="bilinear").argmax(1)
    args = DenseProbeArguments(model_name_or_path="x", num_train_epochs=60, per_device_train_batch_size=16,
                               learning_rate=0.05)
    head = fit_linear_head([coarse, fine], labels, 3, args)
    assert isinstance(head, LinearSegmentationHead)
    predictions = predict_linear(head, [coarse, fine], (8, 8), batch_size=16)
    assert (predictions == labels).float().mean() > 0.95


def test_scores_are_the_mean_iou_metrics_as_unrounded_fractions():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 2, 2]]])
    predictions = torch.tensor([[[0, 0, 1, 2], [0, 0, 2, 2]]])
    scores = score(predictions, labels, {0: "background", 1: "a", 2: "b"})
    # IoU: background 4/4, a 1/2, b 2/3; pixel accuracy 7/8.
    assert scores["per_class_iou"] == pytest.approx({"background": 1.0, "a": 0.5, "b": 2 / 3}, rel=1e-9)
    assert scores["miou"] == pytest.approx((1 + 0.5 + 2 / 3) / 3, rel=1e-9)
    assert scores["pixel_accuracy"] == 0.875


def test_a_scenes_folder_is_probed_with_the_class_names_it_was_saved_with(model_dir, tmp_path):
    save_scenes(tmp_path / "scenes", train_count=32, test_count=16, seed=0)
    saved = probe(model_dir, "--dataset_name", str(tmp_path / "scenes"), "--pictures", "false")
    miou = next(r for r in saved["results"] if r["metric"] == "mean_iou" and r["dataset"] == str(tmp_path / "scenes"))
    assert list(miou["per_class_iou"])[:2] == ["background", "T-shirt/top"] and len(miou["per_class_iou"]) == 11


def label_map_folder(folder, label_maps: list[np.ndarray]) -> str:
    """A dataset of grey images with the given label maps, without id2label.json."""
    rows = {"image": [np.full(label.shape, 100, np.uint8) for label in label_maps], "annotation": label_maps}
    (folder / "data").mkdir()
    Dataset.from_dict(rows, features=Features({"image": Image(), "annotation": Image()})).to_parquet(
        folder / "data" / "train-00000-of-00001.parquet")
    return str(folder)


def test_without_id2label_the_classes_are_the_labels_seen_in_either_split_and_255_is_ignored(model_dir, tmp_path):
    generator = np.random.default_rng(0)
    label_maps = [generator.integers(0, 3, (32, 32)).astype(np.uint8) for _ in range(24)]
    label_maps[0][:4] = 255  # pixels to ignore: no class of their own
    label_maps[-1][0, 0] = 3  # a class only the evaluation window holds
    dataset = label_map_folder(tmp_path, label_maps)
    results = dense_probe.run_dense_probe(DenseProbeArguments(
        model_name_or_path=str(model_dir), dataset_name=dataset, train_split="train[:16]", eval_split="train[16:]",
        num_train_epochs=1, per_device_train_batch_size=8, output_dir=str(tmp_path / "out"), pictures=False))
    assert list(results[0]["per_class_iou"]) == ["0", "1", "2", "3"]


def test_overlapping_windows_mixed_sizes_and_weights_that_do_not_fit_are_refused(model_dir, tmp_path):
    def run(**fields):
        dense_probe.run_dense_probe(DenseProbeArguments(model_name_or_path=str(model_dir), num_train_scenes=8,
                                            num_eval_scenes=8, output_dir=str(tmp_path / "out"), **fields))

    with pytest.raises(ValueError, match=r"'train' and eval_split 'train\[50000:\]' share images"):
        run(train_split="train", eval_split="train[50000:]")
    with pytest.raises(ValueError, match="share images"):
        run(dataset_name="any", train_split="train[:60%]", eval_split="train[50%:]")
    label_maps = [np.zeros((32, 32), np.uint8)] * 3 + [np.zeros((40, 32), np.uint8)]
    with pytest.raises(ValueError, match=r"eval image of row 1 is 32x40, the first image 32x32"):
        run(dataset_name=label_map_folder(tmp_path, label_maps), train_split="train[:2]", eval_split="train[2:]")
    shallow = tmp_path / "shallow"  # one block per stage; its config claims two: from_pretrained only warns
    shallow_kwargs = {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}
    SiameseModel(SiameseConfig(**{**TINY_SMALL_IMAGE_ENCODER, "backbone_kwargs": shallow_kwargs})).save_pretrained(
        shallow)
    (shallow / "config.json").write_text(json.dumps({**json.loads((shallow / "config.json").read_text()),
                                                     "backbone_kwargs": TINY_SMALL_IMAGE_ENCODER["backbone_kwargs"]}))
    with pytest.raises(ValueError, match=r"does not fit its own config \(missing: backbone\.layer1\.1\."):
        dense_probe.run_dense_probe(DenseProbeArguments(model_name_or_path=str(shallow), num_train_scenes=8,
                                                        num_eval_scenes=8, output_dir=str(tmp_path / "out2")))
