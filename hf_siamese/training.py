"""The pretraining loop on Accelerate: one CPU, one GPU, many GPUs or DeepSpeed ZeRO-1/2.

Per optimizer step: views -> ``SiameseForPreTraining`` -> loss -> backward -> optimizer and lr schedule -> EMA
update of the target on the unwrapped model. Checkpoints are written to a temporary directory and renamed, so an
interrupted save never replaces a good one; ``resume_from_checkpoint`` continues the same run (same data order,
same augmentations, same schedules).
"""

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import statistics
import time
from dataclasses import asdict, dataclass, field
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin, DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, TorchDynamoPlugin, set_seed,
)
from tqdm.auto import tqdm

from .batchnorm import convert_sync_batchnorm
from .checkpointing import (
    ResumePoint, checkpoint_step, completed_checkpoints, load_checkpoint, remove_unfinished, save_checkpoint,
    set_aside_checkpoints,
)
from .configuration_siamese import SiameseConfig
from .data import DataArguments, PretrainingData, load_labelled, load_raw_dataset, probe_images
from .hub import push_folder, save_image_processor
from .levels import check_queue_fits
from .model_card import TRAINING_RUN, write_model_card
from .modeling_siamese import SiameseForPreTraining
from .optim import build_optimizer, build_scheduler, scaled_learning_rate
from .probing import OnlineKNN
from .timm_export import check_timm_exportable, export_timm
from .variance import VarianceMonitor
from .views import MultiViewTransform

logger = logging.getLogger(__name__)

@dataclass
class PretrainingArguments:
    """How to train; names follow transformers' ``TrainingArguments`` where it has one."""

    output_dir: str = field(default="outputs/pretraining", metadata={"help": "Checkpoints, logs and the final model."})
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Start from this hf_siamese checkpoint instead of random weights."}
    )
    per_device_train_batch_size: int = field(default=32, metadata={"help": "Batch size per process."})
    gradient_accumulation_steps: int = field(default=1, metadata={"help": "Batches per optimizer step."})
    optimizer: str = field(default="sgd", metadata={"help": "sgd | lars | adamw."})
    learning_rate: float = field(default=0.03, metadata={"help": "Learning rate (per 256 images if scaled)."})
    scale_learning_rate: bool = field(
        default=True, metadata={"help": "Multiply learning_rate by global batch / 256 (linear scaling rule)."}
    )
    sgd_momentum: float = field(default=0.9, metadata={"help": "SGD/LARS momentum."})
    weight_decay: float = field(default=1e-4, metadata={"help": "Weight decay (LARS/AdamW: not on biases/norms)."})
    lr_scheduler_type: str = field(default="cosine", metadata={"help": "cosine | constant, after linear warm-up."})
    warmup_steps: int = field(default=0, metadata={"help": "Linear warm-up steps (added to warmup_epochs)."})
    warmup_epochs: float = field(default=0.0, metadata={"help": "Linear warm-up in epochs."})
    num_train_epochs: float = field(default=1.0, metadata={"help": "Epochs, when max_steps is not set."})
    max_steps: int = field(default=-1, metadata={"help": "Optimizer steps; overrides num_train_epochs when > 0."})
    max_grad_norm: float | None = field(default=None, metadata={"help": "Gradient clipping norm."})
    seed: int = field(default=42, metadata={"help": "Seed of weights, data order and augmentations."})
    deterministic: bool = field(
        default=False, metadata={"help": "Deterministic kernels: same seed and data give identical weights."}
    )
    mixed_precision: str | None = field(
        default=None, metadata={"help": "no | fp16 | bf16 (default: the launcher's, `accelerate launch "
                                        "--mixed_precision` or its config file, else no)."}
    )
    channels_last: bool = field(
        default=False,
        metadata={"help": "Channels-last memory format for the model and the views: faster convolutions with oneDNN "
                          "(CPU) and cuDNN (tensor-core GPUs), as timm's --channels-last."},
    )
    torch_compile: bool = field(
        default=False,
        metadata={"help": "Compile the model with torch.compile (inductor) through accelerate's TorchDynamoPlugin; "
                          "the first steps also compile."},
    )
    torch_compile_mode: str | None = field(
        default=None, metadata={"help": "torch.compile mode: default | reduce-overhead | max-autotune."}
    )
    ddp_timeout: int = field(
        default=1800, metadata={"help": "Seconds a process waits in a collective before failing (as in transformers)."}
    )
    sync_bn: bool = field(default=False, metadata={"help": "SyncBatchNorm across GPUs (CUDA only)."})
    report_to: str = field(default="auto", metadata={"help": "Trackers: auto (tensorboard if installed), none, or names."})
    logging_steps: int = field(default=10, metadata={"help": "Log every N optimizer steps."})
    checkpointing_steps: int | None = field(default=None, metadata={"help": "Save a checkpoint every N steps."})
    checkpoints_total_limit: int | None = field(default=None, metadata={"help": "Keep only the last N checkpoints."})
    resume_from_checkpoint: str | None = field(default=None, metadata={"help": "'latest' or a checkpoint path."})
    variance_steps: int = field(default=0, metadata={"help": "Log source/target variance every N steps (0: off)."})
    variance_probe_size: int = field(default=64, metadata={"help": "Probe images for the variance monitor."})
    push_to_hub: bool = field(default=False, metadata={"help": "Push the final model directory to the Hub."})
    hub_model_id: str | None = field(
        default=None, metadata={"help": "Hub repository, 'user/name' (default: the output directory's name)."}
    )
    hub_private: bool = field(default=False, metadata={"help": "Create the Hub repository as private."})
    hub_token: str | None = field(default=None, metadata={"help": "Hub token (default: the logged-in one)."})
    push_checkpoints: bool = field(
        default=False, metadata={"help": "Also push each checkpoint to the repository's last-checkpoint/ folder."}
    )
    export_timm: str | None = field(
        default=None, metadata={"help": "Also write the encoder in timm's format to this directory."}
    )
    eval_steps: int = field(
        default=0, metadata={"help": "Online kNN top-1 on the held-out split every N steps (0: off; see eval_split)."}
    )
    knn_k: int = field(default=20, metadata={"help": "Online kNN neighbours."})
    knn_temperature: float = field(default=0.07, metadata={"help": "Online kNN vote temperature."})


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    loss: float
    skipped_images: int
    train_seconds: float


