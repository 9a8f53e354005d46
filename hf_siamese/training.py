"""The pretraining loop on Accelerate: one CPU, one GPU, many GPUs or DeepSpeed ZeRO-1/2.

Per optimizer step: views -> ``SiameseForPreTraining`` -> loss -> backward -> optimizer and lr schedule -> EMA
update of the target on the unwrapped model. Checkpoints are written to a temporary directory and renamed, so an
interrupted save never replaces a good one; ``resume_from_checkpoint`` continues the same run (same data order,
same augmentations, same schedules).
"""

import dataclasses
import itertools
import json
import logging
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from .accelerator import (
    build_model, deepspeed_settings, float32_state_dict, make_accelerator, prepare, sum_over_processes,
)
from .checkpointing import ResumePoint, find_checkpoint, load_checkpoint, remove_unfinished, save_checkpoint
from .configuration_siamese import SiameseConfig
from .data import DataArguments, PretrainingData, load_labelled, load_raw_dataset, probe_images
from .device_augment import finish_views
from .hub import check_hub_access, push_checkpoint, push_model, save_image_processor
from .levels import check_queue_fits
from .model_card import TRAINING_RUN, write_model_card
from .modeling_siamese import SiameseForPreTraining
from .monitoring import DivergenceGuard, MetricsLogger
from .optim import build_optimizer, build_scheduler, scaled_learning_rate
from .probing import OnlineKNN
from .run_folder import check_new_run, check_resumable, clear
from .sources import describe_source
from .timm_export import check_timm_exportable, export_timm
from .training_args import PretrainingArguments
from .variance import VarianceMonitor
from .views import MultiViewTransform

__all__ = ["train", "TrainResult", "training_step", "ema_step", "views_to_device"]

logger = logging.getLogger(__name__)


@dataclass
class TrainResult:
    output_dir: str
    global_step: int
    loss: float
    skipped_images: int
    train_seconds: float


def train(config: SiameseConfig, data_args: DataArguments, args: PretrainingArguments) -> TrainResult:
    """Pretrain a :class:`SiameseForPreTraining` and save it (with its image processor) in ``args.output_dir``.

    The run's parts are built here, each once, after the parts it needs.
    """
    if args.export_timm:
        check_timm_exportable(config)  # before training, not after it
    if args.push_to_hub:
        check_hub_access(args.hub_token)
    accelerator = make_accelerator(args, args.tracker_dir)
    _take_output_dir(args, accelerator)
    set_seed(args.seed, deterministic=args.deterministic)
    run = _build_run(config, data_args, args, accelerator)
    resume = _start_or_resume(run)
    # The measurements load their data after the resume, and before the metrics logger starts the training clock.
    variance, knn = _variance_monitor(run), _online_knn(args, data_args, accelerator)
    metrics = MetricsLogger(accelerator, run.output_dir / "metrics.jsonl", run.schedule.total_steps, resume.step,
                            resuming=bool(args.resume_from_checkpoint), seconds_before=resume.seconds)
    guard = DivergenceGuard(accelerator, run.output_dir)
    log, save = _LogMetrics(run, metrics), _SaveCheckpoint(run, metrics)
    check = _CheckDivergence(guard, run.model, save, args.logging_steps, run.schedule.total_steps)
    actions = [check, log, *_measurements(run, metrics, variance, knn), save]  # run in this order after a step
    step = _loop(run, resume, metrics, guard, actions)
    return _finish(run, step, log.loss, metrics, resume.checkpoint)


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
    """The run's fixed parts, built before the first step: what the loop trains and the finish saves."""

    args: PretrainingArguments
    data_args: DataArguments
    config: SiameseConfig
    accelerator: Accelerator
    model: torch.nn.Module  # as prepared: DDP, a DeepSpeed engine or the model itself
    unwrapped: SiameseForPreTraining
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    raw: object  # the dataset as loaded, before views (the variance monitor's probe images come from it)
    source: dict  # what `raw` is, as recorded (sources.source_record)
    data: PretrainingData
    transform: MultiViewTransform
    schedule: _Schedule

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


