"""Paths that differ by device and launcher, tested on CPU: continued pretraining, SyncBatchNorm conversion,
pinned batches, the DeepSpeed loss-scaler state and deterministic losses."""

import json
import os

import pytest
import torch
import torch.nn.functional as F
from accelerate.utils import set_seed
from conftest import tiny_config
from safetensors.torch import load_file
from test_training import common_args, parquet_files, run  # noqa: F401 (fixture)

from hf_siamese import SiameseForPreTraining
from hf_siamese.batchnorm import GhostBatchNorm1d, TargetSyncBatchNorm1d, ViewSyncBatchNorm, convert_sync_batchnorm
from hf_siamese.checkpointing import UnsafeCheckpointError, verify_checkpoint_files
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.losses import BatchInfoNCELoss, QueueInfoNCELoss

MOCO = ["--framework", "moco", "--queue_size", "64", "--max_steps", "3", "--deterministic", "true", "--seed", "5"]


def _losses(output_dir) -> list[float]:
    return [json.loads(line)["loss"] for line in (output_dir / "metrics.jsonl").read_text().splitlines()]


def test_continued_pretraining_trains_like_a_run_from_the_same_weights(parquet_files, tmp_path):
    config, _, _ = parse_pretraining_args(common_args(parquet_files, tmp_path / "unused", *MOCO))
    set_seed(5, deterministic=True)  # what a fresh run with seed 5 starts from
    SiameseForPreTraining(config).save_pretrained(tmp_path / "start")
    scratch = tmp_path / "scratch"
    run(common_args(parquet_files, scratch, *MOCO))
    # Only data and training flags: the model (ResNet-18, narrow heads, queue 64) comes from the checkpoint.
    continued = tmp_path / "continued"
    run(["--data_files", parquet_files, "--output_dir", str(continued), "--per_device_train_batch_size", "16",
         "--report_to", "none", "--logging_steps", "1", *MOCO, "--model_name_or_path", str(tmp_path / "start")])

    assert _losses(continued) == _losses(scratch)
    start, after = load_file(tmp_path / "start" / "model.safetensors"), load_file(continued / "model.safetensors")
    assert int(after["heads.4.queue_ptr"]) == 3 * 16 % 64 and int(start["heads.4.queue_ptr"]) == 0  # keys were enqueued
    running_mean = "siamese.backbone.bn1.running_mean"
    assert not torch.equal(after[running_mean], start[running_mean])  # BatchNorm ran in training mode
    expected = load_file(scratch / "model.safetensors")
    assert all(torch.equal(expected[key], after[key]) for key in expected)


def test_continued_pretraining_takes_the_model_fields_from_the_checkpoint(tmp_path):
    SiameseForPreTraining(tiny_config("moco", projector_dim=16, queue_size=128)).save_pretrained(tmp_path)
    config, _, _ = parse_pretraining_args(["--data_files", "x.parquet", "--model_name_or_path", str(tmp_path),
                                           "--queue_size", "64"])
    assert (config.framework, config.backbone, config.projector_dim, config.projector_hidden_dim) == (
        "moco", "resnet18", 16, 64)
    assert config.queue_size == 64  # the explicit override wins


def test_sync_bn_converts_plain_batch_norms_and_keeps_asym_bn():
    model = SiameseForPreTraining(tiny_config("moco", asym_bn=True, asym_bn_source_batch=4))
    group = object()  # stands for AsymBN's target process group
    kinds = {}
    for name, module in model.named_modules():
        if isinstance(module, TargetSyncBatchNorm1d):
            module.process_group = group
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            kinds[name] = type(module)
    tensors = {name: tensor.data_ptr() for name, tensor in model.state_dict().items()}
    convert_sync_batchnorm(model)

    converted = dict(model.named_modules())
    assert GhostBatchNorm1d in kinds.values() and TargetSyncBatchNorm1d in kinds.values()
    for name, kind in kinds.items():
        if kind in (GhostBatchNorm1d, TargetSyncBatchNorm1d):
            assert type(converted[name]) is kind, name
        else:  # still per view (batch_views)
            assert type(converted[name]) is ViewSyncBatchNorm, name
    assert all(converted[n].process_group is group for n, k in kinds.items() if k is TargetSyncBatchNorm1d)
    assert {name: tensor.data_ptr() for name, tensor in model.state_dict().items()} == tensors


def test_an_fp16_loss_scaler_state_is_accepted_on_resume(tmp_path):
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler

    scaler = DynamicLossScaler(2.0**16, scale_window=1000, min_scale=1, delayed_shift=2, consecutive_hysteresis=False)
    torch.save({"loss_scaler": scaler, "overflow": False}, tmp_path / "optim.pt")
    verify_checkpoint_files(tmp_path)  # the state DeepSpeed fp16 writes, refused before
    torch.save({"hook": print}, tmp_path / "other.pt")
    with pytest.raises(UnsafeCheckpointError, match="other.pt"):
        verify_checkpoint_files(tmp_path)


@pytest.mark.parametrize("loss", [QueueInfoNCELoss(0.2), BatchInfoNCELoss(0.2)], ids=["moco", "mocov3"])
def test_infonce_equals_cross_entropy_without_nll_loss(loss, monkeypatch):
    query, key = torch.randn(6, 8, requires_grad=True), F.normalize(torch.randn(6, 8), dim=1)
    queue = F.normalize(torch.randn(12, 8), dim=1)
    inputs = (query, key, queue) if isinstance(loss, QueueInfoNCELoss) else (query, key)
    normalized = F.normalize(query, dim=1)
    if isinstance(loss, QueueInfoNCELoss):
        logits = torch.cat([(normalized * key).sum(1, keepdim=True), normalized @ queue.T], 1) / 0.2
        expected = F.cross_entropy(logits, torch.zeros(6, dtype=torch.long))
    else:
        expected = F.cross_entropy(normalized @ key.T / 0.2, torch.arange(6)) * 0.4
    # CUDA's NLLLoss has no deterministic kernel: the losses must not call it.
    monkeypatch.setattr(F, "nll_loss", lambda *a, **k: pytest.fail("nll_loss called"))
    assert loss(*inputs).item() == pytest.approx(expected.item(), rel=1e-6)


def test_deterministic_runs_set_the_cublas_workspace_before_cuda_starts(monkeypatch, tmp_path):
    from hf_siamese.accelerator import make_accelerator
    from hf_siamese.training_args import PretrainingArguments

    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    make_accelerator(PretrainingArguments(report_to="none"), tmp_path)
    assert "CUBLAS_WORKSPACE_CONFIG" not in os.environ
    make_accelerator(PretrainingArguments(report_to="none", deterministic=True), tmp_path)
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"


@pytest.mark.parametrize("native,precision,warns", [(True, "bf16", False), (False, "bf16", True), (False, "no", False)])
def test_bf16_on_a_cpu_without_native_bf16_warns_that_fp32_is_faster(monkeypatch, tmp_path, caplog, native,
                                                                     precision, warns):
    from hf_siamese.accelerator import make_accelerator
    from hf_siamese.training_args import PretrainingArguments

    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False)
    with caplog.at_level("WARNING", logger="hf_siamese.accelerator"):
        make_accelerator(PretrainingArguments(report_to="none", mixed_precision=precision), tmp_path)
    warnings = [r.message for r in caplog.records if "no native bf16" in r.message]
    assert len(warnings) == warns
    if warns:
        assert "--mixed_precision no" in warnings[0]