def train(config: SiameseConfig, data_args: DataArguments, args: PretrainingArguments) -> TrainResult:
    """Pretrain a :class:`SiameseForPreTraining` and save it (with its image processor) in ``args.output_dir``."""
    if args.export_timm:
        check_timm_exportable(config)  # before training, not after it
    accelerator = _make_accelerator(args, Path(args.output_dir))
    set_seed(args.seed, deterministic=args.deterministic)
    run = _setup_run(config, data_args, args, accelerator)
    resume = _start(run)
    log = _LogMetrics(run)
    actions = [_CheckDivergence(run), log, *_observers(run), _SaveCheckpoint(run)]  # read run.metrics when due
    run.metrics = _MetricsLogger(accelerator, run.output_dir / "metrics.jsonl", run.schedule.total_steps, resume.step,
                                 resuming=bool(args.resume_from_checkpoint), seconds_before=resume.seconds)
    step = _loop(run, resume, actions)
    return _finish(run, step, log.loss)


@dataclass
class _Schedule:
    """How long the run is and how fast it learns, fixed at the start."""

    total_steps: int
    steps_per_epoch: int | None
    warmup_steps: int
    learning_rate: float
    global_batch: int


@dataclass
class _Run:
    """What the loop, its after-step actions and the finish share."""

    args: PretrainingArguments
    data_args: DataArguments
    config: SiameseConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared: DDP, a DeepSpeed engine or the model itself
    unwrapped: SiameseForPreTraining
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    raw: object  # the dataset as loaded, before views (the variance monitor's probe images come from it)
    data: PretrainingData
    transform: MultiViewTransform
    schedule: _Schedule
    guard: "DivergenceGuard"
    metrics: "_MetricsLogger | None" = None

    @property
    def output_dir(self) -> Path:
        return Path(self.args.output_dir)


@dataclass
class _StepDone:
    """The optimizer step just taken, as the after-step actions see it."""

    step: int
    epoch: int
    batch_index: int
    output: object  # SiamesePreTrainingOutput
    momentum: float | None


def _setup_run(config: SiameseConfig, data_args: DataArguments, args: PretrainingArguments,
               accelerator: Accelerator) -> _Run:
    """The model, the data, the schedule and the optimizer, prepared by Accelerate."""
    model = _build_model(config, args, accelerator)
    config = model.config
    raw, transform = load_raw_dataset(data_args), MultiViewTransform.from_config(config)
    data = PretrainingData(
        raw, transform, batch_size=args.per_device_train_batch_size,
        num_channels=config.num_channels, seed=args.seed, rank=accelerator.process_index,
        world_size=accelerator.num_processes, num_workers=data_args.dataloader_num_workers,
        shuffle_buffer_size=data_args.shuffle_buffer_size, image_column=data_args.image_column,
        pin_memory=accelerator.device.type == "cuda",
    )
    if config.queue_size:
        check_queue_fits(config.queue_size, args.per_device_train_batch_size * accelerator.num_processes
                         * config.num_target_groups, "per-device batch x processes x target groups")
    schedule = _schedule(args, data, accelerator)
    optimizer = build_optimizer(model, args.optimizer, schedule.learning_rate, args.weight_decay,
                                momentum=args.sgd_momentum)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type, schedule.total_steps, schedule.warmup_steps)
    prepared, optimizer = _prepare(accelerator, model, optimizer, args)
    # The scheduler is not prepared: it steps once per optimizer step and is checkpointed as JSON (checkpointing.py).
    unwrapped = accelerator.unwrap_model(prepared, keep_torch_compile=False)
    guard = DivergenceGuard(accelerator, Path(args.output_dir))
    return _Run(args, data_args, config, accelerator, prepared, unwrapped, optimizer, scheduler, raw, data, transform,
                schedule, guard)


