"""GPU smoke test: what a CPU cannot exercise, in about 8 minutes on one CUDA GPU.

One JSON line per check on stdout (``{"check", "ok", ...measured fields..., "seconds", "error"}``), after an
``environment`` line; library logs go to stderr. The exit code is 1 when any check failed. Without a CUDA device
it prints one ``{"check": "cuda", "skipped": true, ...}`` line and exits 0, unless ``--cpu-dry-run``.

Checks (``--list``):

- ``amp_bf16``, ``amp_fp16``: MoCo with AsymBN, a ladder ([2, 4] on ResNet-18) and the dense term, channels-last,
  under accelerate mixed precision, stepped as the training loop does (``bench.train_step.OursStep``). Asserts a
  finite loss at every step, every level's queue pointer advancing by the keys of a step, and the EMA: after the
  step, ``target = m * target_before + (1 - m) * source_after`` (displacement within 1e-3, relative).
- ``compile``: ``torch._dynamo.explain`` of the base and the full MoCo model (graph and graph-break counts and
  reasons), then steps of the full model compiled through accelerate's ``TorchDynamoPlugin`` (as
  ``--torch_compile``): asserts the model is compiled and every loss finite; reports dynamo's graph-break counters.
- ``sync_free_steps``: every framework with the base, ladder, dense and AsymBN designs, fp32 and bf16: after a
  warm-up step, one whole step (views from pinned memory to the device, forward, backward, optimizer, schedule,
  EMA) under ``torch.cuda.set_sync_debug_mode("error")`` must raise nothing (fp16 is left out: its GradScaler
  reads the inf check on the host by design).
- ``deepspeed_zero2_bf16``, ``deepspeed_zero2_fp16_resume``: ``accelerate launch`` with
  ``configs/accelerate/deepspeed_zero2.yaml`` on one process and generated parquet data. bf16: MoCo + AsymBN +
  ladder + dense, 4 steps. fp16: BYOL + ladder, 3 steps with a checkpoint at 2, then ``--resume_from_checkpoint
  latest`` to 4: metrics.jsonl must read steps 1-4 with the lines of steps 1-2 untouched (the resumed run started
  after them). Both: finite losses and weights; reports ``training_run.json``'s ``deepspeed`` entry when it has
  one and the dtypes of the saved source, target and queue tensors.
- ``deterministic``: ``run_pretraining.py --deterministic true`` twice per configuration (BYOL; MoCo + AsymBN +
  ladder + dense), two steps, same seed: the saved weights must be bit-identical. If cuBLAS refuses without
  ``CUBLAS_WORKSPACE_CONFIG`` the check fails and says so, and reruns with ``:4096:8`` to report the rest.
- ``ddp_gloo_two_processes``: two processes sharing cuda:0 over gloo (``bench/gpu_smoke_worker.py``), plain
  ``DistributedDataParallel`` (``find_unused_parameters=False``, ``broadcast_buffers=False`` so that equal queues
  are the library's doing, not DDP's copy) around MoCo with ShuffleBN, AsymBN and a ladder, a few steps; again
  with ``model.convert_sync_batchnorm()``. Asserts finite losses, no DDP error (an
  unused parameter fails the second step), every level's queue and pointer equal across ranks and at the
  expected position.
- ``device_views``: the views of MoCo + MultiCrop (2 x 224 + 6 x 96 px, batch 64) shipped as the workers ship
  them with ``--augment_on_device`` (uint8 and parameter rows), coloured by ``finish_views`` on the device: views/s
  and the colouring's share of a ResNet-50 bf16 channels-last step on the same batch.
- ``byol_r50_throughput``: BYOL ResNet-50 at 224 px, bf16, channels-last: ours (accelerate's autocast) against
  lightly's parts (``bench.train_step.ReferenceStep``, loss under ``torch.autocast``), interleaved repeats from the
  same weights; images/s of each and the median paired ratio (above 1: ours is faster). Ours only without lightly.

``--cpu-dry-run`` runs the checks a CPU can run in a reduced form (tiny heads, 32 px, batch 8, compile with the
``aot_eager`` backend) to develop this script; the others
print a "skipped on CPU" line.

    pip install -e ".[dev]"      # deepspeed, lightly
    python bench/gpu_smoke.py [--checks amp_bf16,compile,...] [--workdir DIR]
    python bench/gpu_smoke.py --list
    OMP_NUM_THREADS=1 python bench/gpu_smoke.py --cpu-dry-run
"""

import argparse
import contextlib
import gc
import importlib.metadata
import json
import math
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from bench.train_step import OursStep, ReferenceStep, interleaved_times, make_views, paired_ratio  # noqa: E402
from hf_siamese import SiameseConfig, SiameseForPreTraining  # noqa: E402
from hf_siamese.training import views_to_device  # noqa: E402

WORKER = ROOT / "bench" / "gpu_smoke_worker.py"
RUN_PRETRAINING = ROOT / "run_pretraining.py"
DEEPSPEED_ZERO2 = ROOT / "configs" / "accelerate" / "deepspeed_zero2.yaml"
FRAMEWORKS = ("moco", "mocov3", "byol", "simsiam")
LADDER = [2, 4]  # ResNet-18: stage 2 and the last stage
DESIGNS = {
    "base": {},
    "ladder": {"ladder_levels": LADDER},
    "dense": {"ladder_levels": LADDER, "ladder_dense_weight": 0.5},
    "asym_bn": {"asym_bn": True},
}
FULL_DESIGN = {"asym_bn": True, "ladder_levels": LADDER, "ladder_dense_weight": 0.5}
EMA_MOMENTUM = 0.9  # far from 1, so that the target's move is well above fp32 rounding
EMA_TOLERANCE = 1e-3  # relative error of the target's displacement
CUBLAS_HINT = "CUBLAS_WORKSPACE_CONFIG"