def _build_run(config: SiameseConfig, data_args: DataArguments, args: PretrainingArguments,
               accelerator: Accelerator) -> _Run:
    """The model, the data, the schedule and the optimizer, prepared by Accelerate."""
    model = build_model(config, args, accelerator)
    config = model.config
    raw = load_raw_dataset(data_args)
    # uint8 from the workers (a quarter of float32's bytes), normalised on the device by `finish_views`
    transform = MultiViewTransform.from_config(config, uint8_views=True, augment_on_device=args.augment_on_device)
    source = data_args.source_record(raw)
    logger.info("Pretraining on %s", describe_source(source))
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
    _warn_if_shrunk(config, schedule)
    optimizer = build_optimizer(model, args.optimizer, schedule.learning_rate, args.weight_decay,
                                momentum=args.sgd_momentum)
    scheduler = build_scheduler(optimizer, args.lr_scheduler_type, schedule.total_steps, schedule.warmup_steps)
    prepared, optimizer = prepare(accelerator, model, optimizer, args)
    # The scheduler is not prepared: it steps once per optimizer step and is checkpointed as JSON (checkpointing.py).
    unwrapped = accelerator.unwrap_model(prepared, keep_torch_compile=False)
    return _Run(args, data_args, config, accelerator, prepared, unwrapped, optimizer, scheduler, raw, source, data,
                transform, schedule)


def _schedule(args: PretrainingArguments, data: PretrainingData, accelerator: Accelerator) -> _Schedule:
    global_batch = args.per_device_train_batch_size * args.gradient_accumulation_steps * accelerator.num_processes
    steps_per_epoch = _optimizer_steps_per_epoch(data, args)
    total_steps = args.max_steps if args.max_steps > 0 else _steps_from_epochs(args, steps_per_epoch)
    warmup = args.warmup_steps + round(args.warmup_epochs * (steps_per_epoch or 0))
    learning_rate = scaled_learning_rate(args.learning_rate, global_batch, args.scale_learning_rate)
    return _Schedule(total_steps, steps_per_epoch, warmup, learning_rate, global_batch)


def _take_output_dir(args: PretrainingArguments, accelerator: Accelerator) -> None:
    """One run per output folder: an earlier run there is refused, or cleared with ``overwrite_output_dir``."""
    output_dir, tracker_dir = Path(args.output_dir), Path(args.tracker_dir)
    clearing = check_new_run(output_dir, tracker_dir, resuming=bool(args.resume_from_checkpoint),
                             overwrite=args.overwrite_output_dir)  # on every process: all raise, or none
    accelerator.wait_for_everyone()
    if clearing and accelerator.is_main_process:
        clear(output_dir, tracker_dir)
    accelerator.wait_for_everyone()


def _warn_if_shrunk(config: SiameseConfig, schedule: _Schedule) -> None:
    """A recipe cut short or down on the command line can leave settings that no longer fit: say which to set."""
    if schedule.warmup_steps >= schedule.total_steps:
        logger.warning("The warm-up (%d steps) is as long as the run (%d steps): the learning rate never reaches its "
                       "peak. Set --warmup_epochs or --warmup_steps (0 for none) to fit the run.",
                       schedule.warmup_steps, schedule.total_steps)
    if config.multicrop and config.multicrop_local_size > config.image_size:
        logger.warning("The MultiCrop local crops (multicrop_local_size %d) are larger than the global views "
                       "(image_size %d). Set --multicrop_local_size below --image_size (the papers: 96 of 224).",
                       config.multicrop_local_size, config.image_size)


def _start_or_resume(run: _Run) -> ResumePoint:
    """Clear what an interrupted save left, load the checkpoint to resume from (if any), start the trackers."""
    accelerator, args = run.accelerator, run.args
    resume = ResumePoint()
    if accelerator.is_main_process:
        run.output_dir.mkdir(parents=True, exist_ok=True)
        for name in remove_unfinished(run.output_dir):
            logger.warning("Removed %s, left by an interrupted checkpoint save or deletion.", name)
    accelerator.wait_for_everyone()
    if args.resume_from_checkpoint:
        checkpoint = find_checkpoint(run.output_dir, args.resume_from_checkpoint)
        check_resumable(run.output_dir, checkpoint, _run_settings(run.schedule))
        if checkpoint is None:
            logger.warning("No checkpoint in %s: starting from scratch.", run.output_dir)
        else:
            resume = load_checkpoint(accelerator, run.output_dir, checkpoint, run.scheduler)
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


def _loop(run: _Run, resume: ResumePoint, metrics: MetricsLogger, guard: DivergenceGuard,
          actions: list["_AfterStep"]) -> int:
    """Train from ``resume`` to the last step, running each action after the optimizer steps it is due at."""
    step, accelerator = resume.step, run.accelerator
    batches = run.data.batches(start_epoch=resume.epoch, start_batch=resume.batches_done)
    if resume.batches_done and step < run.schedule.total_steps:
        with metrics.paused():  # replaying the epoch's batches before the checkpoint is not training time
            batches = itertools.chain([next(batches)], batches)
    while step < run.schedule.total_steps:
        epoch, batch_index, batch = next(batches)
        batch = finish_views(views_to_device(batch, accelerator.device), run.config, run.args.channels_last)
        output = training_step(accelerator, run.model, run.optimizer, batch, run.args.max_grad_norm)
        guard.observe(output.loss, step + 1)
        metrics.count_images(len(batch["source_pixel_values"][0]) * accelerator.num_processes)
        if not accelerator.sync_gradients:
            continue
        run.scheduler.step()
        step += 1
        momentum = ema_step(run.unwrapped, step / run.schedule.total_steps)
        metrics.advance()
        done = _StepDone(step, epoch, batch_index, output, momentum)
        for action in actions:
            if action.due(step):
                action(done)
    metrics.close()
    return step