def _schedule(args: PretrainingArguments, data: PretrainingData, accelerator: Accelerator) -> _Schedule:
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = _optimizer_steps_per_epoch(data, args)
    total_steps = args.max_steps if args.max_steps > 0 else _steps_from_epochs(args, steps_per_epoch)
    warmup = args.warmup_steps + round(args.warmup_epochs * (steps_per_epoch or 0))
    learning_rate = scaled_learning_rate(args.learning_rate, global_batch, args.scale_learning_rate)
    return _Schedule(total_steps, steps_per_epoch, warmup, learning_rate, global_batch)


def _start(run: _Run) -> ResumePoint:
    """Clear what an interrupted save left, load the checkpoint to resume from (if any), start the trackers."""
    accelerator, args = run.accelerator, run.args
    resume = ResumePoint()
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        for name in remove_unfinished(run.output_dir):
            logger.warning("Removed %s, left by an interrupted checkpoint save or deletion.", name)
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        resume = load_checkpoint(accelerator, run.output_dir, args.resume_from_checkpoint, run.scheduler)
        _check_resumable_layout(run.unwrapped, run.output_dir)
    tracked = {**asdict(args), **asdict(run.data_args), "framework": run.config.framework, "hub_token": None}
    accelerator.init_trackers("hf_siamese", config=tracked)  # no secrets in the tracked config
    logger.info("Training %d steps, global batch %d, lr %.4g, %d processes", run.schedule.total_steps,
                run.schedule.global_batch, run.schedule.learning_rate, accelerator.num_processes)
    return resume


def _check_resumable_layout(model: SiameseForPreTraining, output_dir: Path) -> None:
    """A checkpoint of the older head layout resumes only without a ladder: with one, its optimizer state lists
    the heads in another order."""
    if model.loaded_legacy_layout and len(model.levels) > 1:
        raise ValueError(
            f"The checkpoint in {output_dir} was written with the older head layout (one attribute per head kind), "
            "whose optimizer state orders a ladder's heads differently. Resume it with the hf_siamese version that "
            "wrote it, or start a new run from its weights with --model_name_or_path."
        )