@dataclass(frozen=True)
class Scale:
    """Sizes of one setting: in-process model and batch, and the runs through ``run_pretraining.py``."""

    image_size: int
    batch: int
    head_width: int
    projector_dim: int
    queue_size: int  # a multiple of the keys per step, in-process and in the DDP worker
    steps: int
    compile_backend: str
    run_image_size: int
    run_batch: int
    run_images: int
    run_head_width: int
    timeout: int  # seconds, per launched process


SCALES = {
    "gpu": Scale(image_size=64, batch=64, head_width=1024, projector_dim=128, queue_size=256, steps=5,
                 compile_backend="inductor", run_image_size=64, run_batch=16, run_images=64, run_head_width=256,
                 timeout=600),
    # tests/conftest.py's tiny_config: narrow heads, 32 px, a short queue.
    "cpu": Scale(image_size=32, batch=8, head_width=64, projector_dim=32, queue_size=64, steps=2,
                 compile_backend="aot_eager", run_image_size=32, run_batch=8, run_images=32, run_head_width=64,
                 timeout=900),
}


@dataclass
class Context:
    device: torch.device
    scale: Scale
    workdir: Path
    env: dict[str, str] = field(default_factory=dict)  # extra environment of launched processes
    _data_files: str | None = None

    @property
    def dry_run(self) -> bool:
        return self.device.type == "cpu"

    def data_files(self) -> str:
        """Parquet files of generated images, written once."""
        if self._data_files is None:
            images = structured_images(self.scale.run_images, self.scale.run_image_size)
            self._data_files = write_parquet(self.workdir / "data", images)
        return self._data_files


# ----------------------------------------------------------------------------------------------------------------
# models, views and data


def smoke_config(framework: str, scale: Scale, batch: int | None = None, **fields) -> SiameseConfig:
    """ResNet-18 with heads of ``scale``'s width; AsymBN's source BN in ghost batches of half the batch."""
    base = {"projector_hidden_dim": scale.head_width, "projector_dim": scale.projector_dim}
    if framework == "moco":
        base["queue_size"] = scale.queue_size
    else:
        base["predictor_hidden_dim"] = scale.head_width
    if fields.get("asym_bn"):
        base["asym_bn_source_batch"] = max(1, (batch or scale.batch) // 2)
    return SiameseConfig(backbone="resnet18", framework=framework, image_size=scale.image_size, **{**base, **fields})


def random_geometry(batch: int, generator: torch.Generator) -> torch.Tensor:
    """Crop boxes as ``collate_views`` gives them: ``[top, left, height, width, flipped]``, fractions of the image."""
    size = 0.4 + 0.6 * torch.rand(batch, 2, generator=generator)
    corner = (1 - size) * torch.rand(batch, 2, generator=generator)
    flipped = (torch.rand(batch, 1, generator=generator) < 0.5).float()
    return torch.cat([corner, size, flipped], dim=1)


def views_with_geometry(config: SiameseConfig, batch: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """``make_views``' random views, plus crop geometries when the dense term needs them."""
    views = make_views(config, batch, seed)
    if config.ladder_dense_weight:
        generator = torch.Generator().manual_seed(seed + 1)
        source = views["source_pixel_values"]
        views["source_geometry"] = [random_geometry(batch, generator) for _ in source]
        if "target_pixel_values" in views:
            views["target_geometry"] = [random_geometry(batch, generator) for _ in views["target_pixel_values"]]
    return views


def pinned(views: dict[str, list[torch.Tensor]], device: torch.device) -> dict[str, list[torch.Tensor]]:
    """The views in page-locked memory, as a DataLoader with ``pin_memory`` gives them."""
    if device.type != "cuda":
        return views
    return {key: [view.pin_memory() for view in value] for key, value in views.items()}


def fresh_accelerator(device: torch.device, mixed_precision: str = "no", dynamo_backend: str | None = None):
    """A new Accelerator (accelerate keeps one state per process); ``dynamo_backend`` as ``--torch_compile``."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    dynamo = TorchDynamoPlugin(backend=dynamo_backend) if dynamo_backend else None
    return Accelerator(cpu=device.type == "cpu", mixed_precision=mixed_precision, dynamo_plugin=dynamo)


def queue_pointers(model: SiameseForPreTraining) -> dict[int, int]:
    """Each loss level's MoCo queue pointer, read on the host."""
    return {level: int(model.level_heads(level).queue_ptr) for level in model.levels}


def ema_pairs(model: SiameseForPreTraining) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(target parameter, source parameter) for every parameter the EMA updates."""
    return [pair for target, source in model._target_source_pairs()
            for pair in zip(target.parameters(), source.parameters(), strict=True)]


def ema_errors(before: list[torch.Tensor], pairs: list[tuple[torch.Tensor, torch.Tensor]], momentum: float) -> dict:
    """How far the target's move is from ``(1 - m) * (source_after - target_before)`` (float64 arithmetic)."""
    squared_error = squared_expected = max_abs = 0.0
    for old, (target, source) in zip(before, pairs, strict=True):
        old, target, source = old.double(), target.detach().double(), source.detach().double()
        expected = (1 - momentum) * (source - old)
        squared_error += float(((target - old) - expected).square().sum())
        squared_expected += float(expected.square().sum())
        max_abs = max(max_abs, float((target - (old + expected)).abs().max()))
    if squared_expected == 0:  # nothing to move towards (an fp16 step skipped by the GradScaler): no move
        relative = 0.0 if squared_error == 0 else math.inf
    else:
        relative = math.sqrt(squared_error / squared_expected)
    return {"relative": relative, "max_abs": max_abs, "expected_norm": math.sqrt(squared_expected)}


def release_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------------------
# generated data and launched processes


def structured_images(count: int, size: int, seed: int = 0) -> list:
    """Coloured blocks on gradients (the idea of tests/images.py), so that crops and colour changes show."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 1, size)
    images = []
    for _ in range(count):
        base = rng.uniform(0, 1, 3)[None, None, :] * (0.5 + 0.5 * ramp[None, :, None])
        pixels = np.broadcast_to(base, (size, size, 3)).copy()
        for _ in range(3):
            top, left = rng.integers(0, size - size // 4, 2)
            extent = rng.integers(size // 4, size // 2)
            pixels[top : top + extent, left : left + extent] = rng.uniform(0, 1, 3)
        images.append(Image.fromarray((pixels * 255).astype("uint8"), "RGB"))
    return images


def write_parquet(directory: Path, images: list, num_shards: int = 2) -> str:
    """Images (with a label column) as parquet shards; returns the glob ``--data_files`` takes."""
    import datasets

    features = datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")})
    dataset = datasets.Dataset.from_dict({"image": images, "label": list(range(len(images)))}, features=features)
    directory.mkdir(parents=True, exist_ok=True)
    for index in range(num_shards):
        dataset.shard(num_shards, index, contiguous=True).to_parquet(str(directory / f"train-{index}.parquet"))
    return str(directory / "*.parquet")


@dataclass
class Finished:
    command: list[str]
    returncode: int | None  # None: killed at the timeout
    stdout: str
    stderr: str
    seconds: float

    @property
    def ok(self) -> bool:
        return self.returncode == 0

    def tail(self, characters: int = 1500) -> str:
        """The first traceback (a launched worker's, before its launcher's), else the end of the output."""
        return first_traceback(self.stderr)[-characters:] or (self.stderr or self.stdout)[-characters:]


def first_traceback(text: str) -> str:
    """The first Python traceback in ``text`` with its exception line(s), without torchrun's ``[rankN]:`` prefixes."""
    header = "Traceback (most recent call last)"
    lines = [re.sub(r"^\[rank\d+\]:\s?", "", line) for line in re.split(r"[\r\n]+", text)]
    start = next((i for i, line in enumerate(lines) if header in line), None)
    if start is None:
        return ""
    lines[start] = lines[start][lines[start].index(header):]  # after a progress bar's last redraw
    end = start + 1
    while end < len(lines) and (not lines[end] or lines[end][0].isspace()):  # the frames are indented
        end += 1
    after = [line for line in lines[end : end + 3] if header not in line]  # the exception, a message's next lines
    return "\n".join(lines[start:end] + after)


def run_processes(commands: list[tuple[list[str], dict[str, str]]], cwd: Path, timeout: float) -> list[Finished]:
    """Run ``(command, environment)`` pairs at the same time; each in its own session, so that one still
    running at the timeout is killed with everything it started (the launchers' workers)."""
    running = []
    for index, (command, env) in enumerate(commands):
        out = open(cwd / f".proc-{os.getpid()}-{index}-{time.monotonic_ns()}.out", "w+")
        err = open(out.name[:-4] + ".err", "w+")
        process = subprocess.Popen(command, stdout=out, stderr=err, text=True, cwd=cwd, env=env,
                                   start_new_session=True)
        running.append((command, process, out, err, time.monotonic()))
    deadline = time.monotonic() + timeout
    finished = []
    for command, process, out, err, started in running:
        try:
            returncode = process.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            returncode = None
        seconds = time.monotonic() - started
        texts = []
        for stream in (out, err):
            stream.seek(0)
            texts.append(stream.read())
            stream.close()
            os.unlink(stream.name)
        finished.append(Finished(command, returncode, texts[0], texts[1], round(seconds, 1)))
    return finished


def launch_env(ctx: Context, **extra: str) -> dict[str, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **ctx.env, **extra}
    if ctx.dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "1"))
    return env


