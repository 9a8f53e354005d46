"""End-to-end pretraining: the CLI, checkpoints, exact resume, online kNN, accelerate launch (bad input: test_fault_matrix)."""

import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from huggingface_hub import ModelCard
from conftest import killed_before_the_end
from images import structured_images
from safetensors.torch import load_file
from transformers import AutoModel

from hf_siamese import SiameseModel
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.data import PretrainingData, load_labelled
from hf_siamese.probing import extract_features, knn_classify
from hf_siamese.checkpointing import completed_checkpoints
from hf_siamese.training import train

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = [
    "--backbone", "resnet18", "--image_size", "32", "--projector_hidden_dim", "64", "--projector_dim", "32",
    "--predictor_hidden_dim", "64",
]


def write_parquet(directory: Path, images, num_shards: int = 2) -> str:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(num_shards):
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(directory / f"train-{index}.parquet"))
    return str(directory / "*.parquet")


@pytest.fixture(scope="module")
def parquet_files(tmp_path_factory) -> str:
    return write_parquet(tmp_path_factory.mktemp("parquet"), structured_images(64))


def run(argv):
    config, data_args, train_args = parse_pretraining_args(argv)
    return train(config, data_args, train_args)


def common_args(data_files, output_dir, *extra):
    return [
        "--data_files", data_files, "--output_dir", str(output_dir), "--per_device_train_batch_size", "16",
        "--report_to", "none", "--logging_steps", "1", *TINY_MODEL, *extra,
    ]