def _loop(run: _Run, resume: ResumePoint, actions: list["_AfterStep"]) -> int:
    """Train from ``resume`` to the last step, running each action after the optimizer steps it is due at."""
    step, accelerator = resume.step, run.accelerator
    batches = run.data.batches(start_epoch=resume.epoch, start_batch=resume.batches_done)
    if resume.batches_done and step < run.schedule.total_steps:
        with run.metrics.paused():  # replaying the epoch's batches before the checkpoint is not training time
            batches = itertools.chain([next(batches)], batches)
    while step < run.schedule.total_steps:
        epoch, batch_index, batch = next(batches)
        batch = views_to_device(batch, accelerator.device, run.args.channels_last)
        output = training_step(accelerator, run.model, run.optimizer, batch, run.args.max_grad_norm)
        run.guard.observe(output.loss, step + 1)
        run.metrics.count_images(len(batch["source_pixel_values"][0]) * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        run.scheduler.step()
        step += 1
        momentum = ema_step(run.unwrapped, step / run.schedule.total_steps)
        run.metrics.advance()
        done = _StepDone(step, epoch, batch_index, output, momentum)
        for action in actions:
            if action.due(step):
                action(done)
    run.metrics.close()
    return step


class _AfterStep:
    """An action after an optimizer step, due every ``every`` steps (never when 0) and, with ``at_end``, at the
    last step."""

    at_end = False

    def __init__(self, run: _Run, every: int):
        self.run, self.every = run, every

    def due(self, step: int) -> bool:
        return (bool(self.every) and step % self.every == 0) or (self.at_end and step == self.run.schedule.total_steps)

    def __call__(self, done: _StepDone) -> None:
        raise NotImplementedError


class _SaveCheckpoint(_AfterStep):
    """A checkpoint every `checkpointing_steps` (the last step saves the model instead), pushed if asked."""

    def __init__(self, run: _Run):
        super().__init__(run, run.args.checkpointing_steps)

    def due(self, step: int) -> bool:
        return super().due(step) and step < self.run.schedule.total_steps

    def __call__(self, done: _StepDone) -> None:
        run = self.run
        point = ResumePoint(done.step, done.epoch, done.batch_index + 1, run.metrics.elapsed)
        checkpoint = save_checkpoint(run.accelerator, run.output_dir, point, run.scheduler,
                                     run.args.checkpoints_total_limit)
        if run.args.push_checkpoints and run.accelerator.is_main_process:
            _push_checkpoint(run.args, run.output_dir, checkpoint, done.step)


class _LogMetrics(_AfterStep):
    """The step's loss (mean over processes), lr, momentum, skipped images and per-term losses."""

    at_end = True

    def __init__(self, run: _Run):
        super().__init__(run, run.args.logging_steps)
        self.loss = float("nan")

    def __call__(self, done: _StepDone) -> None:
        run, output = self.run, done.output
        self.loss = run.accelerator.reduce(output.loss.detach(), reduction="mean").item()
        record = {"step": done.step, "epoch": done.epoch, "loss": self.loss, "lr": run.scheduler.get_last_lr()[0],
                  "momentum": done.momentum,
                  "skipped_images": _sum_over_processes(run.accelerator, run.data.skipped_images)}
        if output.local_loss is not None:
            record.update(global_loss=output.global_loss.item(), local_loss=output.local_loss.item())
        if len(output.level_losses) > 1 or output.dense_loss is not None:
            record.update({f"level_loss/{level}": value.item() for level, value in output.level_losses.items()})
        if output.dense_loss is not None:
            record["dense_loss"] = output.dense_loss.item()
        run.metrics.log(record)


class _CheckDivergence(_AfterStep):
    """Before anything is logged or saved: no process saw a non-finite loss, and before a save, no weight is."""

    def __init__(self, run: _Run):
        super().__init__(run, run.args.logging_steps)
        self.checkpoint = _SaveCheckpoint(run)

    def due(self, step: int) -> bool:
        return super().due(step) or self._saving(step)

    def _saving(self, step: int) -> bool:
        return self.checkpoint.due(step) or step == self.run.schedule.total_steps

    def __call__(self, done: _StepDone) -> None:
        model = self.run.model
        self.run.guard.check(done.step, [*model.parameters(), *model.buffers()] if self._saving(done.step) else None)


class _MeasureVariance(_AfterStep):
    """The source/target variance (Wang et al. 2022) every `variance_steps`, off the training clock."""

    def __init__(self, run: _Run, monitor: VarianceMonitor):
        super().__init__(run, run.args.variance_steps)
        self.monitor = monitor

    def __call__(self, done: _StepDone) -> None:
        with self.run.metrics.paused():
            self.run.metrics.log({"step": done.step, **self.monitor.measure(self.run.unwrapped).as_dict()})


class _MeasureOnlineKNN(_AfterStep):
    """Online kNN every `eval_steps` and at the end, on the main process, off the training clock."""

    at_end = True

    def __init__(self, run: _Run, knn: OnlineKNN | None):
        super().__init__(run, run.args.eval_steps)
        self.knn = knn  # None on the other processes, which wait

    def __call__(self, done: _StepDone) -> None:
        with self.run.metrics.paused():
            if self.knn is not None:
                self.run.metrics.log({"step": done.step, "knn_top1": self.knn.measure(self.run.unwrapped.siamese)})
            self.run.accelerator.wait_for_everyone()


def _observers(run: _Run) -> list[_AfterStep]:
    """The measurements asked for: the variance monitor and the online kNN."""
    args, observers = run.args, []
    if args.variance_steps:
        images = probe_images(run.raw, args.variance_probe_size, run.config.num_channels,
                              run.data_args.image_column)
        observers.append(_MeasureVariance(run, VarianceMonitor.from_view_transform(images, run.transform)))
    if args.eval_steps:
        observers.append(_MeasureOnlineKNN(run, _online_knn(args, run.data_args, run.accelerator)))
    return observers


def _finish(run: _Run, step: int, loss: float) -> TrainResult:
    """Save the model with its processor, run record and card (and timm export); push it if asked."""
    accelerator, args, output_dir = run.accelerator, run.args, run.output_dir
    total_skipped = _sum_over_processes(accelerator, run.data.skipped_images)
    state_dict = _float32_state_dict(accelerator, run.model, run.unwrapped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        save_image_processor(run.config, output_dir)
        record = _training_run(args, run.data_args, accelerator, step, run.schedule, run.metrics.elapsed, total_skipped)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            record["deepspeed"] = _deepspeed_settings(run.model)
        (output_dir / TRAINING_RUN).write_text(json.dumps(record, indent=2))
        write_model_card(output_dir, model_id=_hub_model_id(args, output_dir) if args.push_to_hub else None)
        if args.export_timm:
            export_timm(run.unwrapped, args.export_timm)
    accelerator.end_training()  # also ends the process group: no collective after this
    if total_skipped:
        logger.warning("Skipped %d undecodable images.", total_skipped)
    if args.push_to_hub and accelerator.is_main_process:
        _push_model(args, output_dir, step)
    return TrainResult(str(output_dir), step, loss, total_skipped, run.metrics.elapsed)


def native_mixed_precision() -> str:
    """"bf16" where it is computed natively (a GPU, or a CPU with AVX-512 BF16 or AMX), else "no": emulated bf16 is
    slower than fp32."""
    native = (torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported()
              or torch.cpu._is_amx_tile_supported())
    return "bf16" if native else "no"


def median_images_per_second(output_dir: Path) -> float | None:
    """A finished run's median training throughput over its logged intervals (the first includes start-up)."""
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [record["images_per_s"] for record in records if "images_per_s" in record][1:]
    return round(statistics.median(rates), 1) if rates else None


def views_to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    """The batch's views (and crop geometries) on ``device``, image views in channels-last format if asked."""

    def move(tensor: torch.Tensor) -> torch.Tensor:
        layout = torch.channels_last if channels_last and tensor.dim() == 4 else torch.preserve_format
        return tensor.to(device, non_blocking=True, memory_format=layout)

    return {key: [move(view) for view in views] for key, views in batch.items()}


def training_step(accelerator: Accelerator, model, optimizer, batch: dict, max_grad_norm: float | None = None):
    """Forward, backward and (once gradients are accumulated) the optimizer step on one batch of views.

    Without accumulation the previous step's gradients are freed between the forward and the backward, so that
    the backward reuses their memory instead of mapping fresh pages; with accumulation they live until the
    cycle's last backward and are freed after the optimizer step. No host-device synchronisation: the loss stays
    on the device. Returns the model's output.
    """
    accumulating = accelerator.gradient_accumulation_steps > 1
    with accelerator.accumulate(model):
        output = model(**batch)
        if not accumulating:
            optimizer.zero_grad(set_to_none=True)
        accelerator.backward(output.loss)
        if accelerator.sync_gradients and max_grad_norm:
            accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)
        optimizer.step()
        if accumulating:
            optimizer.zero_grad(set_to_none=True)
    return output


def ema_step(model: SiameseForPreTraining, progress: float) -> float | None:
    """The target's EMA update after an optimizer step at ``progress`` (0 to 1) of training; its momentum, or
    ``None`` for a framework without a momentum target (SimSiam)."""
    if model.target_encoder is None:
        return None
    momentum = model.momentum_at(progress)
    model.momentum_update(momentum)
    return momentum


class NonFiniteLossError(RuntimeError):
    """Training diverged (NaN or infinite loss or weights): it stops, nothing after the last good checkpoint saved."""


class DivergenceGuard:
    """Stops a diverged run before it logs, checkpoints or saves anything non-finite.

    ``observe`` notes the first step whose loss is not finite on the device, so the training step never waits for
    it; ``check`` (collective) raises :class:`NonFiniteLossError` on every process once any process saw one, and
    with ``tensors`` (weights and buffers) also when an update turned one non-finite (a finite loss can precede that). A loss that
    is not finite at step ``s`` was computed from the weights of step ``s - 1``: a checkpoint saved there is set
    aside as ``diverged-checkpoint-{s-1}``, so that resuming from 'latest' takes the last good one.
    """

    def __init__(self, accelerator: Accelerator, output_dir: Path):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.first_bad_step = torch.tensor(-1, device=accelerator.device)

    def observe(self, loss: torch.Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first_bad_step = torch.where(bad & (self.first_bad_step < 0), step, self.first_bad_step)

    def check(self, step: int, tensors=None) -> None:
        weights_bad = torch.tensor(False, device=self.first_bad_step.device)
        # ZeRO-3 empties partitioned parameters: check this process's partition (ds_tensor) instead.
        local = [getattr(t, "ds_tensor", t).detach() for t in tensors or ()]
        local = [t for t in local if t.numel() and t.is_floating_point()]
        if local:
            weights_bad = ~torch.stack([torch.isfinite(t).all() for t in local]).all()
        flags = torch.stack([self.first_bad_step, torch.where(weights_bad, step, -1)])
        gathered = self.accelerator.gather(flags[None]).reshape(-1, 2)
        loss_steps, weight_steps = ([int(v) for v in column.tolist() if v >= 0] for column in gathered.T)
        if not loss_steps and not weight_steps:
            return
        if loss_steps:
            bad_weights_step = min(loss_steps) - 1
            what = (f"the loss became NaN or infinite at step {min(loss_steps)} (computed from the weights after "
                    f"step {bad_weights_step})")
        else:
            bad_weights_step = min(weight_steps)
            what = f"a weight became NaN or infinite at step {bad_weights_step}"
        good = [path for path in completed_checkpoints(self.output_dir) if checkpoint_step(path) < bad_weights_step]
        if self.accelerator.is_main_process:
            for path in set_aside_checkpoints(self.output_dir, bad_weights_step):
                logger.error("Set aside %s: its weights diverged.", path)
        self.accelerator.wait_for_everyone()  # no process exits (and gets the launcher to stop the rest) before that
        where = (f"The last good checkpoint is {good[-1]}; resume from it with a lower `learning_rate` or a "
                 "`max_grad_norm`." if good else
                 "No checkpoint from before it remains; lower `learning_rate` or set `max_grad_norm`.")
        raise NonFiniteLossError(f"Training diverged: {what}. It stopped without saving the model. {where}")


class _MetricsLogger:
    """Step metrics to the progress bar, the trackers and ``metrics.jsonl`` (one JSON line per record)."""

    def __init__(self, accelerator: Accelerator, path: Path, total_steps: int, initial_step: int, resuming: bool,
                 seconds_before: float = 0.0):
        self.accelerator = accelerator
        self.path = path
        self.progress = tqdm(total=total_steps, initial=initial_step, desc="pretraining",
                             disable=not accelerator.is_local_main_process)
        self.started = self.since = time.time()
        self.paused_seconds = 0.0
        self.paused_since: float | None = None
        self.seconds_before = seconds_before  # a resumed run's clock continues from its checkpoint's
        self.images = 0
        if resuming and accelerator.is_main_process and path.exists():
            # A resumed run replays the steps after its checkpoint (all of them when there was none): drop what
            # the interrupted run logged for them.
            kept = [line for line in path.read_text().splitlines() if _logged_step(line) <= initial_step]
            temporary = path.with_name(f".tmp-{path.name}")
            temporary.write_text("".join(f"{line}\n" for line in kept))
            os.replace(temporary, path)

    @property
    def elapsed(self) -> float:
        """Training seconds: since the start (and before it, for a resumed run), without the paused ones."""
        now = self.paused_since if self.paused_since is not None else time.time()
        return self.seconds_before + now - self.started - self.paused_seconds

    @contextlib.contextmanager
    def paused(self):
        """The clock stops in this block: its time counts neither in ``elapsed`` nor in the next throughput."""
        self.paused_since = time.time()
        try:
            yield
        finally:
            pause = time.time() - self.paused_since
            self.paused_seconds += pause
            self.since += pause
            self.paused_since = None

    def count_images(self, count: int) -> None:
        self.images += count

    def advance(self) -> None:
        self.progress.update(1)

    def log(self, record: dict) -> None:
        """Log ``record`` (with ``step``) and the training seconds so far; records with a loss also get the
        throughput since the last one."""
        record["seconds"] = round(self.elapsed, 2)
        if "loss" in record:
            now = time.time()
            record["images_per_s"] = self.images / max(now - self.since, 1e-9)
            self.images, self.since = 0, now
            self.progress.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.3g}",
                                      img_s=f"{record['images_per_s']:.0f}")
        self.accelerator.log({k: v for k, v in record.items() if v is not None and k != "step"}, step=record["step"])
        if self.accelerator.is_main_process:
            with self.path.open("a") as stream:
                stream.write(json.dumps(record) + "\n")

    def close(self) -> None:
        self.progress.close()