class _AfterStep:
    """An action after an optimizer step, due every ``every`` steps (never when 0) and, with ``at_end``, at
    ``last_step``."""

    at_end = False

    def __init__(self, every: int, last_step: int):
        self.every, self.last_step = every, last_step

    def due(self, step: int) -> bool:
        return (bool(self.every) and step % self.every == 0) or (self.at_end and step == self.last_step)

    def __call__(self, done: _StepDone) -> None:
        raise NotImplementedError


class _SaveCheckpoint(_AfterStep):
    """A checkpoint every `checkpointing_steps` (the last step saves the model instead), pushed if asked."""

    def __init__(self, run: _Run, metrics: MetricsLogger):
        super().__init__(run.args.checkpointing_steps, run.schedule.total_steps)
        self.run, self.metrics = run, metrics  # the checkpoint keeps the training seconds so far

    def due(self, step: int) -> bool:
        return super().due(step) and step < self.last_step

    def __call__(self, done: _StepDone) -> None:
        run = self.run
        point = ResumePoint(done.step, done.epoch, done.batch_index + 1, self.metrics.elapsed)
        checkpoint = save_checkpoint(run.accelerator, run.output_dir, point, run.scheduler,
                                     run.args.checkpoints_total_limit, _run_settings(run.schedule))
        if run.args.push_checkpoints and run.accelerator.is_main_process:
            push_checkpoint(checkpoint, _hub_model_id(run.args, run.output_dir), step=done.step,
                            token=run.args.hub_token, private=run.args.hub_private)


class _LogMetrics(_AfterStep):
    """The step's loss (mean over processes), lr, momentum, skipped images and per-term losses."""

    at_end = True

    def __init__(self, run: _Run, metrics: MetricsLogger):
        super().__init__(run.args.logging_steps, run.schedule.total_steps)
        self.run, self.metrics = run, metrics
        self.loss = float("nan")  # the last one logged: the run's result

    def __call__(self, done: _StepDone) -> None:
        run, output = self.run, done.output
        self.loss = run.accelerator.reduce(output.loss.detach(), reduction="mean").item()
        record = {"step": done.step, "epoch": done.epoch, "loss": self.loss, "lr": run.scheduler.get_last_lr()[0],
                  "momentum": done.momentum,
                  "skipped_images": sum_over_processes(run.accelerator, run.data.skipped_images)}
        if output.local_loss is not None:
            record.update(global_loss=output.global_loss.item(), local_loss=output.local_loss.item())
        if len(output.level_losses) > 1 or output.dense_loss is not None:
            record.update({f"level_loss/{level}": value.item() for level, value in output.level_losses.items()})
        if output.dense_loss is not None:
            record["dense_loss"] = output.dense_loss.item()
        self.metrics.log(record)


class _CheckDivergence(_AfterStep):
    """Before anything is logged or saved: no process saw a non-finite loss, and before a save, no weight is."""

    def __init__(self, guard: DivergenceGuard, model: torch.nn.Module, checkpoint: _SaveCheckpoint, every: int,
                 last_step: int):
        super().__init__(every, last_step)
        self.guard, self.model = guard, model
        self.checkpoint = checkpoint  # the loop's own: its steps are the ones that save

    def due(self, step: int) -> bool:
        return super().due(step) or self._saving(step)

    def _saving(self, step: int) -> bool:
        """A checkpoint, or at the last step the model, is saved after this step."""
        return self.checkpoint.due(step) or step == self.last_step

    def __call__(self, done: _StepDone) -> None:
        tensors = [*self.model.parameters(), *self.model.buffers()] if self._saving(done.step) else None
        self.guard.check(done.step, tensors)


class _MeasureVariance(_AfterStep):
    """The source/target variance (Wang et al. 2022) every `variance_steps`, off the training clock."""

    def __init__(self, monitor: VarianceMonitor, model: SiameseForPreTraining, metrics: MetricsLogger, every: int,
                 last_step: int):
        super().__init__(every, last_step)
        self.monitor, self.model, self.metrics = monitor, model, metrics

    def __call__(self, done: _StepDone) -> None:
        with self.metrics.paused():
            self.metrics.log({"step": done.step, **self.monitor.measure(self.model).as_dict()})


