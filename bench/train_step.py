"""Images per second, memory and GFLOP/s of a full pretraining step: hf_siamese against lightly and plain PyTorch.

A step is what ``run_pretraining.py`` does per batch: every view through the source and the target branch, the
loss, backward, the optimizer step and the EMA update of the target. Three implementations of the same model math
run in the same process, on the same views, from the same weights:

- ``ours``: ``SiameseForPreTraining`` prepared by Accelerate, stepped by ``hf_siamese.training.training_step`` and
  ``ema_step`` with the library's optimizer and schedule, exactly as the training loop does;
- ``lightly``: the same timm backbone with lightly's parts (``ProjectionHead`` built to the same layout,
  ``NegativeCosineSimilarity``, ``NTXentLoss`` with its memory bank for MoCo, ``update_momentum``) in the loop of
  lightly's examples: the peer a user would pick instead. lightly has no MoCo v3 loss (its heads, the paper's
  loss) and no ladder; MoCo with MultiCrop has no lightly form (each ``NTXentLoss`` call enqueues), so is left out;
- ``plain``: torch and timm only: ``nn.Sequential`` heads, the losses written out, ``torch._foreach_lerp_``;
  one forward per view, as the references and lightly's examples loop;
- ``plain_concat``: the same, with all views of one size concatenated into one forward: the fastest plain loop a
  user could write, whose BatchNorm mixes the views' statistics (so its loss differs; it is a speed floor only).

Before timing, one step of each per-view implementation from the same weights must give the same loss
(``loss_match``, relative 1e-4), so they really compute the same thing. Then each repeat times one step of every implementation in turn
(order rotated), after ``--warmup`` untimed ones. Reported: median images per second, and the ratios
``ours / lightly``, ``ours / plain`` and ``ours / plain_concat`` (above 1: ours is faster) taken per repeat, then the median, with
``ratio_best_*`` for the fastest of ours' variants. Memory, from an extra untimed step: on CPU the activations
autograd saves for backward and the state (weights, buffers, optimizer), on CUDA the allocator's peak. GFLOP/s is
the step's FLOP count (torch's ``FlopCounterMode``, forward and backward) over its median time, beside the
machine's dense fp32 matmul rate.

Extra ``ours`` variants with ``--variants channels_last,bf16,compile,separate_views``: the library's
``channels_last`` option, ``mixed_precision="bf16"``, ``torch_compile`` (compilation happens in the warm-up
steps) and ``batch_views=False`` (one forward per view); ``ratio_ours_variants`` holds ours over each.

    pip install -e ".[bench]"   # lightly
    python bench/train_step.py [--cases byol/r18_32/base,...] [--repeats 7] [--warmup 2] [--variants channels_last,bf16]
    python bench/train_step.py --report bench/results/train_step.jsonl     # the table in docs/benchmarks.md
"""

import argparse
import contextlib
import copy
import datetime
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

import timm
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from hf_siamese import SiameseConfig, SiameseForPreTraining
from hf_siamese.frameworks import get_framework
from hf_siamese.heads import HeadBlock, mlp_blocks
from hf_siamese.optim import build_optimizer, build_scheduler
from hf_siamese.training import ema_step, training_step, views_to_device

FRAMEWORKS = ("byol", "simsiam", "mocov3", "moco")
SCALES = {  # the two sizes: ResNet-18 at 32 px (batch 128) and ResNet-50 at 64 px (batch 32)
    "r18_32": {"backbone": "resnet18", "image_size": 32, "batch": 128, "local_size": 16},
    "r50_64": {"backbone": "resnet50", "image_size": 64, "batch": 32, "local_size": 32},
}
VARIANTS = ("base", "multicrop", "ladder")
LEARNING_RATE, WEIGHT_DECAY, SGD_MOMENTUM = 0.05, 1e-4, 0.9
NUM_LOCAL = 6


@dataclass(frozen=True)
class Case:
    framework: str
    scale: str
    variant: str

    @property
    def name(self) -> str:
        return f"{self.framework}/{self.scale}/{self.variant}"

    def config(self) -> SiameseConfig:
        scale = SCALES[self.scale]
        designs = {}
        if self.variant == "multicrop":
            designs = {"multicrop": True, "multicrop_num_local": NUM_LOCAL, "multicrop_local_size": scale["local_size"]}
        if self.variant == "ladder":
            designs = {"ladder_levels": [1, 2, 3, 4]}
        return SiameseConfig(backbone=scale["backbone"], image_size=scale["image_size"], framework=self.framework,
                             **designs)