def _logged_step(line: str) -> float:
    """The step of a ``metrics.jsonl`` line; a line cut short by a kill counts as after any step."""
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf


def _training_run(args: PretrainingArguments, data_args: DataArguments, accelerator: Accelerator, steps: int,
                  schedule: _Schedule, seconds: float, skipped_images: int) -> dict:
    """What the run did, for the model card: written once, at the end, by the main process."""
    if torch.cuda.is_available():
        hardware = f"{accelerator.num_processes} x {torch.cuda.get_device_name()}"
    else:
        hardware = f"CPU ({os.cpu_count()} cores), {accelerator.num_processes} process(es)"
    return {
        "steps": steps, "epochs": steps / schedule.steps_per_epoch if schedule.steps_per_epoch else None,
        "per_device_train_batch_size": args.per_device_train_batch_size, "processes": accelerator.num_processes,
        "gradient_accumulation_steps": args.gradient_accumulation_steps,
        "global_batch": schedule.global_batch,
        "optimizer": args.optimizer, "base_learning_rate": args.learning_rate, "learning_rate": schedule.learning_rate,
        "weight_decay": args.weight_decay, "lr_scheduler_type": args.lr_scheduler_type,
        "warmup_steps": schedule.warmup_steps,
        "mixed_precision": accelerator.mixed_precision, "seed": args.seed, "hardware": hardware, "train_seconds": seconds,
        "dataset_name": data_args.dataset_name, "data": data_args.train_dir or data_args.data_files,
        "skipped_images": skipped_images, "hub_model_id": args.hub_model_id,
    }


