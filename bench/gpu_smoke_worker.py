"""One of the two processes of bench/gpu_smoke.py's ``ddp_gloo_two_processes`` check; writes ``rank{N}.json``.

Both processes use the same device (cuda:0, or the CPU in a dry run) and talk over gloo, so that two DDP processes
run on a one-GPU machine (NCCL refuses two ranks on one GPU). Each case builds MoCo with ShuffleBN, AsymBN and a
ladder from the same seed, wraps it in ``DistributedDataParallel`` (``find_unused_parameters=False``: a parameter
without a gradient fails the next step; ``broadcast_buffers=False``: the queues stay equal by the library's own
gathering, not by DDP copying rank 0's buffers), takes a few steps on different views per rank with the EMA after
each, then gathers every level's queue and pointer and compares them across ranks. The ``sync_bn`` case first
converts the plain BatchNorms with ``model.convert_sync_batchnorm()`` (CUDA only).

Started by gpu_smoke.py with torchrun's environment; by hand, from the repository root:

    export MASTER_ADDR=127.0.0.1 MASTER_PORT=29533 WORLD_SIZE=2
    RANK=0 python bench/gpu_smoke_worker.py --out /tmp/ddp & RANK=1 python bench/gpu_smoke_worker.py --out /tmp/ddp
"""

import argparse
import json
import math
import os
import sys
import traceback
from datetime import timedelta
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from torch.nn.parallel import DistributedDataParallel  # noqa: E402

from bench.gpu_smoke import LADDER, SCALES, Scale, describe, smoke_config, where  # noqa: E402
from bench.train_step import make_views  # noqa: E402
from hf_siamese import SiameseForPreTraining  # noqa: E402
from hf_siamese.optim import build_optimizer  # noqa: E402
from hf_siamese.training import ema_step, views_to_device  # noqa: E402


def gathered(tensor: torch.Tensor) -> list[torch.Tensor]:
    parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return parts


def run_case(device: torch.device, scale: Scale, sync_bn: bool) -> dict:
    rank, world = dist.get_rank(), dist.get_world_size()
    batch = scale.batch // world  # the global batch of the single-process checks
    config = smoke_config("moco", scale, batch=batch, shuffle_bn=True, asym_bn=True, ladder_levels=LADDER)
    torch.manual_seed(0)  # the same weights and queues on every rank
    model = SiameseForPreTraining(config)  # after init_process_group: AsymBN's target BN spans the ranks
    if sync_bn:
        model = model.convert_sync_batchnorm()
    model = model.to(device).train()
    ddp = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  broadcast_buffers=False)
    optimizer = build_optimizer(model, "sgd", 0.05, 1e-4, momentum=0.9)
    losses = []
    for step in range(scale.steps):
        views = views_to_device(make_views(config, batch, seed=1000 * step + rank), device)
        output = ddp(**views)
        optimizer.zero_grad(set_to_none=True)
        output.loss.backward()
        optimizer.step()
        ema_step(model, (step + 1) / scale.steps)
        losses.append(output.loss.detach())
    losses = [float(loss) for loss in losses]

    keys_per_step = batch * world * config.num_target_groups
    expected_pointer = scale.steps * keys_per_step % config.queue_size
    queues = {}
    for level in model.levels:
        queue, pointer = model.level_heads(level).queue, model.level_heads(level).queue_ptr
        all_queues, all_pointers = gathered(queue), gathered(pointer.view(1))
        queues[str(level)] = {
            "queue_equal": all(torch.equal(all_queues[0], other) for other in all_queues[1:]),
            "queue_max_abs_diff": max(float((all_queues[0] - other).abs().max()) for other in all_queues[1:]),
            "pointers": [int(p) for p in all_pointers], "expected_pointer": expected_pointer,
        }
    source = torch.cat([p.detach().flatten().float() for p in model.parameters() if p.requires_grad])
    parameters = gathered(source)
    report = {
        "losses": losses, "losses_finite": all(math.isfinite(v) for v in losses), "per_rank_batch": batch,
        "keys_per_step": keys_per_step, "queue_size": config.queue_size, "queues": queues,
        "parameters_max_abs_diff": max(float((parameters[0] - other).abs().max()) for other in parameters[1:]),
    }
    report["ok"] = report["losses_finite"] and all(
        q["queue_equal"] and q["pointers"] == [expected_pointer] * world for q in queues.values())
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--scale", default="gpu", choices=sorted(SCALES))
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--timeout", type=int, default=180, help="Seconds a collective waits before failing.")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if args.device == "cpu":
        torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    dist.init_process_group("gloo", timeout=timedelta(seconds=args.timeout))
    rank = dist.get_rank()
    device = torch.device("cuda", 0) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    report = {"rank": rank, "world": dist.get_world_size(), "device": str(device), "cases": {}}
    cases = {"shuffle_bn+asym_bn+ladder": False, "shuffle_bn+asym_bn+ladder+sync_bn": True}
    for name, sync_bn in cases.items():
        if sync_bn and device.type != "cuda":
            report["cases"][name] = {"ok": True, "skipped": "SyncBatchNorm runs on CUDA only"}
            continue
        try:
            report["cases"][name] = run_case(device, SCALES[args.scale], sync_bn)
        except Exception as error:
            traceback.print_exc()
            report["cases"][name] = {"ok": False, "error": describe(error), "where": where(error)}
            break  # the other rank may wait in a collective of this case: do not start another
    (args.out / f"rank{rank}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
