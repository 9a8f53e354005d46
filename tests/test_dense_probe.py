"""run_dense_probe.py: the frozen linear segmentation probe and UperNet fine-tuning on Fashion-MNIST scenes, end to
end on a tiny encoder; the probe head, the level choice and the scores on their own."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

import run_dense_probe
from hf_siamese import SiameseConfig, SiameseForPreTraining
from hf_siamese.dense_probe import (
    DenseProbeArguments, LinearSegmentationHead, fit_linear_head, predict_linear, score, stage_names,
)

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
    with pytest.raises(ValueError, match="`probe_levels` must be"):
        stage_names("deep", stages)
    with pytest.raises(ValueError, match="`protocol` must be one of"):
        DenseProbeArguments(model_name_or_path="x", protocol="mask2former")


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


def test_scores_are_the_mean_iou_metrics_in_percent():
    labels = torch.tensor([[[0, 0, 1, 1], [0, 0, 2, 2]]])
    predictions = torch.tensor([[[0, 0, 1, 2], [0, 0, 2, 2]]])
    scores = score(predictions, labels, {0: "background", 1: "a", 2: "b"})
    # IoU: background 4/4, a 1/2, b 2/3; pixel accuracy 7/8.
    assert scores["per_class_iou"] == {"background": 100.0, "a": 50.0, "b": 66.67}
    assert scores["miou"] == pytest.approx(100 * (1 + 0.5 + 2 / 3) / 3, abs=0.01)
    assert scores["pixel_accuracy"] == 87.5