def _hub_model_id(args: PretrainingArguments, output_dir: Path) -> str:
    return args.hub_model_id or output_dir.resolve().name


def _push_model(args: PretrainingArguments, output_dir: Path, step: int) -> None:
    """Push the finished model directory; a failure leaves it intact and says how to push it later."""
    repo_id = _hub_model_id(args, output_dir)
    try:
        push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private,
                    commit_message=f"hf_siamese: model after {step} steps")
    except Exception as error:
        raise RuntimeError(
            f"Pushing {output_dir} to the Hub repository {repo_id!r} failed ({type(error).__name__}: {error}). "
            f"The trained model is intact in {output_dir}; push it later with "
            f"`huggingface-cli upload {repo_id} {output_dir}`."
        ) from error
    logger.info("Pushed %s to %s", output_dir, repo_id)


def _push_checkpoint(args: PretrainingArguments, output_dir: Path, checkpoint: Path, step: int) -> None:
    """Push a checkpoint to ``last-checkpoint/``; a failure is logged and training goes on."""
    repo_id = _hub_model_id(args, output_dir)
    try:
        push_folder(checkpoint, repo_id, token=args.hub_token, private=args.hub_private,
                    commit_message=f"hf_siamese: checkpoint at step {step}", path_in_repo="last-checkpoint")
    except Exception as error:
        logger.error("Pushing %s to %s failed (%s: %s); training continues, the checkpoint is kept locally.",
                     checkpoint, repo_id, type(error).__name__, error)


