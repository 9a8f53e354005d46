"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes; writes what each rank saw."""

import json
import sys
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import batched_against_separate, design_views, global_views, tiny_config  # noqa: E402
from images import structured_images  # noqa: E402

from hf_siamese import SiameseForPreTraining  # noqa: E402
from hf_siamese.data import PretrainingData  # noqa: E402
from hf_siamese.distributed import batch_shuffled, gather_without_grad  # noqa: E402
from hf_siamese.optim import build_optimizer  # noqa: E402
from hf_siamese.accelerator import build_model, make_accelerator  # noqa: E402
from hf_siamese.training import training_step  # noqa: E402
from hf_siamese.training_args import PretrainingArguments  # noqa: E402
from hf_siamese.views import MultiViewTransform  # noqa: E402


def main(out: Path) -> None:
    accelerator = make_accelerator(PretrainingArguments(report_to="none"), out)
    rank = accelerator.process_index
    report = {"rank": rank, "world": accelerator.num_processes, "type": str(accelerator.distributed_type)}

    # Which examples this rank reads in one epoch.
    dataset = datasets.Dataset.from_dict({"image": structured_images(32), "label": list(range(32))},
                                         features=datasets.Features({"image": datasets.Image(),
                                                                     "label": datasets.Value("int64")}))
    config = tiny_config("moco", queue_size=32)
    data = PretrainingData(dataset, MultiViewTransform.from_config(config), batch_size=4, num_channels=3, seed=0,
                           rank=rank, world_size=accelerator.num_processes)
    report["labels"] = sorted(example["label"] for example in data.stream.dataset)

    # MoCo: one training forward fills the queue with both ranks' keys, in rank order.
    torch.manual_seed(0)
    model = SiameseForPreTraining(config).train()
    torch.manual_seed(100 + rank)
    source, target = [torch.randn(4, 3, 32, 32)], [torch.randn(4, 3, 32, 32)]
    output = model(source, target)
    report["own_keys"] = output.target_embeddings[0].tolist()
    report["queue_head"] = model.heads["4"].queue[:8].tolist()
    report["queue_ptr"] = int(model.heads["4"].queue_ptr)

    # Shuffling BN in eval mode must give exactly the unshuffled encoding; the ranks' encoders must be identical
    # for that (the training forward above updated each rank's BN statistics with its own data).
    torch.manual_seed(0)
    model = SiameseForPreTraining(config).eval()
    encode = lambda pixels: model.heads["4"].target_projector(model.target_encoder(pixels).pooler_output)  # noqa: E731
    with torch.no_grad():
        report["shuffle_max_diff"] = (batch_shuffled(encode, target[0]) - encode(target[0])).abs().max().item()

    # MoCo v3: the loss contrasts each query with the keys of the whole global batch.
    mocov3 = SiameseForPreTraining(tiny_config("mocov3")).eval()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    result = mocov3(views, views)
    report["mocov3_loss"] = result.loss.item()
    report["mocov3_predictions"] = [p.tolist() for p in result.source_predictions]
    report["mocov3_targets"] = [t.tolist() for t in result.target_embeddings]

    # DDP as training builds it, with AsymBN (its target BN is all-reduced by hand: DDP refuses torch's
    # SyncBatchNorm in a CPU module): the queues are left out of the per-forward buffer broadcast.
    arguments = PretrainingArguments(report_to="none")
    config = tiny_config("moco", queue_size=32, ladder_levels=[2, 4], asym_bn=True, asym_bn_source_batch=2)
    model = build_model(config, arguments, accelerator)
    ddp, optimizer = accelerator.prepare(model, build_optimizer(model, "sgd", 0.05, 1e-4, momentum=0.9))
    synced = {id(buffer) for buffer in ddp.module.buffers() if any(buffer is b for b in ddp.modules_buffers)}
    report["ddp_synced_buffers"] = [name for name, b in ddp.module.named_buffers() if id(b) in synced]
    report["asym_bn_ddp_losses"] = []
    for step in range(2):  # DDP fails at the second step when a parameter got no gradient in the first
        source, target = global_views(config, batch_size=4, seed=10 * step + rank)
        batch = {"source_pixel_values": source, "target_pixel_values": target}
        report["asym_bn_ddp_losses"].append(training_step(accelerator, ddp, optimizer, batch).loss.item())

    # Views batched in one forward equal a forward per view across processes too, MoCo's shuffling BN included.
    overrides = {"shuffle_bn": True, "symmetric_loss": True, "multicrop": True, "multicrop_num_local": 2,
                 "multicrop_local_size": 16}
    source, target = design_views(tiny_config("moco", **overrides), batch_size=4, seed=rank)
    report["batched_views_differences"] = batched_against_separate("moco", source, target, **overrides)

    # A channels-last tensor (a view batch under --channels_last) gathers to the same values, contiguous.
    local = (torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4) + 1000 * rank).to(memory_format=torch.channels_last)
    gathered = gather_without_grad(local)
    expected = torch.cat([torch.arange(2 * 3 * 4 * 4.0).view(2, 3, 4, 4) + 1000 * r for r in range(2)])
    report["channels_last_gather_equal"] = torch.equal(gathered, expected)
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