def test_twenty_steps_end_to_end_and_load_with_automodel(parquet_files, tmp_path):
    result = run(common_args(parquet_files, tmp_path, "--framework", "byol", "--max_steps", "20", "--streaming", "true",
                             "--per_device_train_batch_size", "8"))
    assert result.global_step == 20 and np.isfinite(result.loss)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, 21))
    assert records[-1]["momentum"] == pytest.approx(1.0) and records[0]["momentum"] < 0.997
    assert records[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # cosine to zero
    encoder = AutoModel.from_pretrained(tmp_path)
    assert isinstance(encoder, SiameseModel)
    assert encoder(torch.randn(2, 3, 32, 32)).pooler_output.shape == (2, 512)
    assert (tmp_path / "preprocessor_config.json").exists()
    run_info = json.loads((tmp_path / "training_run.json").read_text())
    assert (run_info["steps"], run_info["global_batch"], run_info["optimizer"]) == (20, 8, "sgd")
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.pipeline_tag == "image-feature-extraction" and "byol" in card.data.tags
    assert "| steps | 20 |" in card.text and "![Pretraining loss](loss_curve.svg)" in card.text
    assert (tmp_path / "loss_curve.svg").read_text().startswith("<svg")


def test_recipe_plus_overrides_and_unknown_fields(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text("framework: mocov3\nbackbone: resnet18\nlearning_rate: 0.5\nmulticrop: true\n")
    config, data_args, args = parse_pretraining_args(
        ["--config", str(recipe), "--learning_rate", "0.1", "--multicrop_local_scale", "[0.1, 0.2]",
         "--dataset_name", "fashion_mnist"]
    )
    assert (config.framework, config.backbone, config.multicrop) == ("mocov3", "resnet18", True)
    assert list(config.multicrop_local_scale) == [0.1, 0.2]
    assert args.learning_rate == 0.1 and data_args.dataset_name == "fashion_mnist"
    recipe.write_text("framework: byol\nlerning_rate: 0.5\n")
    with pytest.raises(ValueError, match=r"lerning_rate.*recipe.yaml"):
        parse_pretraining_args(["--config", str(recipe)])
    with pytest.raises(SystemExit):
        parse_pretraining_args(["--not_a_field", "1"])


def test_help_lists_every_field():
    result = subprocess.run([sys.executable, str(ROOT / "run_pretraining.py"), "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    for name in ("--per_device_train_batch_size", "--resume_from_checkpoint", "--framework", "--multicrop",
                 "--asym_bn_group_size", "--data_files", "--streaming", "--checkpoints_total_limit"):
        assert name in result.stdout, name


# ScaleMix and AsymAug: views drawn from torch, Python and numpy (RandAugment) must all replay.
ASYMMETRIC_VIEWS = ["--scalemix", "true", "--asym_aug", "true"]
SMALL_GRAY_TRACK = ["--augmentation", "small_gray", "--small_image_stem", "true", "--num_channels", "1",
                    "--image_size", "28"]
# The colour steps on the device: their parameters drawn in the workers must replay too.
DEVICE_SPLIT = ["--augment_on_device", "true", "--asym_aug", "true", "--mean_encoding", "true", "--scalemix", "true",
                "--scalemix_probability", "0.5"]


@pytest.mark.parametrize("streaming,views", [("true", ASYMMETRIC_VIEWS), ("false", ASYMMETRIC_VIEWS),
                                             ("false", SMALL_GRAY_TRACK), ("false", DEVICE_SPLIT)],
                         ids=["streamed", "local", "small_gray", "augment_on_device"])
def test_resume_gives_the_same_weights_as_an_uninterrupted_run(parquet_files, tmp_path, streaming, views):
    # 64 images, batch 16: 4 batches an epoch, so 6 steps cross an epoch and the checkpoint at 3 is mid-epoch.
    args = ["--framework", "moco", "--queue_size", "64", "--max_steps", "6", "--checkpointing_steps", "3",
            "--deterministic", "true", "--streaming", streaming, *views]
    straight = tmp_path / "straight"
    run(common_args(parquet_files, straight, *args))
    resumed = tmp_path / "resumed"
    resumed.mkdir()
    shutil.copytree(straight / "checkpoint-3", resumed / "checkpoint-3")
    run(common_args(parquet_files, resumed, *args, "--resume_from_checkpoint", "latest"))
    # The resumed run's clock continues from the checkpoint's training seconds.
    saved = json.loads((straight / "checkpoint-3" / "trainer_state.json").read_text())["train_seconds"]
    later = [json.loads(line) for line in (resumed / "metrics.jsonl").read_text().splitlines()]  # steps 4-6
    assert saved > 0 and [r["step"] for r in later] == [4, 5, 6] and all(r["seconds"] > saved for r in later)
    expected, actual = load_file(straight / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert expected.keys() == actual.keys()
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


@pytest.mark.parametrize("views", [["--framework", "byol"], ["--framework", "moco", "--queue_size", "64",
                                                                "--multicrop", "true", "--multicrop_local_size", "16"]],
                         ids=["byol", "moco_multicrop"])
def test_the_device_split_trains_the_same_loss_curve(parquet_files, tmp_path, views):
    """The device colours the host's views bit for bit (up to a rare blur rounding), so one seed gives one curve."""
    args = ["--max_steps", "4", "--deterministic", "true", *views]
    for name, on_device in (("host", "false"), ("split", "true")):
        run(common_args(parquet_files, tmp_path / name, *args, "--augment_on_device", on_device))
    curves = [[json.loads(line)["loss"] for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
              for name in ("host", "split")]
    assert len(curves[0]) == 4 and curves[0] == pytest.approx(curves[1], rel=1e-4)


def test_replaying_the_batches_before_a_checkpoint_is_off_the_clock(parquet_files, tmp_path, monkeypatch):
    args = ["--framework", "simsiam", "--max_steps", "3", "--checkpointing_steps", "2"]
    run(common_args(parquet_files, tmp_path, *args))
    killed_before_the_end(tmp_path)
    saved = json.loads((tmp_path / "checkpoint-2" / "trainer_state.json").read_text())["train_seconds"]
    replay = PretrainingData.batches

    def slow_replay(self, start_epoch=0, start_batch=0):
        time.sleep(20.0 if start_batch else 0.0)  # as decoding and augmenting the skipped batches (idle)
        yield from replay(self, start_epoch, start_batch)

    monkeypatch.setattr(PretrainingData, "batches", slow_replay)
    result = run(common_args(parquet_files, tmp_path, *args, "--resume_from_checkpoint", "latest"))
    assert saved < result.train_seconds < saved + 20.0  # one step, not the replay


def test_resuming_from_an_earlier_checkpoint_sets_the_later_ones_aside(parquet_files, tmp_path):
    args = ["--framework", "simsiam", "--max_steps", "3", "--checkpointing_steps", "1"]
    run(common_args(parquet_files, tmp_path, *args))
    killed_before_the_end(tmp_path)
    run(common_args(parquet_files, tmp_path, *args, "--resume_from_checkpoint", str(tmp_path / "checkpoint-1")))
    # checkpoint-2 is the resumed run's own; the first run's checkpoint-2 was set aside, not pruned or resumed.
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["checkpoint-1", "checkpoint-2"]
    assert (tmp_path / "abandoned-checkpoint-2").is_dir()
    steps = [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3]


@pytest.mark.parametrize("damage", ["other_process_count", "old_format"])
def test_a_checkpoint_this_run_cannot_continue_is_a_clear_error(parquet_files, tmp_path, damage):
    run(common_args(parquet_files, tmp_path, "--framework", "simsiam", "--max_steps", "2", "--checkpointing_steps", "1"))
    killed_before_the_end(tmp_path)
    checkpoint = tmp_path / "checkpoint-1"
    if damage == "other_process_count":
        shutil.copy(checkpoint / "data_state_0.json", checkpoint / "data_state_1.json")
        expected = "saved by 2 process"
    else:
        (checkpoint / "trainer_state.json").write_text(json.dumps({"global_step": 1}))
        expected = "older hf_siamese"
    with pytest.raises(ValueError, match=expected):
        run(common_args(parquet_files, tmp_path, "--framework", "simsiam", "--max_steps", "2",
                        "--resume_from_checkpoint", str(checkpoint)))


def test_online_knn_is_logged_and_does_not_change_training(parquet_files, tmp_path):
    # Held out: 12 of the 64 training images, labelled as there; those in the sampled bank are found again.
    held_out = write_parquet(tmp_path / "held_out", structured_images(64)[:12], num_shards=1)
    args = ["--framework", "byol", "--max_steps", "4", "--deterministic", "true", "--streaming", "true"]
    plain = tmp_path / "plain"
    run(common_args(parquet_files, plain, *args))
    evaluated = tmp_path / "evaluated"
    run(common_args(parquet_files, evaluated, *args, "--eval_steps", "3", "--eval_data_files", held_out,
                    "--knn_bank_size", "32", "--knn_k", "5"))
    records = [json.loads(line) for line in (evaluated / "metrics.jsonl").read_text().splitlines()]
    knn = {r["step"]: r["knn_top1"] for r in records if "knn_top1" in r}
    assert list(knn) == [3, 4]  # every eval_steps, and at the end

    # The last value is the saved encoder's kNN on the same bank (a seeded sample) and held-out images.
    data_args = parse_pretraining_args(common_args(parquet_files, evaluated, *args, "--knn_bank_size", "32",
                                                   "--eval_data_files", held_out))[1]
    bank = load_labelled(data_args, 32, seed=42)
    assert len(bank) == 32 and bank["label"] != list(range(32))  # a random sample, not the first 32
    encoder = AutoModel.from_pretrained(evaluated)
    bank_features = extract_features(encoder, bank, progress=False)
    queries = extract_features(encoder, load_labelled(data_args.held_out()), progress=False)
    predictions = knn_classify(bank_features, queries.features, k=5, temperature=0.07)
    assert knn[4] == (predictions == queries.labels).float().mean().item()

    expected, actual = load_file(plain / "model.safetensors"), load_file(evaluated / "model.safetensors")
    for key in expected:
        assert torch.equal(expected[key], actual[key]), key


def test_training_seconds_leave_out_paused_evaluation(tmp_path):
    from accelerate import Accelerator

    from hf_siamese.monitoring import MetricsLogger

    metrics = MetricsLogger(Accelerator(cpu=True), tmp_path / "metrics.jsonl", 10, 0, resuming=False,
                            seconds_before=100.0)
    with metrics.paused():
        time.sleep(0.3)  # an evaluation, logged at its end
        metrics.log({"step": 1, "knn_top1": 0.5})
    metrics.log({"step": 1, "loss": 1.0, "lr": 0.1})
    first, second = (json.loads(line)["seconds"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines())
    assert 100.0 <= first <= second < 100.2  # the checkpoint's seconds, and not the 0.3 s paused


def test_online_knn_without_held_out_data_is_refused(parquet_files, tmp_path):
    with pytest.raises(ValueError, match="set `eval_split`"):
        run(common_args(parquet_files, tmp_path, "--max_steps", "1", "--eval_steps", "1"))


def test_checkpoints_keep_the_last_n_and_ignore_unfinished_saves(parquet_files, tmp_path):
    (tmp_path / ".tmp-checkpoint-99").mkdir(parents=True)  # an interrupted save from an earlier run
    (tmp_path / "checkpoint-98").mkdir()  # no trainer_state.json: incomplete
    run(common_args(parquet_files, tmp_path, "--framework", "simsiam", "--max_steps", "5", "--checkpointing_steps", "1",
                    "--checkpoints_total_limit", "2"))
    assert [p.name for p in completed_checkpoints(tmp_path)] == ["checkpoint-3", "checkpoint-4"]
    assert json.loads((tmp_path / "checkpoint-4" / "trainer_state.json").read_text())["global_step"] == 4


def test_accelerate_launch_subprocess(parquet_files, tmp_path):
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "configs/accelerate/cpu.yaml"),
        str(ROOT / "run_pretraining.py"),
        *common_args(parquet_files, tmp_path, "--framework", "mocov3", "--max_steps", "3", "--streaming", "true"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Saved the pretrained model" in result.stdout
    assert isinstance(AutoModel.from_pretrained(tmp_path), SiameseModel)


def test_variance_is_logged_on_its_own_cadence(parquet_files, tmp_path):
    run(common_args(parquet_files, tmp_path, "--framework", "byol", "--max_steps", "4", "--logging_steps", "3",
                    "--variance_steps", "2", "--variance_probe_size", "8"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    variance = [r for r in records if "variance/ratio" in r]
    assert [r["step"] for r in variance] == [2, 4]
    assert all(0 < r["variance/source"] and 0 < r["variance/target"] for r in variance)
    assert [r["step"] for r in records if "loss" in r] == [3, 4]


def test_ladder_with_dense_term_trains_and_logs_level_losses(parquet_files, tmp_path):
    run(common_args(parquet_files, tmp_path, "--framework", "byol", "--ladder_levels", "[2, 3, 4]",
                    "--ladder_dense_weight", "0.5", "--max_steps", "2"))
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for record in records:
        assert {"level_loss/2", "level_loss/3", "level_loss/4", "dense_loss"} <= set(record)
        assert all(np.isfinite(record[key]) for key in ("level_loss/2", "dense_loss"))


def test_variance_probe_reads_the_configured_image_column(tmp_path):
    features = datasets.Features({"photo": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"photo": structured_images(16), "label": list(range(16))}, features=features)
    dataset.to_parquet(str(tmp_path / "train.parquet"))
    run(common_args(str(tmp_path / "train.parquet"), tmp_path / "out", "--framework", "byol", "--max_steps", "1",
                    "--image_column", "photo", "--variance_steps", "1", "--variance_probe_size", "4"))
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert any("variance/ratio" in record for record in records)


def test_torch_compile_trains_and_saves_the_plain_model(parquet_files, tmp_path):
    result = run(common_args(parquet_files, tmp_path, "--framework", "byol", "--max_steps", "2", "--torch_compile",
                             "true", "--channels_last", "true", "--per_device_train_batch_size", "8"))
    assert result.global_step == 2 and np.isfinite(result.loss)
    weights = load_file(tmp_path / "model.safetensors")
    assert not any(key.startswith("_orig_mod") for key in weights)  # the module, not the compiled wrapper
    assert not torch.equal(weights["target_encoder.backbone.conv1.weight"], weights["siamese.backbone.conv1.weight"])


def test_median_images_per_second_skips_the_first_interval_which_includes_start_up(tmp_path):
    from hf_siamese.monitoring import median_images_per_second

    lines = [{"step": 10, "loss": 1.0, "images_per_s": 5.0}, {"step": 10, "knn_top1": 0.5},
             {"step": 20, "loss": 0.9, "images_per_s": 100.0}, {"step": 30, "loss": 0.8, "images_per_s": 120.0},
             {"step": 40, "loss": 0.7, "images_per_s": 300.0}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert median_images_per_second(tmp_path) == 120.0
    (tmp_path / "metrics.jsonl").write_text(json.dumps(lines[0]) + "\n")
    assert median_images_per_second(tmp_path) is None