def _sum_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum"))


def _make_accelerator(args: PretrainingArguments, output_dir: Path) -> Accelerator:
    deepspeed = os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"
    # DeepSpeed on CPU: accelerate leaves the backend unset and sees one process unless told gloo.
    backend = "gloo" if deepspeed and not torch.cuda.is_available() else None
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=args.ddp_timeout))]
    if args.deterministic:
        # cuBLAS reads it when CUDA starts; without it, deterministic mode raises at the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Without --torch_compile, accelerate's own default (and `accelerate launch --dynamo_backend`) applies.
    dynamo = TorchDynamoPlugin(backend="inductor", mode=args.torch_compile_mode) if args.torch_compile else None
    return Accelerator(
        dynamo_plugin=dynamo,
        # Without a GPU, `cpu=True` turns a multi-process launch into MULTI_CPU over gloo (else every process
        # believes it is alone and the main one).
        cpu=not torch.cuda.is_available() and not deepspeed,
        mixed_precision=args.mixed_precision,
        # A plugin, not `gradient_accumulation_steps=`: accelerate would let a launcher's value override the run's.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps),
        deepspeed_plugin=_deepspeed_plugin(args) if deepspeed else None,
        log_with=_trackers(args.report_to),
        project_dir=str(output_dir),
        kwargs_handlers=handlers,
    )


def _trackers(report_to: str):
    if report_to == "none":
        return None
    if report_to == "auto":
        try:
            import tensorboard  # noqa: F401
        except ImportError:
            return None
        return ["tensorboard"]
    return [name.strip() for name in report_to.split(",")]


def _build_model(config: SiameseConfig, args: PretrainingArguments, accelerator: Accelerator) -> SiameseForPreTraining:
    if args.model_name_or_path:
        # Weights only from safetensors: a pickled checkpoint is never opened.
        model = SiameseForPreTraining.from_pretrained(args.model_name_or_path, config=config, use_safetensors=True)
        model.train()  # from_pretrained returns a model in eval mode
    else:
        model = SiameseForPreTraining(config)
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        stage = accelerator.state.deepspeed_plugin.zero_stage
        if stage == 3 and model.target_encoder is not None:
            raise ValueError(
                "DeepSpeed ZeRO-3 partitions the target encoder's parameters, so the EMA update cannot read them; "
                "use ZeRO-1/2 (parameters replicated) or framework 'simsiam'."
            )
        if args.optimizer == "lars" and (stage > 0 or accelerator.mixed_precision != "no"):
            raise ValueError(
                "`optimizer` 'lars' cannot run under DeepSpeed ZeRO or 16-bit: DeepSpeed hands the optimizer "
                "flattened partitions of parameter groups, so LARS's trust ratio would be computed per slice, not per "
                "layer. Launch with DDP (configs/accelerate/multi_gpu.yaml) for LARS, or use `optimizer` sgd/adamw."
            )
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)
    if args.sync_bn and accelerator.num_processes > 1:
        if not torch.cuda.is_available():
            raise ValueError("`sync_bn` needs CUDA: torch's SyncBatchNorm does not run on CPU.")
        model = convert_sync_batchnorm(model)
    # DDP would broadcast every MoCo queue from rank 0 at each forward; they are identical by construction.
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, model.queue_buffer_names())
    return model


