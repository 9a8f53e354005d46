"""training_step: each optimizer step sees exactly the gradients of its own batches, with and without accumulation
(the gradients are freed between forward and backward without accumulation, after the step with it)."""

import copy

import pytest
import torch
from accelerate import Accelerator
from conftest import tiny_config, view_batch

from hf_siamese import SiameseForPreTraining
from hf_siamese.training import training_step


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
