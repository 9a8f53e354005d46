"""Run by tests/test_distributed.py under `accelerate launch` with 2 CPU processes; writes what each rank saw."""

import json
import sys
from pathlib import Path

import datasets
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config  # noqa: E402
from images import structured_images  # noqa: E402

from hf_siamese import SiameseForPreTraining  # noqa: E402
from hf_siamese.data import PretrainingData  # noqa: E402
from hf_siamese.distributed import batch_shuffled  # noqa: E402
from hf_siamese.training import PretrainingArguments, _make_accelerator  # noqa: E402
from hf_siamese.views import MultiViewTransform  # noqa: E402


def main(out: Path) -> None:
    accelerator = _make_accelerator(PretrainingArguments(report_to="none"), out)
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
    report["queue_head"] = model.queue[:8].tolist()
    report["queue_ptr"] = int(model.queue_ptr)

    # Shuffling BN in eval mode must give exactly the unshuffled encoding; the ranks' encoders must be identical
    # for that (the training forward above updated each rank's BN statistics with its own data).
    torch.manual_seed(0)
    model = SiameseForPreTraining(config).eval()
    encode = lambda pixels: model.target_projector(model.target_encoder(pixels).pooler_output)  # noqa: E731
    with torch.no_grad():
        report["shuffle_max_diff"] = (batch_shuffled(encode, target[0]) - encode(target[0])).abs().max().item()

    # MoCo v3: the loss contrasts each query with the keys of the whole global batch.
    mocov3 = SiameseForPreTraining(tiny_config("mocov3")).eval()
    views = [torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32)]
    result = mocov3(views, views)
    report["mocov3_loss"] = result.loss.item()
    report["mocov3_predictions"] = [p.tolist() for p in result.source_predictions]
    report["mocov3_targets"] = [t.tolist() for t in result.target_embeddings]
    (out / f"rank{rank}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