def _prepare(accelerator: Accelerator, model: SiameseForPreTraining, optimizer, args: PretrainingArguments):
    """``accelerator.prepare`` for the model and optimizer, with what DeepSpeed needs around it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare(model, optimizer)
    # accelerate reads the micro-batch from a prepared DataLoader; ours is not prepared (it shards itself).
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
        args.per_device_train_batch_size
    )
    engine, optimizer = accelerator.prepare(model, optimizer)
    settings = _deepspeed_settings(engine)
    for name, wanted in _deepspeed_run_values(args).items():
        if settings[name] != wanted:
            raise ValueError(
                f"The DeepSpeed config sets `{name}` to {settings[name]} but this run asks for {wanted} (from "
                f"--gradient_accumulation_steps / --max_grad_norm): set it to \"auto\" in the DeepSpeed config."
            )
    if settings["bf16"] or settings["fp16"]:
        _keep_precision_after_16_bit_cast(model)
    return engine, optimizer


def _keep_precision_after_16_bit_cast(model: SiameseForPreTraining) -> None:
    """After DeepSpeed cast every parameter to 16 bits: the target branch back to fp32, and the source's
    BatchNorm statistics to its parameters' dtype.

    An EMA increment of (1 - m) = 0.001-0.004 of the source-target difference falls below half a bf16 ulp, so a
    16-bit target would never move; DeepSpeed leaves buffers in fp32, which BatchNorm on CPU refuses next to 16-bit
    weights. The target's forward casts its input to fp32 and the loss is computed in fp32.
    """
    for target in model.target_modules():
        target.float()
    targets = {id(module) for target in model.target_modules() for module in target.modules()}
    for module in model.modules():
        if isinstance(module, torch.nn.modules.batchnorm._BatchNorm) and id(module) not in targets:
            if module.weight is not None and module.running_mean is not None:
                module.running_mean.data = module.running_mean.data.to(module.weight.dtype)
                module.running_var.data = module.running_var.data.to(module.weight.dtype)


def _deepspeed_settings(engine) -> dict:
    """What the DeepSpeed engine actually uses (for the run's record and the checks against the arguments)."""
    return {"zero_stage": engine.zero_optimization_stage(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "gradient_clipping": engine.gradient_clipping(), "bf16": engine.bfloat16_enabled(),
            "fp16": engine.fp16_enabled(), "train_batch_size": engine.train_batch_size()}


def _deepspeed_plugin(args: PretrainingArguments) -> DeepSpeedPlugin:
    """The launcher's DeepSpeed settings, with this run's gradient accumulation and clipping.

    A launcher config (``gradient_accumulation_steps`` / ``gradient_clipping`` in its ``deepspeed_config``) would
    otherwise win over the run's arguments, while the learning-rate scaling and epoch length follow the arguments;
    and DeepSpeed clips at 1.0 unless told otherwise. A DeepSpeed JSON config's own values are checked after
    ``prepare`` (see ``_prepare``).
    """
    launcher = os.environ.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS")
    if launcher not in (None, "auto", str(args.gradient_accumulation_steps)):
        logger.warning("The launcher config sets gradient_accumulation_steps=%s; this run uses its argument, %d.",
                       launcher, args.gradient_accumulation_steps)
    values = _deepspeed_run_values(args)
    plugin = DeepSpeedPlugin(**values)
    for key, value in values.items():
        if plugin.deepspeed_config.get(key, "auto") == "auto":
            plugin.deepspeed_config[key] = value
    return plugin


def _deepspeed_run_values(args: PretrainingArguments) -> dict:
    """The DeepSpeed settings this run's arguments decide (0 clipping: none, DeepSpeed's own default is 1.0)."""
    return {"gradient_accumulation_steps": args.gradient_accumulation_steps,
            "gradient_clipping": args.max_grad_norm or 0.0}


def _float32_state_dict(accelerator: Accelerator, model, unwrapped: SiameseForPreTraining) -> dict:
    """The whole model's weights, 16-bit floating tensors (a DeepSpeed bf16/fp16 source) as fp32, the dtype its
    config declares. Collective under DeepSpeed: ZeRO-3 gathers every process's partitions (for the main one)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state_dict = accelerator.get_state_dict(model) or {}
    else:
        state_dict = unwrapped.state_dict()
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


def _optimizer_steps_per_epoch(data: PretrainingData, args: PretrainingArguments) -> int | None:
    if data.steps_per_epoch is None:
        return None
    return max(data.steps_per_epoch // args.gradient_accumulation_steps, 1)


def _steps_from_epochs(args: PretrainingArguments, steps_per_epoch: int | None) -> int:
    if steps_per_epoch is None:
        raise ValueError("The dataset's size is unknown (streaming): set `max_steps` instead of `num_train_epochs`.")
    return max(1, math.ceil(args.num_train_epochs * steps_per_epoch))


def _online_knn(args: PretrainingArguments, data_args: DataArguments, accelerator: Accelerator) -> OnlineKNN | None:
    """The online kNN evaluator, on the main process only (the other processes wait for it)."""
    if not args.eval_steps:
        return None
    held_out = data_args.held_out()  # raises early, on every process, when no held-out data is configured
    if accelerator.distributed_type == DistributedType.DEEPSPEED and accelerator.state.deepspeed_plugin.zero_stage == 3:
        raise ValueError("`eval_steps` (online kNN) needs whole parameters on one process; ZeRO-3 partitions them.")
    if not accelerator.is_main_process:
        return None
    bank_data = dataclasses.replace(data_args, split=data_args.knn_bank_split) if data_args.knn_bank_split else data_args
    bank = load_labelled(bank_data, data_args.knn_bank_size, seed=args.seed)
    queries = load_labelled(held_out, data_args.max_eval_samples, seed=args.seed)
    return OnlineKNN(bank, queries, label_column=data_args.label_column,
                     image_column=data_args.image_column, k=args.knn_k, temperature=args.knn_temperature,
                     batch_size=args.per_device_train_batch_size)