def run_model_args(ctx: Context, framework: str, design: dict) -> list[str]:
    """``run_pretraining.py`` model arguments: ResNet-18 with narrow heads, ``framework`` and ``design``."""
    scale = ctx.scale
    args = ["--backbone", "resnet18", "--image_size", str(scale.run_image_size), "--framework", framework,
            "--projector_hidden_dim", str(scale.run_head_width), "--projector_dim", str(scale.projector_dim)]
    if framework == "moco":
        args += ["--queue_size", str(scale.run_batch * 16)]
    else:
        args += ["--predictor_hidden_dim", str(scale.run_head_width)]
    for name, value in design.items():
        args += [f"--{name}", json.dumps(value)]  # JSON is YAML: true, [2, 4], 0.5
    return args


def pretraining_args(ctx: Context, output_dir: Path, framework: str, design: dict, *extra: str) -> list[str]:
    return [str(RUN_PRETRAINING), "--data_files", ctx.data_files(), "--output_dir", str(output_dir),
            "--per_device_train_batch_size", str(ctx.scale.run_batch), "--report_to", "none", "--logging_steps", "1",
            *run_model_args(ctx, framework, design), *extra]


def logged_records(output_dir: Path) -> list[dict]:
    path = output_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def finished_run(output_dir: Path) -> dict:
    """What a finished run left: logged steps and losses, training_run.json, the saved tensors' dtypes."""
    from safetensors.torch import load_file

    from hf_siamese.model_card import TRAINING_RUN

    records = [r for r in logged_records(output_dir) if "loss" in r]
    summary = {"steps": [r["step"] for r in records], "losses": [r["loss"] for r in records]}
    summary["losses_finite"] = bool(records) and all(math.isfinite(r["loss"]) for r in records)
    run_path = output_dir / TRAINING_RUN
    if run_path.exists():
        run = json.loads(run_path.read_text())
        summary["training_run_steps"] = run.get("steps")
        summary["training_run_mixed_precision"] = run.get("mixed_precision")
        summary["deepspeed"] = run.get("deepspeed", "absent from training_run.json")
    else:
        summary["deepspeed"] = f"no {TRAINING_RUN}"
    weights_path = output_dir / "model.safetensors"
    summary["weights_finite"] = False
    if weights_path.exists():
        weights = load_file(weights_path)
        floating = [t for t in weights.values() if t.is_floating_point()]
        summary["weights_finite"] = all(torch.isfinite(t).all().item() for t in floating)
        summary["saved_dtypes"] = {
            prefix: sorted({str(t.dtype).removeprefix("torch.") for name, t in weights.items()
                            if name.startswith(prefix) and t.is_floating_point()})
            for prefix in ("siamese.", "heads.4.projector.", "target_encoder.", "heads.4.target_projector.",
                           "heads.4.queue")
        }
    return summary


