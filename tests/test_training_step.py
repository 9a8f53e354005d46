"""training_step: each optimizer step sees exactly the gradients of its own batches, with and without accumulation
(the gradients are freed between forward and backward without accumulation, after the step with it); and it never
reads a tensor's value on the host (``.item()``, ``int()``, ``bool()``, ...): on a GPU each such read waits for
every queued kernel, so one per step costs the overlap of the whole step."""

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config, view_batch
from torch.overrides import TorchFunctionMode

from hf_siamese import SiameseForPreTraining
from hf_siamese.optim import build_optimizer
from hf_siamese.training import ema_step, training_step


class RecordingSGD(torch.optim.SGD):
    """SGD at lr 0 (the weights stay put) that records the gradients each step is given."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen = []

    def step(self, closure=None):
        self.seen.append([p.grad.clone() for group in self.param_groups for p in group["params"]])
        return super().step(closure)


def reference_gradients(model, batches, scale: float) -> list[torch.Tensor]:
    model = copy.deepcopy(model)
    for batch in batches:
        (model(**batch).loss * scale).backward()
    return [p.grad for p in model.parameters() if p.requires_grad]


@pytest.mark.parametrize("accumulation", [1, 2])
def test_each_optimizer_step_sees_only_its_own_batches_gradients(accumulation):
    config = tiny_config("simsiam")
    model = SiameseForPreTraining(config)
    start = copy.deepcopy(model)
    optimizer = RecordingSGD([p for p in model.parameters() if p.requires_grad])
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=accumulation)
    prepared, prepared_optimizer = accelerator.prepare(model, optimizer)
    batches = [view_batch(config, batch_size=8, seed=seed) for seed in range(2 * accumulation)]
    for batch in batches:
        training_step(accelerator, prepared, prepared_optimizer, batch)
    assert len(optimizer.seen) == 2
    expected = reference_gradients(start, batches[accumulation:], 1 / accumulation)
    for seen, wanted in zip(optimizer.seen[1], expected, strict=True):
        torch.testing.assert_close(seen, wanted, rtol=1e-5, atol=1e-7)


HOST_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__int__, torch.Tensor.__float__,
              torch.Tensor.__bool__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.cpu}


class HostReads(TorchFunctionMode):
    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if func in HOST_READS:
            self.calls.append(func.__name__)
        if func is torch.Tensor.__getitem__ and _is_boolean_mask(args[1]):  # its size is read on the host
            self.calls.append("boolean mask")
        return func(*args, **(kwargs or {}))


def _is_boolean_mask(index) -> bool:
    indices = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def with_geometry(batch: dict) -> dict:
    """Crop geometries for the dense term: every view the whole image, the second flipped."""
    def geometry(views):
        return [torch.tensor([[0.0, 0.0, 1.0, 1.0, float(i % 2)]]).repeat(len(v), 1) for i, v in enumerate(views)]

    geometries = {"source_geometry": geometry(batch["source_pixel_values"])}
    if "target_pixel_values" in batch:
        geometries["target_geometry"] = geometry(batch["target_pixel_values"])
    return {**batch, **geometries}


@pytest.mark.parametrize("framework", ["moco", "mocov3", "byol", "simsiam"])
@pytest.mark.parametrize("design", [{}, {"multicrop": True, "multicrop_num_local": 2, "multicrop_local_size": 16},
                                    {"ladder_levels": [2, 4]}, {"ladder_levels": [2, 4], "ladder_dense_weight": 0.5}],
                         ids=["base", "multicrop", "ladder", "dense"])
def test_training_step_reads_nothing_back_to_the_host(framework, design):
    config = tiny_config(framework, **design)
    accelerator = Accelerator(cpu=True)
    model = SiameseForPreTraining(config)
    optimizer = build_optimizer(model, "sgd", 0.05, 1e-4, momentum=0.9)
    model, optimizer = accelerator.prepare(model, optimizer)
    batch = with_geometry(view_batch(config, batch_size=8))
    training_step(accelerator, model, optimizer, batch)  # first step: lazy state (optimizer buffers, queue copy)
    with HostReads() as reads:
        output = training_step(accelerator, model, optimizer, batch)
        ema_step(accelerator.unwrap_model(model), 0.5)
    assert reads.calls == []
    assert torch.isfinite(output.loss)


def test_the_detector_sees_a_host_read():
    with HostReads() as reads:
        int(torch.tensor(3))
        torch.tensor(1.0).item()
        torch.arange(3)[torch.tensor([True, False, True])]
    assert reads.calls == ["__int__", "item", "boolean mask"]
