"""The two collective operations Siamese losses need, a no-op on a single process."""

import dataclasses

import torch
import torch.distributed as dist


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


@torch.no_grad()
def gather_without_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Concatenate ``tensor`` from every process along dim 0, in rank order.

    Only for target-side tensors (keys), which carry no gradient: MoCo's queue takes every process's keys and
    MoCo v3 contrasts each query with the keys of the global batch.
    """
    if world_size() == 1:
        return tensor
    # Contiguous input and outputs (a channels-last view is not): the collective copies raw memory.
    tensor = tensor.contiguous()
    gathered = [torch.empty_like(tensor, memory_format=torch.contiguous_format) for _ in range(world_size())]
    dist.all_gather(gathered, tensor)
    return torch.cat(gathered, dim=0)


def batch_shuffled(function, inputs: torch.Tensor) -> torch.Tensor:
    """``function`` applied to a random permutation of the global batch, outputs back in ``inputs``' order.

    ``function`` returns a tensor, or a dict or dataclass of them (one per ladder level).

    MoCo's shuffling BN (He et al. 2020, Sec. 3.3): each process encodes keys drawn from every process, so the
    BatchNorm statistics of a key encoder's sub-batch cannot reveal which key belongs to which query. For the
    target branch only (no gradient). On one process it is just ``function(inputs)``.
    """
    if world_size() == 1:
        return function(inputs)
    with torch.no_grad():
        everything = gather_without_grad(inputs)
        permutation = torch.randperm(len(everything), device=inputs.device)
        dist.broadcast(permutation, src=0)
        own = permutation.view(world_size(), len(inputs))[rank()]
        inverse = torch.argsort(permutation)

        def restore(output: torch.Tensor) -> torch.Tensor:
            restored = gather_without_grad(output)[inverse]
            return restored.view(world_size(), len(inputs), *restored.shape[1:])[rank()]

        return _map_tensors(function(everything[own]), restore)


def _map_tensors(value, function):
    """``function`` applied to every tensor of a tensor or of nested dicts and dataclasses (``None`` stays)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, dict):
        return {key: _map_tensors(item, function) for key, item in value.items()}
    if dataclasses.is_dataclass(value):
        return dataclasses.replace(value, **{field.name: _map_tensors(getattr(value, field.name), function)
                                             for field in dataclasses.fields(value)})
    return value