def failure(result: Finished) -> dict:
    return {"returncode": result.returncode, "seconds": result.seconds, "stderr_tail": result.tail()}


# ----------------------------------------------------------------------------------------------------------------
# checks


def check_amp(ctx: Context, precision: str) -> dict:
    """MoCo + AsymBN + ladder + dense, channels-last, under ``precision``: loss, queue pointers and EMA per step."""
    scale, device = ctx.scale, ctx.device
    config = smoke_config("moco", scale, momentum=EMA_MOMENTUM, momentum_final=EMA_MOMENTUM, **FULL_DESIGN)
    accelerator = fresh_accelerator(device, precision)
    torch.manual_seed(0)
    step = OursStep(config, accelerator, channels_last=True, total_steps=scale.steps)
    model = step.unwrapped
    pairs = ema_pairs(model)
    keys_per_step = scale.batch * config.num_target_groups  # one process
    losses, pointers, pointer_errors, ema = [], [], [], []
    skipped = 0
    for index in range(scale.steps):
        views = views_with_geometry(config, scale.batch, seed=index)
        before_pointers = queue_pointers(model)
        before_targets = [target.detach().clone() for target, _ in pairs]
        loss = step(views)
        skipped += int(accelerator.optimizer_step_was_skipped)
        momentum = model.momentum_at(step.steps / step.total_steps)  # what ema_step used
        losses.append(float(loss))
        after_pointers = queue_pointers(model)
        pointers.append(after_pointers)
        for level, before in before_pointers.items():
            expected = (before + keys_per_step) % config.queue_size
            if after_pointers[level] != expected:
                pointer_errors.append(f"step {index + 1} level {level}: {before} -> {after_pointers[level]}, "
                                      f"expected {expected}")
        ema.append({"momentum": momentum, **ema_errors(before_targets, pairs, momentum)})
    record = {
        "precision": precision, "backbone": config.backbone, "image_size": config.image_size, "batch": scale.batch,
        "channels_last": True, "design": FULL_DESIGN, "losses": losses,
        "losses_finite": all(math.isfinite(v) for v in losses),
        "keys_per_step": keys_per_step, "queue_size": config.queue_size, "queue_pointers": pointers,
        "pointer_errors": pointer_errors, "ema_momentum": EMA_MOMENTUM,
        "ema_relative_error": [e["relative"] for e in ema], "ema_max_abs_error": max(e["max_abs"] for e in ema),
        "ema_expected_move_norm": [e["expected_norm"] for e in ema], "optimizer_steps_skipped": skipped,
    }
    if accelerator.scaler is not None:
        record["loss_scale"] = float(accelerator.scaler.get_scale())
    moved = any(e["expected_norm"] > 0 for e in ema)
    record["ok"] = (record["losses_finite"] and not pointer_errors and moved
                    and all(e["relative"] <= EMA_TOLERANCE for e in ema))
    if not moved:
        record["error"] = "the source never changed (every optimizer step skipped?): the EMA was not exercised"
    return record


def check_amp_bf16(ctx: Context) -> dict:
    return check_amp(ctx, "bf16")


def check_amp_fp16(ctx: Context) -> dict:
    return check_amp(ctx, "fp16")


def explain(config: SiameseConfig, ctx: Context, precision: str) -> dict:
    """Dynamo's view of one training forward: graphs, graph breaks and why."""
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    model = SiameseForPreTraining(config).to(ctx.device).to(memory_format=torch.channels_last).train()
    views = views_to_device(views_with_geometry(config, ctx.scale.batch), ctx.device, channels_last=True)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    with torch.autocast(ctx.device.type, dtype=dtype, enabled=precision != "no"):
        explanation = torch._dynamo.explain(model)(**views)
    reasons = []
    for reason in explanation.break_reasons[:8]:
        frame = reason.user_stack[-1] if reason.user_stack else None
        place = f" at {short_path(frame.filename)}:{frame.lineno}" if frame else ""
        reasons.append(" ".join(str(reason.reason).split())[:300] + place)
    return {"graphs": explanation.graph_count, "graph_breaks": explanation.graph_break_count,
            "break_reasons": reasons}


def check_compile(ctx: Context) -> dict:
    import torch._dynamo
    from torch._dynamo.eval_frame import OptimizedModule
    from torch._dynamo.utils import counters, guard_failures

    scale, device = ctx.scale, ctx.device
    precision = "no" if ctx.dry_run else "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    full = smoke_config("moco", scale, **FULL_DESIGN)
    record: dict = {"precision": precision, "backend": scale.compile_backend, "explain": {}}
    for name, config in {"base": smoke_config("moco", scale), "full": full}.items():
        try:
            record["explain"][name] = explain(config, ctx, precision)
        except Exception as error:  # reported; the compiled steps still run
            record["explain"][name] = {"error": describe(error), "where": where(error)}
    release_memory()

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    step = OursStep(full, fresh_accelerator(device, precision, dynamo_backend=scale.compile_backend),
                    channels_last=True, total_steps=scale.steps)
    record["compiled"] = isinstance(step.model, OptimizedModule)
    losses, seconds = [], []
    for index in range(scale.steps):
        started = time.perf_counter()
        losses.append(float(step(views_with_geometry(full, scale.batch, seed=index))))  # float() waits for it
        seconds.append(round(time.perf_counter() - started, 3))
    breaks = counters["graph_break"]
    record.update({
        "losses": losses, "losses_finite": all(math.isfinite(v) for v in losses),
        "step_seconds": seconds, "graph_breaks": sum(breaks.values()), "distinct_graph_breaks": len(breaks),
        "top_graph_breaks": [[" ".join(reason.split())[:300], count] for reason, count in breaks.most_common(5)],
        "unique_graphs": counters["stats"].get("unique_graphs", 0),
        "recompile_reasons": [" ".join(str(reason).split())[:300]
                              for reasons in guard_failures.values() for reason in reasons][:5],
    })
    record["ok"] = record["compiled"] and record["losses_finite"]
    torch._dynamo.reset()
    return record


