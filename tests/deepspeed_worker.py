"""Run by tests/test_distributed.py under `accelerate launch` with DeepSpeed ZeRO-2 bf16 on 2 CPU processes: one
training step and one EMA update of a framework, as `train` prepares them; writes what each rank saw."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import global_views, tiny_config  # noqa: E402

from hf_siamese.optim import build_optimizer  # noqa: E402
from hf_siamese.accelerator import build_model, make_accelerator, prepare  # noqa: E402
from hf_siamese.training import training_step  # noqa: E402
from hf_siamese.training_args import PretrainingArguments  # noqa: E402

MOMENTUM = 0.996


def one_step(framework: str, accelerator, args: PretrainingArguments) -> dict:
    model = build_model(tiny_config(framework), args, accelerator)
    optimizer = build_optimizer(model, "sgd", 0.05, 1e-4, momentum=0.9)
    engine, optimizer = prepare(accelerator, model, optimizer, args)
    unwrapped = accelerator.unwrap_model(engine)
    source, target = global_views(unwrapped.config, batch_size=8, seed=accelerator.process_index)
    batch = {"source_pixel_values": source, "target_pixel_values": target}
    output = training_step(accelerator, engine, optimizer, batch)

    targets = [p for module in unwrapped.target_modules() for p in module.parameters()]
    sources = [p for module in (unwrapped.siamese, unwrapped.heads["4"].projector) for p in module.parameters()]
    before = [p.detach().clone() for p in targets]
    unwrapped.momentum_update(MOMENTUM)
    pairs = list(zip(targets, before, sources))  # target_encoder, target_projector follow siamese, projector
    expected = [old + (1 - MOMENTUM) * (src.detach().float() - old) for _, old, src in pairs]
    report = {
        "loss_finite": bool(torch.isfinite(output.loss)),
        "source_dtype": str(unwrapped.siamese.dtype), "target_dtypes": sorted({str(p.dtype) for p in targets}),
        "ema_error": max((t.detach() - e).abs().max().item() for (t, _, _), e in zip(pairs, expected)),
        "ema_moved": max((t.detach() - old).abs().max().item() for t, old, _ in pairs),
    }
    if framework == "moco":
        report.update(queue_ptr=int(unwrapped.heads["4"].queue_ptr), queue_dtype=str(unwrapped.heads["4"].queue.dtype))
    return report


def main(out: Path, framework: str) -> None:
    args = PretrainingArguments(report_to="none", mixed_precision="bf16", per_device_train_batch_size=8)
    accelerator = make_accelerator(args, out)
    report = one_step(framework, accelerator, args)
    (out / f"rank{accelerator.process_index}.json").write_text(json.dumps(report))


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2])
