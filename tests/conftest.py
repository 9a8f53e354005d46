import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from hf_siamese import SiameseConfig  # noqa: E402

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
    """Source and target lists for the plain two-view layout of ``config``'s framework."""
    generator = torch.Generator().manual_seed(seed)
    view_a, view_b = (torch.randn(batch_size, config.num_channels, 32, 32, generator=generator) for _ in range(2))
    if config.symmetric_loss:
        return [view_a, view_b], [view_a, view_b]
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