@contextlib.contextmanager
def sync_debug_errors(device: torch.device):
    """``torch.cuda.set_sync_debug_mode("error")`` inside, the default (0) after, whatever happens."""
    if device.type != "cuda":
        yield
        return
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        yield
    finally:
        torch.cuda.set_sync_debug_mode(0)


def sync_free_case(ctx: Context, framework: str, design: str, precision: str) -> dict:
    config = smoke_config(framework, ctx.scale, **DESIGNS[design])
    torch.manual_seed(0)
    step = OursStep(config, fresh_accelerator(ctx.device, precision), total_steps=10)
    views = pinned(views_with_geometry(config, ctx.scale.batch), ctx.device)
    step(views)  # warm-up: the optimizer's state, the queue snapshot, cuDNN's plans
    try:
        with sync_debug_errors(ctx.device):
            loss = step(views)
    except RuntimeError as error:
        return {"ok": False, "error": describe(error), "where": where(error)}
    value = float(loss)
    return {"ok": math.isfinite(value), "loss": value}


def check_sync_free_steps(ctx: Context) -> dict:
    precisions = ["no", "bf16"] if ctx.device.type == "cpu" or torch.cuda.is_bf16_supported() else ["no"]
    cases = {}
    for framework in FRAMEWORKS:
        for design in DESIGNS:
            if design == "asym_bn" and framework == "simsiam":  # no target projector to make asymmetric
                continue
            for precision in precisions:
                name = f"{framework}/{design}/{'fp32' if precision == 'no' else precision}"
                try:
                    cases[name] = sync_free_case(ctx, framework, design, precision)
                except Exception as error:  # outside the measured step: the case could not be set up
                    cases[name] = {"ok": False, "error": f"setup: {describe(error)}", "where": where(error)}
                release_memory()
    failed = {name: case for name, case in cases.items() if not case["ok"]}
    return {"ok": not failed, "cases": len(cases), "batch": ctx.scale.batch, "image_size": ctx.scale.image_size,
            "failed": failed, "passed": [name for name in cases if name not in failed]}


def deepspeed_launch(ctx: Context, precision: str, output_dir: Path, framework: str, design: dict,
                     *extra: str) -> Finished:
    """``accelerate launch`` with the ZeRO-2 config on one process (on CUDA, DS_ACCELERATOR is left unset)."""
    command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(DEEPSPEED_ZERO2),
               "--num_processes", "1", "--mixed_precision", precision, "--main_process_port", "0",
               *pretraining_args(ctx, output_dir, framework, design, *extra)]
    return run_processes([(command, launch_env(ctx))], ctx.workdir, ctx.scale.timeout)[0]


def check_deepspeed_bf16(ctx: Context, precision: str = "bf16") -> dict:
    output_dir = ctx.workdir / f"deepspeed_{precision}"
    result = deepspeed_launch(ctx, precision, output_dir, "moco", FULL_DESIGN, "--max_steps", "4")
    record = {"precision": precision, "framework": "moco", "design": FULL_DESIGN, "seconds_run": result.seconds,
              "saved_model": "Saved the pretrained model" in result.stdout}
    if not result.ok:
        return {**record, "ok": False, **failure(result)}
    record.update(finished_run(output_dir))
    record["ok"] = record["steps"] == [1, 2, 3, 4] and record["losses_finite"] and record["weights_finite"]
    return record


def check_deepspeed_fp16_resume(ctx: Context, precision: str = "fp16") -> dict:
    output_dir = ctx.workdir / f"deepspeed_{precision}_resume"
    design = {"ladder_levels": LADDER}
    first = deepspeed_launch(ctx, precision, output_dir, "byol", design, "--max_steps", "4",
                             "--checkpointing_steps", "2")
    record: dict = {"precision": precision, "framework": "byol", "design": design, "first_seconds": first.seconds}
    if not first.ok:
        return {**record, "ok": False, "stage": "first run", **failure(first)}
    first_lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    record["first_steps"] = [json.loads(line)["step"] for line in first_lines]
    record["checkpoint_2"] = (output_dir / "checkpoint-2").is_dir()
    for name in ("training_run.json", "model.safetensors"):  # as a run killed after checkpoint-2 leaves its folder
        (output_dir / name).unlink(missing_ok=True)
    resumed = deepspeed_launch(ctx, precision, output_dir, "byol", design, "--max_steps", "4",
                               "--resume_from_checkpoint", "latest")
    record["resumed_seconds"] = resumed.seconds
    if not resumed.ok:
        return {**record, "ok": False, "stage": "resumed run", **failure(resumed)}
    record["resumed_from_step_2"] = "Resumed from" in resumed.stderr + resumed.stdout
    lines = (output_dir / "metrics.jsonl").read_text().splitlines()
    # The resumed run keeps what was logged up to its checkpoint and logs from step 3 on: had it started over,
    # it would have rewritten steps 1 and 2 (with other throughputs).
    record["steps_1_2_kept"] = lines[:2] == first_lines[:2]
    record.update(finished_run(output_dir))
    record["ok"] = (record["first_steps"] == [1, 2, 3, 4] and record["checkpoint_2"] and record["steps"] == [1, 2, 3, 4]
                    and record["steps_1_2_kept"] and record["losses_finite"] and record["weights_finite"])
    return record