class _MeasureOnlineKNN(_AfterStep):
    """Online kNN every `eval_steps` and at the end, on the main process, off the training clock."""

    at_end = True

    def __init__(self, knn: OnlineKNN | None, model: SiameseForPreTraining, metrics: MetricsLogger,
                 accelerator: Accelerator, every: int, last_step: int):
        super().__init__(every, last_step)
        self.knn = knn  # None on the other processes, which wait
        self.model, self.metrics, self.accelerator = model, metrics, accelerator

    def __call__(self, done: _StepDone) -> None:
        with self.metrics.paused():
            if self.knn is not None:
                self.metrics.log({"step": done.step, "knn_top1": self.knn.measure(self.model.siamese)})
            self.accelerator.wait_for_everyone()


def _variance_monitor(run: _Run) -> VarianceMonitor | None:
    """The variance monitor on its fixed probe images, when `variance_steps` asks for it."""
    if not run.args.variance_steps:
        return None
    images = probe_images(run.raw, run.args.variance_probe_size, run.config.num_channels, run.data_args.image_column)
    # The host's views: the monitor measures their spread, the same with the colour steps on the device.
    return VarianceMonitor.from_view_transform(images, MultiViewTransform.from_config(run.config))


def _measurements(run: _Run, metrics: MetricsLogger, variance: VarianceMonitor | None,
                  knn: OnlineKNN | None) -> list[_AfterStep]:
    """The measurements asked for, as after-step actions logging to ``metrics``."""
    args, last_step, measurements = run.args, run.schedule.total_steps, []
    if args.variance_steps:
        measurements.append(_MeasureVariance(variance, run.unwrapped, metrics, args.variance_steps, last_step))
    if args.eval_steps:  # on every process: the others wait for the main one's measurement
        measurements.append(_MeasureOnlineKNN(knn, run.unwrapped, metrics, run.accelerator, args.eval_steps,
                                              last_step))
    return measurements


def _finish(run: _Run, step: int, loss: float, metrics: MetricsLogger, resumed_from: str | None) -> TrainResult:
    """Save the model with its processor, run record and card (and timm export); push it if asked."""
    accelerator, args, output_dir = run.accelerator, run.args, run.output_dir
    total_skipped = sum_over_processes(accelerator, run.data.skipped_images)
    state_dict = float32_state_dict(accelerator, run.model, run.unwrapped)
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        run.unwrapped.save_pretrained(output_dir, state_dict=state_dict)
        save_image_processor(run.config, output_dir)
        record = _training_run(run, step, total_skipped, metrics.elapsed, resumed_from)
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            record["deepspeed"] = deepspeed_settings(run.model)
        (output_dir / TRAINING_RUN).write_text(json.dumps(record, indent=2))
        write_model_card(output_dir, model_id=_hub_model_id(args, output_dir) if args.push_to_hub else None)
        if args.export_timm:
            export_timm(run.unwrapped, args.export_timm)
    accelerator.wait_for_everyone()  # no process tears the group down while the main one still saves
    accelerator.end_training()  # also ends the process group: no collective after this
    if total_skipped:
        logger.warning("Skipped %d undecodable images.", total_skipped)
    if args.push_to_hub and accelerator.is_main_process:
        push_model(output_dir, _hub_model_id(args, output_dir), step=step, token=args.hub_token,
                   private=args.hub_private)
    return TrainResult(str(output_dir), step, loss, total_skipped, metrics.elapsed)


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


def _run_settings(schedule: _Schedule) -> dict:
    """What a checkpoint records so that a resume can check it continues the same run (run_folder.RUN_SETTINGS)."""
    return {"total_steps": schedule.total_steps, "learning_rate": schedule.learning_rate,
            "global_batch": schedule.global_batch}


def _training_run(run: _Run, steps: int, skipped_images: int, train_seconds: float,
                  resumed_from: str | None) -> dict:
    """What the run did and read, for the model card: written once, at the end, by the main process."""
    args, accelerator, schedule = run.args, run.accelerator, run.schedule
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
        "mixed_precision": accelerator.mixed_precision, "seed": args.seed, "hardware": hardware,
        "train_seconds": train_seconds, "data": run.source, "model_name_or_path": args.model_name_or_path,
        "resumed_from": resumed_from, "skipped_images": skipped_images, "hub_model_id": args.hub_model_id,
    }


def _hub_model_id(args: PretrainingArguments, output_dir: Path) -> str:
    return args.hub_model_id or output_dir.resolve().name


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