def all_cases() -> list[Case]:
    return [Case(f, s, v) for s in SCALES for f in FRAMEWORKS for v in VARIANTS]


def make_views(config: SiameseConfig, batch: int, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """Random views shaped like ``collate_views``' batch: symmetric frameworks give their global views to both
    branches (no target list), MoCo's target view is its own; local crops go to the source only."""
    generator = torch.Generator().manual_seed(seed)
    size, channels = config.image_size, config.num_channels

    def view(side: int) -> torch.Tensor:
        return torch.randn(batch, channels, side, side, generator=generator)

    globals_ = [view(size) for _ in range(config.num_target_groups)]
    locals_ = [view(config.multicrop_local_size) for _ in range(config.multicrop_num_local)] if config.multicrop else []
    views = {"source_pixel_values": [*globals_, *locals_]}
    if not config.symmetric_loss:
        views["target_pixel_values"] = [view(size)]
    return views


# ----------------------------------------------------------------------------------------------------------------
# ours


class OursStep:
    """The training loop's own step: Accelerate, ``training_step``, the schedule and ``ema_step``."""

    def __init__(self, config: SiameseConfig, accelerator, channels_last: bool = False, total_steps: int = 1000):
        model = SiameseForPreTraining(config).to(accelerator.device)
        self.channels_last = channels_last
        if channels_last:  # what `train` does with PretrainingArguments.channels_last
            model = model.to(memory_format=torch.channels_last)
        optimizer = build_optimizer(model, "sgd", LEARNING_RATE, WEIGHT_DECAY, momentum=SGD_MOMENTUM)
        self.scheduler = build_scheduler(optimizer, "cosine", total_steps, 0)
        self.model, self.optimizer = accelerator.prepare(model, optimizer)
        self.unwrapped: SiameseForPreTraining = accelerator.unwrap_model(self.model, keep_torch_compile=False)
        self.accelerator = accelerator
        self.total_steps, self.steps = total_steps, 0

    def state_tensors(self) -> list[torch.Tensor]:
        return [*self.unwrapped.parameters(), *self.unwrapped.buffers(), *_optimizer_tensors(self.optimizer)]

    def __call__(self, views: dict) -> torch.Tensor:
        views = views_to_device(views, self.accelerator.device, self.channels_last)
        output = training_step(self.accelerator, self.model, self.optimizer, views)
        self.scheduler.step()
        self.steps += 1
        ema_step(self.unwrapped, self.steps / self.total_steps)
        return output.loss.detach()


# ----------------------------------------------------------------------------------------------------------------
# the reference loop, with plain or lightly parts


@dataclass
class Parts:
    """What differs between the plain loop and the lightly one: heads, the per-pair loss and the EMA."""

    name: str
    head: Callable[[list[HeadBlock]], nn.Module]
    loss: Callable[[SiameseConfig, int], Callable]  # (config, projector_dim) -> pair loss with its own queue
    ema: Callable[[nn.Module, nn.Module, float], None]


def plain_head(blocks: list[HeadBlock]) -> nn.Module:
    layers = []
    for b in blocks:
        layers.append(nn.Linear(b.in_dim, b.out_dim, bias=b.bias))
        if b.batch_norm:
            layers.append(nn.BatchNorm1d(b.out_dim, affine=b.batch_norm_affine))
        if b.relu:
            layers.append(nn.ReLU(inplace=True))
    return nn.Sequential(*layers)


class PlainQueueLoss(nn.Module):
    """MoCo's InfoNCE against a FIFO queue. The keys are enqueued after backward (``enqueue_pending``), which
    needs no copy of the queue: the cheapest correct form, as a floor should be."""

    def __init__(self, temperature: float, size: int, dim: int):
        super().__init__()
        self.temperature = temperature
        self.register_buffer("queue", F.normalize(torch.randn(size, dim), dim=1))
        self.pointer = 0
        self.pending: list[torch.Tensor] = []

    def forward(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        query, key = F.normalize(prediction, dim=1), F.normalize(target, dim=1)
        logits = torch.cat([(query * key).sum(1, keepdim=True), query @ self.queue.T], dim=1) / self.temperature
        self.pending.append(key.detach())
        return F.cross_entropy(logits, torch.zeros(len(query), dtype=torch.long, device=query.device))

    @torch.no_grad()
    def enqueue_pending(self) -> None:
        for key in self.pending:
            self.queue[self.pointer : self.pointer + len(key)] = key
            self.pointer = (self.pointer + len(key)) % len(self.queue)
        self.pending.clear()

    def set_negatives(self, queue: torch.Tensor) -> None:
        self.queue.copy_(queue)


def batch_contrastive(temperature: float) -> Callable:
    """MoCo v3's loss (Chen et al. 2021, Alg. 1), single process."""

    def loss(prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        query, key = F.normalize(prediction, dim=1), F.normalize(target, dim=1)
        labels = torch.arange(len(query), device=query.device)
        return F.cross_entropy(query @ key.T / temperature, labels) * (2 * temperature)

    return loss


def plain_loss(config: SiameseConfig, dim: int) -> Callable:
    if config.framework == "moco":
        return PlainQueueLoss(config.temperature, config.queue_size, dim)
    if config.framework == "mocov3":
        return batch_contrastive(config.temperature)
    if config.framework == "byol":
        return lambda p, z: (2 - 2 * F.cosine_similarity(p, z, dim=1)).mean()
    return lambda p, z: -F.cosine_similarity(p, z, dim=1).mean()


def plain_ema(target: nn.Module, source: nn.Module, momentum: float) -> None:
    with torch.no_grad():
        torch._foreach_lerp_(list(target.parameters()), list(source.parameters()), 1.0 - momentum)


def plain_parts() -> Parts:
    return Parts("plain", plain_head, plain_loss, plain_ema)


def lightly_parts() -> Parts:
    from lightly.loss import NegativeCosineSimilarity, NTXentLoss
    from lightly.models.modules.heads import ProjectionHead
    from lightly.models.utils import update_momentum

    def head(blocks: list[HeadBlock]) -> nn.Module:
        return ProjectionHead([
            (b.in_dim, b.out_dim, nn.BatchNorm1d(b.out_dim, affine=b.batch_norm_affine) if b.batch_norm else None,
             nn.ReLU(inplace=True) if b.relu else None, b.bias)
            for b in blocks
        ])

    def loss(config: SiameseConfig, dim: int) -> Callable:
        if config.framework == "moco":
            criterion = NTXentLoss(temperature=config.temperature, memory_bank_size=(config.queue_size, dim))
            criterion.set_negatives = lambda queue: criterion.memory_bank.bank.copy_(queue)
            return criterion
        if config.framework == "mocov3":  # lightly has no MoCo v3 loss
            return batch_contrastive(config.temperature)
        cosine = NegativeCosineSimilarity()
        if config.framework == "byol":  # 2 - 2 cos, as lightly's BYOL benchmark writes it (2 * crit, plus 2)
            return lambda p, z: 2 + 2 * cosine(p, z)
        return cosine

    return Parts("lightly", head, loss, update_momentum)


class ReferenceStep(nn.Module):
    """The model math of ``SiameseForPreTraining`` written as a user of timm and a parts library would.

    Per level (the last stage, or every ladder level): projector and predictor on the source, an EMA copy of the
    projector on the target. Each view in its own pass, or with ``concat_views`` the views of one size in one;
    SimSiam reuses the source's projections under stop-gradient as its targets.
    """

    def __init__(self, config: SiameseConfig, parts: Parts, device: torch.device, concat_views: bool = False):
        super().__init__()
        self.config, self.parts, self.concat_views = config, parts, concat_views
        self.backbone = timm.create_model(config.backbone, num_classes=0, in_chans=config.num_channels)
        stages = [i for i, info in enumerate(self.backbone.feature_info) if not info["module"].startswith(("act1", "conv1", "bn1"))]
        self.levels = list(config.ladder_levels or [len(stages)])
        self.stage_indices = stages
        widths = {level: self.backbone.feature_info[stages[level - 1]]["num_chs"] for level in self.levels}
        framework = get_framework(config.framework)
        self.projectors = nn.ModuleDict({str(level): parts.head(mlp_blocks(
            [widths[level]] + [config.projector_hidden_dim] * (config.projector_num_layers - 1) + [config.projector_dim],
            framework.projector)) for level in self.levels})
        self.predictors = nn.ModuleDict({str(level): parts.head(mlp_blocks(
            [config.projector_dim] + [config.predictor_hidden_dim] * (config.predictor_num_layers - 1)
            + [config.projector_dim], framework.predictor)) for level in self.levels} if config.predictor_num_layers
            else {})
        self.losses = [parts.loss(config, config.projector_dim) for _ in self.levels]
        self.momentum_target = config.uses_momentum_target
        if self.momentum_target:
            self.target_backbone = copy.deepcopy(self.backbone).requires_grad_(False)
            self.target_projectors = copy.deepcopy(self.projectors).requires_grad_(False)
        self.to(device)
        for loss in self.losses:
            if isinstance(loss, nn.Module):
                loss.to(device)  # lightly's bank lives on the CPU until moved (its examples forget this)
        online = [*self.backbone.parameters(), *self.projectors.parameters(), *self.predictors.parameters()]
        self.optimizer = torch.optim.SGD(online, lr=LEARNING_RATE, momentum=SGD_MOMENTUM, weight_decay=WEIGHT_DECAY)
        self.momentum = config.momentum or 0.0

    def features(self, backbone: nn.Module, pixels: torch.Tensor) -> dict[int, torch.Tensor]:
        if len(self.levels) == 1:
            return {self.levels[0]: backbone(pixels)}
        final, stages = backbone.forward_intermediates(pixels, indices=self.stage_indices, output_fmt="NCHW")
        pooled = {level: stages[level - 1].mean(dim=(2, 3)) for level in self.levels[:-1]}
        pooled[self.levels[-1]] = backbone.forward_head(final, pre_logits=True)
        return pooled

    def passes(self, views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
        if not self.concat_views:
            return [[view] for view in views]
        passes = []
        for view in views:
            if passes and passes[-1][-1].shape == view.shape:
                passes[-1].append(view)
            else:
                passes.append([view])
        return passes

    def source(self, views: list[torch.Tensor], num_global: int) -> dict[int, tuple[list, list]]:
        out = {level: ([], []) for level in self.levels}
        for group in self.passes(views):
            for level, feature in self.features(self.backbone, torch.cat(group)).items():
                z = self.projectors[str(level)](feature)
                p = self.predictors[str(level)](z) if self.predictors else z
                out[level][0].extend(z.chunk(len(group)))
                out[level][1].extend(p.chunk(len(group)))
        return out

    def targets(self, views: list[torch.Tensor], source: dict) -> dict[int, list[torch.Tensor]]:
        if not self.momentum_target:  # SimSiam
            return {level: [z.detach() for z in source[level][0][: len(views)]] for level in self.levels}
        out = {level: [] for level in self.levels}
        with torch.no_grad():
            for group in self.passes(views):
                for level, feature in self.features(self.target_backbone, torch.cat(group)).items():
                    out[level].extend(self.target_projectors[str(level)](feature).chunk(len(group)))
        return out

    def loss(self, views: dict) -> torch.Tensor:
        groups = self.config.num_target_groups
        source = self.source(views["source_pixel_values"], groups)
        targets = self.targets(views.get("target_pixel_values", views["source_pixel_values"][:groups]), source)
        reduce = torch.mean if self.config.framework == "simsiam" else torch.sum
        total = 0.0
        for level, loss in zip(self.levels, self.losses):
            predictions = source[level][1]
            global_terms, local_terms = [], []
            for d in range(groups):
                target = targets[level][groups - 1 - d]
                global_terms.append(loss(predictions[d], target))
                if len(predictions) > groups:
                    local_terms.append(torch.stack([loss(p, target) for p in predictions[groups:]]).mean())
            total = total + reduce(torch.stack(global_terms))
            if local_terms:
                total = total + reduce(torch.stack(local_terms))
        return total

    def forward(self, views: dict) -> torch.Tensor:
        loss = self.loss(views)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        for criterion in self.losses:
            if isinstance(criterion, PlainQueueLoss):
                criterion.enqueue_pending()
        if self.momentum_target:
            self.parts.ema(self.target_backbone, self.backbone, self.momentum)
            self.parts.ema(self.target_projectors, self.projectors, self.momentum)
        return loss.detach()

    def state_tensors(self) -> list[torch.Tensor]:
        queues = [b for loss in self.losses if isinstance(loss, nn.Module) for b in loss.buffers()]
        return [*self.parameters(), *self.buffers(), *queues, *_optimizer_tensors(self.optimizer)]

    @torch.no_grad()
    def copy_from(self, ours: SiameseForPreTraining) -> None:
        """Take ``ours``' weights (and queue): the same starting point, so the first losses must agree."""
        pairs = [(self.backbone, ours.siamese.backbone)]
        for level in self.levels:
            heads = ours.level_heads(level)
            pairs.append((self.projectors[str(level)], heads.projector))
            if self.predictors:
                pairs.append((self.predictors[str(level)], heads.predictor))
            if self.momentum_target:
                pairs.append((self.target_projectors[str(level)], heads.target_projector))
        if self.momentum_target:
            pairs.append((self.target_backbone, ours.target_encoder.backbone))
        for mine, theirs in pairs:
            for a, b in zip(mine.state_dict().values(), theirs.state_dict().values(), strict=True):
                a.copy_(b)
        if self.config.queue_size:
            for level, loss in zip(self.levels, self.losses):
                loss.set_negatives(ours.level_heads(level).queue)


# ----------------------------------------------------------------------------------------------------------------
# measuring


def memory_mb(step: Callable, views: dict, device: torch.device) -> dict[str, float]:
    """Memory of one step. On CUDA: the allocator's peak above what was allocated before. On CPU, where torch keeps
    no allocator statistics: the tensors autograd saves for backward (the activations, parameters excluded) and the
    state (parameters, buffers, optimizer state), each storage counted once."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(views)
        torch.cuda.synchronize()
        return {"peak": round((torch.cuda.max_memory_allocated() - base) / 2**20, 1)}
    state = _storages(step.state_tensors())
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in state:
            saved[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        step(views)
    state = _storages(step.state_tensors())  # optimizer state exists after the first step
    return {"activations": round(sum(saved.values()) / 2**20, 1), "state": round(sum(state.values()) / 2**20, 1)}


def _storages(tensors) -> dict[int, int]:
    return {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> list[torch.Tensor]:
    return [v for state in optimizer.state.values() for v in state.values() if torch.is_tensor(v)]


def step_flops(step: Callable, views: dict) -> int:
    with FlopCounterMode(display=False) as counter:
        step(views)
    return counter.get_total_flops()


def matmul_gflops(device: torch.device, dtype: torch.dtype = torch.float32, n: int = 2048, seconds: float = 1.0) -> float:
    """The machine's dense matmul rate: the physical ceiling of a convolution network's step."""
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    runs, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        a @ b
        runs += 1
    if device.type == "cuda":
        torch.cuda.synchronize()
    return 2 * n**3 * runs / (time.perf_counter() - start) / 1e9


def interleaved_times(steps: dict, views: dict, device, warmup: int, repeats: int) -> dict[str, list[float]]:
    """Seconds per step of each of ``steps``, the order rotated each repeat so that no step always runs first."""
    times: dict[str, list[float]] = {name: [] for name in steps}
    names = list(steps)
    for repeat in range(warmup + repeats):
        for name in names[repeat % len(names):] + names[: repeat % len(names)]:
            seconds = timed(steps[name], views, device)
            if repeat >= warmup:
                times[name].append(seconds)
    return times


def timed(step: Callable, views: dict, device: torch.device) -> float:
    start = time.perf_counter()
    loss = step(views)
    if device.type == "cuda":
        torch.cuda.synchronize()
    else:
        loss.item()  # CPU ops are synchronous; this only reads the result
    return time.perf_counter() - start


def new_accelerator(mixed_precision: str = "no", compile: bool = False):
    """A fresh Accelerator: accelerate keeps one state per process, so a variant with another precision resets it.
    ``compile``: what ``--torch_compile`` gives (``hf_siamese.accelerator.make_accelerator``)."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState
    from accelerate.utils import TorchDynamoPlugin

    AcceleratorState._reset_state(reset_partial_state=True)
    dynamo = TorchDynamoPlugin(backend="inductor") if compile else None
    return Accelerator(cpu=not torch.cuda.is_available(), mixed_precision=mixed_precision, dynamo_plugin=dynamo)


def run_case(case: Case, repeats: int, warmup: int, variants: tuple[str, ...] = (), with_lightly: bool = True,
             seed: int = 0, batch: int | None = None) -> dict:
    """Build the implementations of ``case`` from one set of weights, check their losses agree, and time them.

    ``batch`` overrides the scale's batch size (the tests use a small one)."""
    config = case.config()
    torch.manual_seed(seed)
    accelerator = new_accelerator()
    device = accelerator.device
    batch = batch or SCALES[case.scale]["batch"]
    views = {key: [v.to(device) for v in value] for key, value in make_views(config, batch, seed).items()}
    steps: dict[str, Callable] = {"ours": OursStep(config, accelerator)}
    reference = copy.deepcopy(steps["ours"].unwrapped.state_dict()) if variants else None  # their starting point
    parts = [plain_parts()]
    lightly_reason = lightly_unsupported(case) if with_lightly else "not requested"
    if lightly_reason is None:
        parts.append(lightly_parts())
    for part in parts:
        step = ReferenceStep(config, part, device)
        step.copy_from(steps["ours"].unwrapped)
        steps[part.name] = step
    steps["plain_concat"] = ReferenceStep(config, plain_parts(), device, concat_views=True)
    steps["plain_concat"].copy_from(steps["ours"].unwrapped)

    first = {name: float(step(views)) for name, step in steps.items()}
    per_view = [value for name, value in first.items() if name != "plain_concat"]
    match = all(abs(v - first["ours"]) <= 1e-4 * max(1.0, abs(first["ours"])) for v in per_view)

    for variant in variants:  # after the check: these change the numerics (bf16) or only the layout
        if variant == "bf16":
            steps["ours+bf16"] = OursStep(config, new_accelerator("bf16"))
        elif variant == "channels_last":
            steps["ours+channels_last"] = OursStep(config, accelerator, channels_last=True)
        elif variant == "compile":  # the warm-up steps compile
            steps["ours+compile"] = OursStep(config, new_accelerator(compile=True))
        elif variant == "separate_views":  # batch_views off: one forward per view, as the references loop
            separate = copy.deepcopy(config)
            separate.batch_views = False
            steps["ours+separate_views"] = OursStep(separate, accelerator)
        else:
            raise ValueError(f"Unknown variant {variant!r}: choose from channels_last, bf16, compile, separate_views.")
        steps[f"ours+{variant}"].unwrapped.load_state_dict(reference)

    flops = step_flops(steps["plain"], views)
    memory = {name: memory_mb(step, views, device) for name, step in steps.items()}
    times = interleaved_times(steps, views, device, warmup, repeats)
    median = {name: statistics.median(values) for name, values in times.items()}
    images_per_s = {name: round(batch / seconds, 2) for name, seconds in median.items()}
    record = {
        "bench": "train_step", "case": case.name, "framework": case.framework, "scale": case.scale,
        "variant": case.variant, "backbone": config.backbone, "image_size": config.image_size, "batch": batch,
        "views": len(views["source_pixel_values"]), "loss_match": match, "first_loss": first,
        "images_per_s": images_per_s, "median_step_s": {k: round(v, 4) for k, v in median.items()},
        "ratio_ours_plain": paired_ratio(times, "plain"),
        "ratio_ours_plain_concat": paired_ratio(times, "plain_concat"),
        "ratio_ours_lightly": paired_ratio(times, "lightly") if "lightly" in steps else None,
        "ratio_ours_separate_views": (paired_ratio(times, "ours+separate_views")
                                      if "ours+separate_views" in steps else None),
        "ratio_ours_variants": {variant: paired_ratio(times, f"ours+{variant}") for variant in variants},
        "ratio_best_ours_plain": paired_ratio(times, "plain", best_ours=True),
        "ratio_best_ours_plain_concat": paired_ratio(times, "plain_concat", best_ours=True),
        "ratio_best_ours_lightly": paired_ratio(times, "lightly", best_ours=True) if "lightly" in steps else None,
        "lightly_left_out": lightly_reason, "memory_mb": memory, "step_gflop": round(flops / 1e9, 2),
        "gflops_per_s": {name: round(flops / seconds / 1e9, 1) for name, seconds in median.items()},
        "repeats": repeats, "warmup": warmup,
    }
    return record


def paired_ratio(times: dict[str, list[float]], other: str, best_ours: bool = False) -> float:
    """Median over repeats of ``other``'s step time over ours in the same repeat (above 1: ours is faster).

    Pairing within a repeat cancels the machine's drift between repeats. ``best_ours``: the fastest of ours'
    variants in each repeat (channels_last, bf16), i.e. what the library offers beyond the default."""
    ours = [name for name in times if name == "ours" or (best_ours and name.startswith("ours+"))]
    per_repeat = [min(times[name][r] for name in ours) for r in range(len(times["ours"]))]
    return round(statistics.median(t / o for t, o in zip(times[other], per_repeat)), 3)


def lightly_unsupported(case: Case) -> str | None:
    """Why lightly has no form of ``case``, or ``None``."""
    try:
        import lightly  # noqa: F401
    except ImportError:
        return "lightly not installed (pip install -e '.[bench]')"
    if case.variant == "ladder":
        return "lightly has no ladder"
    if case.framework == "moco" and case.variant == "multicrop":
        return "lightly's NTXentLoss enqueues at every call: no MoCo MultiCrop"
    return None


def machine() -> dict:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    info = {"machine": f"{platform.machine()}, {os.cpu_count()} threads", "device": device,
            "torch": torch.__version__, "threads": torch.get_num_threads(),
            "date": datetime.date.today().isoformat()}
    info["matmul_fp32_gflops"] = round(matmul_gflops(torch.device(device)), 1)
    info["matmul_bf16_gflops"] = round(matmul_gflops(torch.device(device), torch.bfloat16), 1)
    return info


def report(path: str) -> str:
    """The docs/benchmarks.md table of a results file: one row per case."""
    lines = [json.loads(line) for line in open(path) if line.startswith("{")]
    ceiling = next(line for line in lines if line.get("ceiling"))
    rows = [
        "| case | ours img/s | lightly | plain | plain concat | ours / lightly | ours / plain | ours / plain concat "
        "| channels_last | bf16 | best / lightly | best / plain | ours GFLOP/s | activations MB (ours, plain) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]

    def cell(value, digits=1):
        return "-" if value is None else f"{value:.{digits}f}"

    for r in (line for line in lines if "case" in line):
        speed, memory = r["images_per_s"], r["memory_mb"]
        rows.append(" | ".join([
            f"| {r['case']}", cell(speed["ours"]), cell(speed.get("lightly")), cell(speed["plain"]),
            cell(speed.get("plain_concat")), cell(r["ratio_ours_lightly"], 3), cell(r["ratio_ours_plain"], 3),
            cell(r.get("ratio_ours_plain_concat"), 3),
            cell(speed.get("ours+channels_last")), cell(speed.get("ours+bf16")),
            cell(r["ratio_best_ours_lightly"], 3), cell(r["ratio_best_ours_plain"], 3),
            cell(r["gflops_per_s"]["ours"]),
            f"{cell(memory['ours'].get('activations'))}, {cell(memory['plain'].get('activations'))} |",
        ]))
    header = (f"Ceiling: dense matmul {ceiling['matmul_fp32_gflops']} GFLOP/s fp32, {ceiling['matmul_bf16_gflops']} "
              f"bf16 ({ceiling['machine']}, {ceiling['device']}, torch {ceiling['torch']}, {ceiling['date']}).")
    return header + "\n\n" + "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--report", metavar="JSONL", help="Print the docs/benchmarks.md table of a results file and exit.")
    parser.add_argument("--cases", default="all", help="Comma-separated framework/scale/variant names, or 'all'.")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--variants", default="", help="Extra ours variants: channels_last, bf16, compile.")
    parser.add_argument("--no_lightly", action="store_true")
    args = parser.parse_args()
    if args.report:
        print(report(args.report))
        return
    cases = all_cases()
    if args.cases != "all":
        wanted = args.cases.split(",")
        unknown = set(wanted) - {c.name for c in cases}
        if unknown:
            raise SystemExit(f"Unknown cases {sorted(unknown)}; e.g. {cases[0].name}")
        cases = [c for c in cases if c.name in wanted]
    variants = tuple(v for v in args.variants.split(",") if v)
    results = sys.stdout
    with contextlib.redirect_stdout(sys.stderr):  # libraries' log lines (DeepSpeed's) stay out of the JSON lines
        info = machine()
        print(json.dumps({"bench": "train_step", "ceiling": True, **info}), file=results, flush=True)
        for case in cases:
            record = run_case(case, args.repeats, args.warmup, variants, with_lightly=not args.no_lightly)
            print(json.dumps({**record, "machine": info["machine"], "date": info["date"],
                              "matmul_fp32_gflops": info["matmul_fp32_gflops"]}), file=results, flush=True)


if __name__ == "__main__":
    main()