DETERMINISTIC_CASES = {"byol": ("byol", {}), "moco_asym_bn_ladder_dense": ("moco", FULL_DESIGN)}


def deterministic_pair(ctx: Context, name: str, framework: str, design: dict, env: dict) -> list[Finished]:
    """Two runs of two steps with ``--deterministic true`` and the same seed, at the same time."""
    commands = []
    for run in ("a", "b"):
        output_dir = ctx.workdir / "deterministic" / name / run
        shutil.rmtree(output_dir, ignore_errors=True)
        args = pretraining_args(ctx, output_dir, framework, design, "--max_steps", "2", "--deterministic", "true",
                                "--seed", "7")
        commands.append(([sys.executable, *args], env))
    return run_processes(commands, ctx.workdir, ctx.scale.timeout)


def compare_weights(first: Path, second: Path) -> dict:
    from safetensors.torch import load_file

    a, b = load_file(first / "model.safetensors"), load_file(second / "model.safetensors")
    differing = sorted(name for name in a.keys() & b.keys() if not torch.equal(a[name], b[name]))
    return {"tensors": len(a), "same_names": a.keys() == b.keys(), "differing": len(differing),
            "first_differing": differing[:5], "identical": a.keys() == b.keys() and not differing}


def check_deterministic(ctx: Context) -> dict:
    cases, cublas_needed = {}, False
    for name, (framework, design) in DETERMINISTIC_CASES.items():
        runs = deterministic_pair(ctx, name, framework, design, launch_env(ctx))
        case: dict = {"seconds": [run.seconds for run in runs]}
        if not all(run.ok for run in runs) and any(CUBLAS_HINT in run.stderr for run in runs):
            cublas_needed = True
            case["without_cublas_workspace_config"] = failure(next(run for run in runs if not run.ok))
            runs = deterministic_pair(ctx, name, framework, design, launch_env(ctx, CUBLAS_WORKSPACE_CONFIG=":4096:8"))
        if not all(run.ok for run in runs):
            case.update(ok=False, **failure(next(run for run in runs if not run.ok)))
        else:
            case.update(compare_weights(*(ctx.workdir / "deterministic" / name / run for run in ("a", "b"))))
            case["ok"] = case["identical"]
        cases[name] = case
    record = {"cases": cases, "steps": 2, "cublas_workspace_config_preset": os.environ.get(CUBLAS_HINT),
              "ok": all(case["ok"] for case in cases.values()) and not cublas_needed}
    if cublas_needed:
        record["error"] = ("--deterministic alone fails on CUDA: cuBLAS needs CUBLAS_WORKSPACE_CONFIG=:4096:8 (or "
                           ":16:8) set before CUDA starts; the cases were rerun with it")
    return record


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check_ddp_gloo(ctx: Context) -> dict:
    out = ctx.workdir / "ddp"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    port, world = free_port(), 2
    scale = "cpu" if ctx.dry_run else "gpu"
    commands = []
    for rank in range(world):
        env = launch_env(ctx, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                         WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
        commands.append(([sys.executable, str(WORKER), "--out", str(out), "--scale", scale,
                          "--device", ctx.device.type], env))
    runs = run_processes(commands, ctx.workdir, ctx.scale.timeout)
    reports = []
    for rank in range(world):
        path = out / f"rank{rank}.json"
        reports.append(json.loads(path.read_text()) if path.exists() else None)
    record: dict = {"processes": world, "device": "cuda:0 (shared)" if ctx.device.type == "cuda" else "cpu",
                    "returncodes": [run.returncode for run in runs], "seconds_run": max(run.seconds for run in runs)}
    if any(report is None for report in reports):
        broken = next(run for run, report in zip(runs, reports) if report is None)
        return {**record, "ok": False, **failure(broken)}
    cases = {}
    for name in reports[0]["cases"]:
        per_rank = [report["cases"].get(name, {"ok": False, "error": "missing"}) for report in reports]
        cases[name] = {**per_rank[0], "ok": all(case["ok"] for case in per_rank)}
        errors = [f"rank {rank}: {case['error']}" for rank, case in enumerate(per_rank) if case.get("error")]
        if errors:
            cases[name]["error"] = "; ".join(errors)
        if any("losses" in case for case in per_rank):
            cases[name]["losses"] = [case.get("losses") for case in per_rank]  # per rank
    record["cases"] = cases
    record["ok"] = all(run.ok for run in runs) and all(case["ok"] for case in cases.values())
    if not all(run.ok for run in runs):
        record["stderr_tail"] = next(run for run in runs if not run.ok).tail()
    return record


class AutocastLoss:
    """A reference step whose loss (forward) runs under ``torch.autocast``, its backward and optimizer outside,
    as accelerate does for ours."""

    def __init__(self, step: ReferenceStep, device: torch.device, dtype: torch.dtype):
        self.step, self.device, self.dtype = step, device, dtype
        forward_loss = step.loss

        def loss(views: dict) -> torch.Tensor:
            with torch.autocast(device.type, dtype=dtype):
                return forward_loss(views)

        step.loss = loss

    def __call__(self, views: dict) -> torch.Tensor:
        return self.step(views)


def compare_throughput(device: torch.device, config: SiameseConfig, batch: int, warmup: int, repeats: int) -> dict:
    """Images/s of ours and lightly's step (bf16, channels-last) from the same weights, interleaved repeats."""
    from bench.train_step import lightly_parts

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    torch.manual_seed(0)
    ours = OursStep(config, fresh_accelerator(device, "bf16"), channels_last=True)
    steps: dict[str, Callable] = {"ours": ours}
    record: dict = {"framework": config.framework, "backbone": config.backbone, "image_size": config.image_size,
                    "batch": batch, "precision": "bf16", "channels_last": True}
    try:
        parts = lightly_parts()
    except ImportError as error:
        record["lightly"] = f"not importable ({error}): ours only"
    else:
        reference = ReferenceStep(config, parts, device)
        reference.copy_from(ours.unwrapped)
        reference.to(memory_format=torch.channels_last)
        steps["lightly"] = AutocastLoss(reference, device, torch.bfloat16)
        record["lightly"] = importlib.metadata.version("lightly")
    views = views_to_device(make_views(config, batch), device, channels_last=True)
    first = {name: float(step(views)) for name, step in steps.items()}  # the same weights: close losses
    times = interleaved_times(steps, views, device, warmup, repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    record.update({
        "first_loss": first, "images_per_s": {name: round(batch / seconds, 1) for name, seconds in median.items()},
        "median_step_s": {name: round(seconds, 4) for name, seconds in median.items()},
        "ratio_ours_lightly": paired_ratio(times, "lightly") if "lightly" in steps else None,
        "warmup": warmup, "repeats": repeats,
    })
    if device.type == "cuda":
        record["peak_memory_mb"] = round(torch.cuda.max_memory_allocated() / 2**20)
    record["ok"] = all(math.isfinite(v) for v in first.values())
    return record


def check_byol_r50_throughput(ctx: Context) -> dict:
    config = SiameseConfig(backbone="resnet50", image_size=224, framework="byol")
    memory_gb = torch.cuda.get_device_properties(ctx.device).total_memory / 2**30
    batch = 64 if memory_gb >= 30 else 32  # two views through both branches of each implementation
    return compare_throughput(ctx.device, config, batch, warmup=3, repeats=10)


def shipped_views(config: SiameseConfig, count: int, image_size: int) -> dict[str, list[torch.Tensor]]:
    """A batch as the workers ship it with ``--augment_on_device``: uint8 views and drawn parameter rows."""
    from hf_siamese.views import MultiViewTransform, collate_views

    transform = MultiViewTransform.from_config(config, augment_on_device=True)
    torch.manual_seed(0)
    return collate_views([transform(image) for image in structured_images(count, image_size)])


def timed_seconds(run: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> float:
    """Median seconds of ``run()`` after ``warmup`` calls, the device synchronised around each call."""
    seconds = []
    for index in range(warmup + repeats):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        run()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        if index >= warmup:
            seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def check_device_views(ctx: Context) -> dict:
    """MoCo + MultiCrop views coloured where the model runs (``--augment_on_device``): views/s of
    ``finish_views``, and its share of a bf16 channels-last training step on the same batch."""
    from hf_siamese.device_augment import finish_views

    if ctx.dry_run:
        config = smoke_config("moco", ctx.scale, multicrop=True, multicrop_num_local=6, multicrop_local_size=16)
        batch, image_size, precision = ctx.scale.batch, 48, "no"
    else:  # the papers' MultiCrop: 2 x 224 + 6 x 96 px on a ResNet-50
        config = SiameseConfig(backbone="resnet50", image_size=224, framework="moco", multicrop=True)
        batch, image_size, precision = 64, 320, "bf16"
    shipped = views_to_device(pinned(shipped_views(config, batch, image_size), ctx.device), ctx.device)
    views = finish_views(shipped, config)
    num_views = sum(len(value) for key, value in views.items() if key.endswith("pixel_values")) * batch
    colour_s = timed_seconds(lambda: finish_views(shipped, config), ctx.device, warmup=2, repeats=5)
    step = OursStep(config, fresh_accelerator(ctx.device, precision), channels_last=True)
    step_s = timed_seconds(lambda: step(views), ctx.device, warmup=2, repeats=5)
    finite = all(bool(torch.isfinite(view).all()) for value in views.values() for view in value)
    return {"backbone": config.backbone, "batch": batch, "views_per_image": num_views // batch,
            "precision": precision, "colour_seconds": round(colour_s, 4), "views_per_s": round(num_views / colour_s, 1),
            "step_seconds": round(step_s, 4), "colour_share_of_step": round(colour_s / (colour_s + step_s), 3),
            "ok": finite}


@dataclass(frozen=True)
class Check:
    run: Callable[[Context], dict]
    what: str
    cuda_only: str | None = None  # why it cannot run on the CPU (skipped by --cpu-dry-run)
    needs_bf16: bool = False


CHECKS = {
    "amp_bf16": Check(check_amp_bf16, "MoCo+AsymBN+ladder+dense, channels-last, accelerate bf16: finite loss, "
                                      "queue pointers, EMA", needs_bf16=True),
    "amp_fp16": Check(check_amp_fp16, "the same under accelerate fp16 (GradScaler)",
                      cuda_only="fp16 autocast with a GradScaler is a CUDA path"),
    "compile": Check(check_compile, "torch._dynamo.explain graph breaks, then compiled steps with finite losses"),
    "sync_free_steps": Check(check_sync_free_steps, "a whole step under torch.cuda.set_sync_debug_mode('error'), "
                                                    "every framework x base/ladder/dense/AsymBN x fp32/bf16",
                             cuda_only="set_sync_debug_mode watches CUDA synchronisations"),
    "deepspeed_zero2_bf16": Check(check_deepspeed_bf16, "accelerate launch, DeepSpeed ZeRO-2 bf16, MoCo+AsymBN+"
                                                        "ladder+dense, 4 steps", cuda_only="DeepSpeed 16-bit on GPU",
                                  needs_bf16=True),
    "deepspeed_zero2_fp16_resume": Check(check_deepspeed_fp16_resume, "DeepSpeed ZeRO-2 fp16 BYOL+ladder, checkpoint "
                                                                      "at 2, resume 'latest' to 4",
                                         cuda_only="DeepSpeed 16-bit on GPU"),
    "deterministic": Check(check_deterministic, "run_pretraining.py --deterministic twice, 2 steps: bit-identical "
                                                "weights"),
    "ddp_gloo_two_processes": Check(check_ddp_gloo, "2 DDP processes on one device over gloo, MoCo ShuffleBN+AsymBN+"
                                                    "ladder: no DDP error, equal queues across ranks"),
    "device_views": Check(check_device_views, "MoCo+MultiCrop views coloured on the device (--augment_on_device): "
                                              "views/s and their share of a ResNet-50 bf16 step"),
    "byol_r50_throughput": Check(check_byol_r50_throughput, "BYOL ResNet-50 224 px bf16: images/s ours vs lightly",
                                 cuda_only="a GPU throughput", needs_bf16=True),
}


# ----------------------------------------------------------------------------------------------------------------
# running and reporting


def short_path(filename: str) -> str:
    for root in (str(ROOT) + os.sep, "site-packages" + os.sep):
        if root in filename:
            return filename.split(root, 1)[1]
    return filename


def describe(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())[:800]}"


def where(error: BaseException) -> list[str]:
    """The innermost frame of this repository and the innermost frame, where ``error`` was raised."""
    frames = traceback.extract_tb(error.__traceback__)
    if not frames:
        return []
    ours = [frame for frame in frames if str(ROOT) in frame.filename and "site-packages" not in frame.filename]
    chosen = [ours[-1]] if ours else []
    if frames[-1] not in chosen:
        chosen.append(frames[-1])
    return [f"{short_path(frame.filename)}:{frame.lineno} in {frame.name}" for frame in chosen]


def jsonable(value):
    """JSON without NaN or infinity (which strict parsers refuse): those become strings."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, (str, int, bool)) or value is None:
        return value
    if isinstance(value, float):
        return value
    return str(value)


def run_check(name: str, check: Check, ctx: Context) -> dict:
    if ctx.dry_run and check.cuda_only:
        return {"check": name, "skipped": True, "reason": f"skipped on CPU: {check.cuda_only}"}
    if ctx.device.type == "cuda" and check.needs_bf16 and not torch.cuda.is_bf16_supported():
        return {"check": name, "skipped": True, "reason": f"{torch.cuda.get_device_name()} has no bf16"}
    started = time.perf_counter()
    try:
        record = {"check": name, **check.run(ctx)}
        record.setdefault("ok", False)
    except Exception as error:
        record = {"check": name, "ok": False, "error": describe(error), "where": where(error)}
    finally:
        from accelerate.state import AcceleratorState

        AcceleratorState._reset_state(reset_partial_state=True)
        release_memory()
    record["seconds"] = round(time.perf_counter() - started, 1)
    return record


def environment(device: torch.device) -> dict:
    def version(package: str) -> str | None:
        try:
            return importlib.metadata.version(package)
        except importlib.metadata.PackageNotFoundError:
            return None

    info = {"check": "environment", "ok": True, "device": str(device), "dry_run": device.type == "cpu",
            "torch": torch.__version__, "cuda": torch.version.cuda, "deepspeed": version("deepspeed"),
            "lightly": version("lightly"), "accelerate": version("accelerate"), "timm": version("timm"),
            "python": sys.version.split()[0], "cpu_threads": os.cpu_count()}
    if device.type == "cuda":
        info.update(gpu=torch.cuda.get_device_name(device), bf16=torch.cuda.is_bf16_supported(),
                    gpu_memory_gb=round(torch.cuda.get_device_properties(device).total_memory / 2**30, 1))
    return info


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checks", default="all", help=f"Comma-separated subset of: {', '.join(CHECKS)}.")
    parser.add_argument("--list", action="store_true", help="List the checks and exit.")
    parser.add_argument("--cpu-dry-run", action="store_true",
                        help="Run what a CPU can, reduced (tiny model, 32 px, batch 8); skip the rest.")
    parser.add_argument("--workdir", help="Keep generated data and runs here (default: a temporary directory).")
    args = parser.parse_args()
    if args.list:
        for name, check in CHECKS.items():
            print(f"{name}: {check.what}" + (f" [CUDA only: {check.cuda_only}]" if check.cuda_only else ""))
        return 0
    names = list(CHECKS) if args.checks == "all" else [name.strip() for name in args.checks.split(",") if name.strip()]
    unknown = [name for name in names if name not in CHECKS]
    if unknown:
        parser.error(f"unknown checks {unknown}; choose from {', '.join(CHECKS)}")
    if not args.cpu_dry_run and not torch.cuda.is_available():
        print(json.dumps({"check": "cuda", "skipped": True,
                          "reason": "no CUDA device: torch.cuda.is_available() is False"}), flush=True)
        return 0
    if args.cpu_dry_run:
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    device = torch.device("cpu") if args.cpu_dry_run else torch.device("cuda", 0)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    results = sys.stdout
    failed = []
    with contextlib.ExitStack() as stack:
        workdir = Path(args.workdir) if args.workdir else Path(stack.enter_context(
            tempfile.TemporaryDirectory(prefix="gpu_smoke-")))
        workdir.mkdir(parents=True, exist_ok=True)
        ctx = Context(device, SCALES["cpu" if args.cpu_dry_run else "gpu"], workdir.resolve())
        stack.enter_context(contextlib.redirect_stdout(sys.stderr))  # library prints stay out of the JSON lines
        print(json.dumps(jsonable(environment(device))), file=results, flush=True)
        for name in names:
            record = run_check(name, CHECKS[name], ctx)
            if record.get("ok") is False:
                failed.append(name)
            print(json.dumps(jsonable(record)), file=results, flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
