import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_siamese import SiameseConfig  # noqa: E402
from hf_siamese.view_layout import ViewLayout  # noqa: E402

TINY_HEADS = {"projector_hidden_dim": 64, "projector_dim": 32}
TINY_VIT = {"patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}


def tiny_config(framework: str = "byol", backbone: str = "resnet18", **overrides) -> SiameseConfig:
    """A config small enough for CPU tests: narrow heads, 32 px, a short queue."""
    fields = {"backbone": backbone, "framework": framework, "image_size": 32, **TINY_HEADS}
    if framework != "moco":
        fields["predictor_hidden_dim"] = 64
    if framework == "moco":
        fields["queue_size"] = 64
    if backbone.startswith("vit"):
        fields["backbone_kwargs"] = dict(TINY_VIT)
    fields.update(overrides)
    return SiameseConfig(**fields)


def global_views(config: SiameseConfig, batch_size: int = 8, seed: int = 0):
    """Source and target lists for the plain two-view layout of ``config``'s framework (no target list when both
    branches see the global views)."""
    generator = torch.Generator().manual_seed(seed)
    view_a, view_b = (torch.randn(batch_size, config.num_channels, 32, 32, generator=generator) for _ in range(2))
    if config.symmetric_loss:
        return [view_a, view_b], None
    return [view_a], [view_b]


FRAMEWORK_NAMES = ["moco", "mocov3", "byol", "simsiam"]


@pytest.fixture(params=FRAMEWORK_NAMES)
def framework(request):
    return request.param


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """accelerate keeps one state per process, set by the first Accelerator (mixed precision, dynamo plugin); each
    test starts from none, as a fresh run does, so that one test's bf16 or torch.compile does not leak."""
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    yield
    AcceleratorState._reset_state(reset_partial_state=True)


def design_views(config: SiameseConfig, batch_size: int = 8, seed: int = 0):
    """Source and target lists for ``config`` with its designs: global views (both branches' for a symmetric loss:
    no target list), MultiCrop's local crops after them, MeanEnc's extra target views in each group."""
    generator = torch.Generator().manual_seed(seed)

    def view(side: int) -> torch.Tensor:
        return torch.randn(batch_size, config.num_channels, side, side, generator=generator)

    layout = ViewLayout.from_config(config)
    globals_ = [view(layout.image_size) for _ in range(layout.num_groups)]
    locals_ = [view(layout.local_size) for _ in range(layout.num_local)]
    firsts = globals_ if layout.num_groups > 1 else [view(layout.image_size)]
    if layout.shares_global_views:
        return [*globals_, *locals_], None
    extra = layout.target_views_per_group - 1
    target = [v for first in firsts for v in [first, *(view(layout.image_size) for _ in range(extra))]]
    return [*globals_, *locals_], target


def view_batch(config: SiameseConfig, batch_size: int = 8, seed: int = 0) -> dict[str, list[torch.Tensor]]:
    """``design_views`` as ``collate_views`` names them (no target entry when the source views are both branches')."""
    source, target = design_views(config, batch_size, seed)
    return {"source_pixel_values": source, **({"target_pixel_values": target} if target is not None else {})}


def batched_against_separate(framework: str, source, target, seed: int = 0, **overrides) -> dict[str, float]:
    """Largest differences between one training forward and backward with ``batch_views`` and one with a forward
    per view, from the same weights and inputs: in the loss, the gradients and the buffers (BatchNorm running
    statistics, queues), each relative to the tensor's largest magnitude when above 1. Also
    ``"gradients_missing"``: parameters with a gradient in one and not the other."""
    from hf_siamese import SiameseForPreTraining

    runs = []
    for batch_views in (True, False):
        torch.manual_seed(seed)
        model = SiameseForPreTraining(tiny_config(framework, batch_views=batch_views, **overrides)).train()
        torch.manual_seed(seed + 1)  # shuffling BN's permutation
        output = model(source, target)
        output.loss.backward()
        gradients = {name: p.grad for name, p in model.named_parameters() if p.grad is not None}
        runs.append((output.loss.detach(), gradients, dict(model.named_buffers())))
    (loss, gradients, buffers), (loss_1, gradients_1, buffers_1) = runs

    def difference(first: torch.Tensor, second: torch.Tensor) -> float:
        first, second = first.double(), second.double()
        return ((first - second).abs().max() / first.abs().max().clamp(min=1)).item()

    def largest(first: dict, second: dict) -> float:
        return max(difference(first[k], second[k]) for k in first.keys() & second.keys())

    return {"loss": difference(loss, loss_1), "gradients": largest(gradients, gradients_1),
            "gradients_missing": len(set(gradients) ^ set(gradients_1)), "buffers": largest(buffers, buffers_1)}


def killed_before_the_end(output_dir: Path) -> None:
    """Leave what a run killed after its checkpoints but before its end leaves: no saved model, no run record."""
    for name in ("training_run.json", "model.safetensors", "config.json", "README.md"):
        (output_dir / name).unlink(missing_ok=True)
