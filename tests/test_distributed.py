"""Two CPU processes through `accelerate launch`: distinct ranks, disjoint shards, gathered keys, training runs."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import killed_before_the_end
from test_training import TINY_MODEL, write_parquet
from images import structured_images
from safetensors.torch import load_file
from transformers import AutoModel

ROOT = Path(__file__).resolve().parents[1]
LAUNCH = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
          str(ROOT / "configs/accelerate/cpu_2proc.yaml"), "--main_process_port", "0"]


def launch(args, cwd, timeout=600):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([*LAUNCH, *args], capture_output=True, text=True, timeout=timeout, cwd=cwd, env=env)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    return result


@pytest.fixture(scope="module")
def reports(tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    launch([str(ROOT / "tests/distributed_worker.py"), str(out)], cwd=out)
    return [json.loads((out / f"rank{rank}.json").read_text()) for rank in range(2)]


def test_two_distinct_ranks_on_gloo(reports):
    assert [r["rank"] for r in reports] == [0, 1]
    assert all(r["world"] == 2 and r["type"] == "DistributedType.MULTI_CPU" for r in reports)


def test_each_rank_reads_a_disjoint_half(reports):
    first, second = set(reports[0]["labels"]), set(reports[1]["labels"])
    assert not first & second
    assert first | second == set(range(32)) and len(first) == len(second) == 16


def test_queue_holds_every_process_keys_in_rank_order(reports):
    expected = torch.tensor(reports[0]["own_keys"] + reports[1]["own_keys"])
    for report in reports:
        assert torch.allclose(torch.tensor(report["queue_head"]), expected, atol=1e-6)
        assert report["queue_ptr"] == 8


def test_asym_bn_trains_under_ddp_on_cpu(reports):
    assert all(len(r["asym_bn_ddp_losses"]) == 2 and all(map(math.isfinite, r["asym_bn_ddp_losses"])) for r in reports)


def test_ddp_does_not_broadcast_the_queues(reports):
    for report in reports:
        synced = report["ddp_synced_buffers"]
        assert "siamese.backbone.bn1.running_mean" in synced  # BatchNorm statistics still follow rank 0
        assert not [name for name in synced if ".queue" in name]


def test_batched_views_equal_a_forward_per_view_with_shuffling_bn(reports):
    for report in reports:
        assert max(report["batched_views_differences"].values()) < 1e-5, report["batched_views_differences"]


def test_a_channels_last_tensor_gathers_to_its_values(reports):
    assert all(report["channels_last_gather_equal"] for report in reports)


def test_shuffling_bn_returns_each_key_to_its_own_query(reports):
    assert all(r["shuffle_max_diff"] < 1e-5 for r in reports)


def test_mocov3_contrasts_with_the_global_batch(reports):
    keys = [torch.tensor(reports[0]["mocov3_targets"][g] + reports[1]["mocov3_targets"][g]) for g in range(2)]
    for rank, report in enumerate(reports):
        predictions = [torch.tensor(p) for p in report["mocov3_predictions"]]
        expected = 0.0
        for direction in range(2):
            query = F.normalize(predictions[direction], dim=1)
            logits = query @ keys[1 - direction].T / 1.0
            labels = torch.arange(4) + rank * 4
            expected += F.cross_entropy(logits, labels).item() * 2.0
        assert report["mocov3_loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("framework", ["moco", "mocov3"])
def test_two_process_pretraining(tmp_path, framework):
    files = write_parquet(tmp_path / "data", structured_images(64))
    extra = ["--queue_size", "64"] if framework == "moco" else []
    result = launch([str(ROOT / "run_pretraining.py"), "--data_files", files, "--output_dir", str(tmp_path / "out"),
                     "--framework", framework, *TINY_MODEL, *extra, "--per_device_train_batch_size", "8",
                     "--max_steps", "4", "--report_to", "none", "--logging_steps", "1", "--streaming", "true"],
                    cwd=tmp_path)
    assert result.stdout.count("Saved the pretrained model") == 2  # both ranks finish
    records = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4]  # written once, by the main process
    assert AutoModel.from_pretrained(tmp_path / "out") is not None


def _deepspeed_launch(config_name, args, cwd):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs/accelerate" / config_name), "--main_process_port", "0", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


def _deepspeed_pretrain(config_name, tmp_path, framework, num_images, *extra):
    """``run_pretraining.py`` under a DeepSpeed launch config on 2 CPU processes, tiny model, batch 8."""
    files = write_parquet(tmp_path / "data", structured_images(num_images))
    return _deepspeed_launch(config_name, [
        str(ROOT / "run_pretraining.py"), "--data_files", files, "--output_dir", str(tmp_path / "out"),
        "--framework", framework, *TINY_MODEL, "--per_device_train_batch_size", "8", "--report_to", "none", *extra,
    ], cwd=tmp_path)


def test_deepspeed_zero2_bf16_on_cpu(tmp_path):
    def pretrain(*extra):
        # The run's accumulation and clipping, not the launcher's or DeepSpeed's defaults (1 and 1.0).
        result = _deepspeed_pretrain("deepspeed_zero2.yaml", tmp_path, "moco", 64, "--queue_size", "96",
                                     "--gradient_accumulation_steps", "2", "--max_grad_norm", "0.5",
                                     "--mixed_precision", "bf16", "--logging_steps", "1", *extra)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]

    assert pretrain("--max_steps", "4", "--checkpointing_steps", "2") == [1, 2, 3, 4]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    engine = json.loads((tmp_path / "out" / "training_run.json").read_text())["deepspeed"]
    assert (engine["gradient_accumulation_steps"], engine["gradient_clipping"], engine["bf16"]) == (2, 0.5, True)
    assert engine["train_batch_size"] == 32
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert {t.dtype for t in weights.values() if t.is_floating_point()} == {torch.float32}
    assert int(weights["heads.4.queue_ptr"]) == 4 * 2 * 16 % 96  # 4 steps of 2 micro-batches of 2 x 8 keys
    assert AutoModel.from_pretrained(tmp_path / "out") is not None
    # As a run killed after checkpoint-2: resuming passes the weights_only check of every DeepSpeed file, then
    # continues from step 2; the resumed run's steps 3 and 4 replace the first run's in metrics.jsonl.
    killed_before_the_end(tmp_path / "out")
    assert pretrain("--max_steps", "4", "--resume_from_checkpoint", "latest") == [1, 2, 3, 4]


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_deepspeed_bf16_keeps_the_target_in_fp32_and_its_ema_moves(tmp_path, framework):
    result = _deepspeed_launch("deepspeed_zero2.yaml", [str(ROOT / "tests/deepspeed_worker.py"), str(tmp_path),
                                                         framework], cwd=tmp_path)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    for rank in range(2):
        report = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert report["loss_finite"] and report["source_dtype"] == "torch.bfloat16"
        assert report["target_dtypes"] == ["torch.float32"]
        # target = m * target + (1 - m) * source, to fp32 rounding: the increment is not lost.
        assert report["ema_moved"] > 0 and report["ema_error"] < 1e-3 * report["ema_moved"]
        if framework == "moco":
            assert (report["queue_ptr"], report["queue_dtype"]) == (16, "torch.float32")


def test_deepspeed_zero2_refuses_lars(tmp_path):
    result = _deepspeed_pretrain("deepspeed_zero2.yaml", tmp_path, "byol", 16, "--max_steps", "1", "--optimizer", "lars")
    assert result.returncode != 0
    assert "trust ratio would be computed per slice" in result.stderr


def test_deepspeed_zero3_refuses_an_ema_target(tmp_path):
    result = _deepspeed_pretrain("deepspeed_zero3.yaml", tmp_path, "byol", 16, "--max_steps", "1")
    assert result.returncode != 0
    assert "ZeRO-3 partitions the target encoder" in result.stderr


def test_deepspeed_zero3_saves_whole_weights(tmp_path):
    result = _deepspeed_pretrain("deepspeed_zero3.yaml", tmp_path, "simsiam", 32, "--max_steps", "1")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
    weights = load_file(tmp_path / "out" / "model.safetensors")
    assert not [name for name, tensor in weights.items() if tensor.numel() == 0]  # no partition placeholders
    assert AutoModel.from_pretrained(tmp_path / "out") is not None


def test_a_failing_rank_stops_both_processes_with_the_error(tmp_path):
    # Rank 1 reads a shard of only undecodable images, so it fails on its first batch while rank 0 waits for it
    # in the gradient all-reduce. Both must exit, non-zero, long before the 30-minute collective timeout.
    data = tmp_path / "data"
    good = write_parquet(data / "good", structured_images(16), num_shards=1)
    broken = [{"bytes": b"not an image", "path": None}] * 16
    write_parquet(data / "broken", broken, num_shards=1)
    Path(good).parent.joinpath("train-0.parquet").rename(data / "train-0.parquet")
    (data / "broken" / "train-0.parquet").rename(data / "train-1.parquet")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    started = time.monotonic()
    launcher = subprocess.Popen(
        [*LAUNCH, str(ROOT / "run_pretraining.py"), "--data_files", str(data / "*.parquet"), "--streaming", "true",
         "--output_dir", str(tmp_path / "out"), "--framework", "byol", *TINY_MODEL, "--per_device_train_batch_size",
         "8", "--max_steps", "4", "--report_to", "none"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path, env=env, start_new_session=True)
    try:
        stdout, stderr = launcher.communicate(timeout=300)
    finally:
        os.killpg(launcher.pid, signal.SIGKILL) if launcher.poll() is None else None
    elapsed = time.monotonic() - started
    assert launcher.returncode != 0
    assert "gave no full batch of 8 images" in stderr  # the failing rank's error is shown
    assert elapsed < 240
    with pytest.raises(ProcessLookupError):  # no rank is left running
        os.killpg(launcher.pid, 0)
    assert not (tmp_path / "out" / "model.safetensors").exists()
