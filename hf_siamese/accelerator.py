"""Accelerate and DeepSpeed around the model: the ``Accelerator`` a run asks for, the checks a model must pass
under DeepSpeed, its preparation, and its weights back in fp32."""

import logging
import os
from datetime import timedelta
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import (
    DeepSpeedPlugin, DistributedType, GradientAccumulationPlugin, InitProcessGroupKwargs, TorchDynamoPlugin,
)

from .configuration_siamese import SiameseConfig
from .modeling_siamese import SiameseForPreTraining
from .starting_model import load_starting_model
from .training_args import PretrainingArguments

logger = logging.getLogger(__name__)


def native_mixed_precision() -> str:
    """"bf16" where it is computed natively (a GPU, or a CPU with AVX-512 BF16 or AMX), else "no": emulated bf16 is
    slower than fp32."""
    native = (torch.cuda.is_available() or torch.cpu._is_avx512_bf16_supported()
              or torch.cpu._is_amx_tile_supported())
    return "bf16" if native else "no"


def launched_with_deepspeed() -> bool:
    """Whether ``accelerate launch`` was given a DeepSpeed config (it tells its processes through the environment)."""
    return os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true"


def make_accelerator(args: PretrainingArguments, logging_dir: str | Path) -> Accelerator:
    """The run's ``Accelerator``: CPU, GPU, DDP or DeepSpeed from the launcher, precision and trackers from ``args``."""
    deepspeed = launched_with_deepspeed()
    # DeepSpeed on CPU: accelerate leaves the backend unset and sees one process unless told gloo.
    backend = "gloo" if deepspeed and not torch.cuda.is_available() else None
    handlers = [InitProcessGroupKwargs(backend=backend, timeout=timedelta(seconds=args.ddp_timeout))]
    if args.deterministic:
        # cuBLAS reads it when CUDA starts; without it, deterministic mode raises at the first CUDA matmul.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    # Without --torch_compile, accelerate's own default (and `accelerate launch --dynamo_backend`) applies.
    dynamo = TorchDynamoPlugin(backend="inductor", mode=args.torch_compile_mode) if args.torch_compile else None
    accelerator = Accelerator(
        dynamo_plugin=dynamo,
        # Without a GPU, `cpu=True` turns a multi-process launch into MULTI_CPU over gloo (else every process
        # believes it is alone and the main one).
        cpu=not torch.cuda.is_available() and not deepspeed,
        mixed_precision=args.mixed_precision,
        # A plugin, not `gradient_accumulation_steps=`: accelerate would let a launcher's value override the run's.
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=args.gradient_accumulation_steps),
        deepspeed_plugin=_deepspeed_plugin(args) if deepspeed else None,
        log_with=_trackers(args.report_to),
        project_dir=str(logging_dir),
        kwargs_handlers=handlers,
    )
    _warn_if_bf16_is_emulated(accelerator)
    return accelerator


def _warn_if_bf16_is_emulated(accelerator: Accelerator) -> None:
    """A recipe written for a bf16 CPU still runs elsewhere, but slower than fp32: say so and how to fix it."""
    if (accelerator.mixed_precision == "bf16" and accelerator.device.type == "cpu"
            and native_mixed_precision() == "no"):
        logger.warning("mixed_precision is bf16, but this CPU has no native bf16 (AVX-512 BF16 or AMX): emulated "
                       "bf16 is slower than fp32. Pass --mixed_precision no to train in fp32.")


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


def _deepspeed_plugin(args: PretrainingArguments) -> DeepSpeedPlugin:
    """The launcher's DeepSpeed settings, with this run's gradient accumulation and clipping.

    A launcher config (``gradient_accumulation_steps`` / ``gradient_clipping`` in its ``deepspeed_config``) would
    otherwise win over the run's arguments, while the learning-rate scaling and epoch length follow the arguments;
    and DeepSpeed clips at 1.0 unless told otherwise. A DeepSpeed JSON config's own values are checked after
    ``prepare`` (see ``prepare``).
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


def build_model(config: SiameseConfig, args: PretrainingArguments, accelerator: Accelerator) -> SiameseForPreTraining:
    """The model to train (new or from ``model_name_or_path``), refused where DeepSpeed cannot train it as asked."""
    if args.model_name_or_path:
        model = load_starting_model(args.model_name_or_path, config)
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
        model = model.convert_sync_batchnorm()
    # DDP would broadcast every MoCo queue from rank 0 at each forward; they are identical by construction.
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(
        model, model.queue_buffer_names())
    return model


def prepare(accelerator: Accelerator, model: SiameseForPreTraining, optimizer, args: PretrainingArguments):
    """``accelerator.prepare`` for the model and optimizer, with what DeepSpeed needs around it."""
    if accelerator.distributed_type != DistributedType.DEEPSPEED:
        return accelerator.prepare(model, optimizer)
    # accelerate reads the micro-batch from a prepared DataLoader; ours is not prepared (it shards itself).
    accelerator.state.deepspeed_plugin.deepspeed_config["train_micro_batch_size_per_gpu"] = (
        args.per_device_train_batch_size
    )
    engine, optimizer = accelerator.prepare(model, optimizer)
    settings = deepspeed_settings(engine)
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


def deepspeed_settings(engine) -> dict:
    """What the DeepSpeed engine actually uses (for the run's record and the checks against the arguments)."""
    return {"zero_stage": engine.zero_optimization_stage(),
            "gradient_accumulation_steps": engine.gradient_accumulation_steps(),
            "gradient_clipping": engine.gradient_clipping(), "bf16": engine.bfloat16_enabled(),
            "fp16": engine.fp16_enabled(), "train_batch_size": engine.train_batch_size()}


def float32_state_dict(accelerator: Accelerator, model, unwrapped: SiameseForPreTraining) -> dict:
    """The whole model's weights, 16-bit floating tensors (a DeepSpeed bf16/fp16 source) as fp32, the dtype its
    config declares. Collective under DeepSpeed: ZeRO-3 gathers every process's partitions (for the main one)."""
    if accelerator.distributed_type == DistributedType.DEEPSPEED:
        state_dict = accelerator.get_state_dict(model) or {}
    else:
        state_dict = unwrapped.state_dict()
    return {name: tensor.float() if tensor.is_floating_point() else tensor for name, tensor in state_dict.items()}


def sum_over_processes(accelerator: Accelerator, value: int) -> int:
    return int(accelerator.reduce(torch.tensor(value, device=accelerator.device), reduction="sum"))
