"""Two CPU processes through `accelerate launch`: distinct ranks, disjoint shards, gathered keys, training runs."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from test_training import TINY_MODEL, write_parquet
from images import structured_images
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


def test_deepspeed_zero2_on_cpu(tmp_path):
    files = write_parquet(tmp_path / "data", structured_images(64))

    def pretrain(*extra):
        result = _deepspeed_launch("deepspeed_zero2.yaml", [
            str(ROOT / "run_pretraining.py"), "--data_files", files, "--output_dir", str(tmp_path / "out"),
            "--framework", "byol", *TINY_MODEL, "--per_device_train_batch_size", "8", "--report_to", "none",
            "--logging_steps", "1", *extra], cwd=tmp_path)
        assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-4000:]
        return [json.loads(line)["step"] for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]

    assert pretrain("--max_steps", "3", "--checkpointing_steps", "2") == [1, 2, 3]
    assert (tmp_path / "out" / "checkpoint-2").is_dir()
    assert AutoModel.from_pretrained(tmp_path / "out") is not None
    # Resuming passes the weights_only check of every DeepSpeed file, then continues from step 2; the resumed
    # run's step 3 replaces the first run's in metrics.jsonl.
    assert pretrain("--max_steps", "4", "--resume_from_checkpoint", "latest") == [1, 2, 3, 4]


def test_deepspeed_zero3_refuses_an_ema_target(tmp_path):
    files = write_parquet(tmp_path / "data", structured_images(16))
    result = _deepspeed_launch("deepspeed_zero3.yaml", [
        str(ROOT / "run_pretraining.py"), "--data_files", files, "--output_dir", str(tmp_path / "out"),
        "--framework", "byol", *TINY_MODEL, "--per_device_train_batch_size", "8", "--max_steps", "1",
        "--report_to", "none"], cwd=tmp_path)
    assert result.returncode != 0
    assert "ZeRO-3 partitions the target encoder" in result.stderr


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
