"""How to pretrain: the arguments of ``run_pretraining.py`` and :func:`hf_siamese.training.train`."""

from dataclasses import dataclass, field


@dataclass
class PretrainingArguments:
    """How to train; names follow transformers' ``TrainingArguments`` where it has one."""

    output_dir: str = field(default="outputs/pretraining", metadata={"help": "Checkpoints, metrics and the final model."})
    overwrite_output_dir: bool = field(
        default=False, metadata={"help": "Delete an earlier run in `output_dir` (and its `logging_dir`) first; "
                                         "without it, a folder holding a run is refused unless resuming."}
    )
    logging_dir: str | None = field(
        default=None, metadata={"help": "Tracker (TensorBoard) logs; default: `<output_dir>-logs`, beside the "
                                        "model folder so that they are not pushed with it."}
    )
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
    augment_on_device: bool = field(
        default=False,
        metadata={"help": "Colour jitter, grayscale, blur, solarize and normalisation of the views in batch on the "
                          "accelerator (the CPU without one): the DataLoader workers only decode, crop and flip to "
                          "uint8 and draw each view's parameters. The views are the host's, bit for bit."},
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

    @property
    def tracker_dir(self) -> str:
        """Where the trackers write: ``logging_dir``, else beside ``output_dir``."""
        return self.logging_dir or f"{self.output_dir.rstrip('/')}-logs"
