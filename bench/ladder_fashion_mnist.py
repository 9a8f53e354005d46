"""BYOL vs Ladder-BYOL on Fashion-MNIST, same steps and seed: kNN top-1 of the final features and of every
stage's features, and the early slope of the (last-level) loss curve. One JSON line per run.

    python bench/ladder_fashion_mnist.py [--steps 100] [--batch_size 256] [--bank_size 10000]

The recipe is the demo's scale (ResNet-18, 32 px, one channel, SGD lr 0.05 per 256 with momentum 0.9 and weight
decay 5e-4, 10% warm-up then cosine: BYOL's LARS recipe is meant for batch 4096 and hundreds of epochs) with
BYOL's framework defaults narrowed to 512 -> 128 heads; Ladder-BYOL adds a loss at stages 1-3 (weights 1, no
dense term).
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from transformers import AutoModel

from hf_siamese import SiameseConfig
from hf_siamese.data import DataArguments
from hf_siamese.fashion_mnist import load_fashion_mnist
from hf_siamese.probing import extract_features, knn_classify
from hf_siamese.training import train
from hf_siamese.training_args import PretrainingArguments

RUNS = {"byol": {}, "ladder_byol": {"ladder_levels": [1, 2, 3, 4]}}


def early_slope(records: list[dict], key: str, first: int) -> float:
    """Least-squares slope of ``key`` against step over the first ``first`` logged steps (loss per step)."""
    points = [(r["step"], r[key]) for r in records if key in r and r["step"] <= first]
    steps, values = np.array(points).T
    return float(np.polyfit(steps, values, 1)[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--batch_size", type=int, default=256)
    parser.add_argument("--bank_size", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    train_split, test_split = load_fashion_mnist("train"), load_fashion_mnist("test")
    bank_split = train_split.select(range(args.bank_size))
    for name, fields in RUNS.items():
        config = SiameseConfig(
            backbone="resnet18", framework="byol", image_size=32, num_channels=1, image_mean=[0.2860],
            image_std=[0.3530], projector_hidden_dim=512, projector_dim=128, predictor_hidden_dim=512, **fields,
        )
        with tempfile.TemporaryDirectory() as output_dir:
            started = time.time()
            train(config, DataArguments(dataset_name="fashion_mnist", dataloader_num_workers=2),
                  PretrainingArguments(output_dir=output_dir, per_device_train_batch_size=args.batch_size,
                                       max_steps=args.steps, optimizer="sgd", learning_rate=0.05,
                                       weight_decay=5e-4, warmup_steps=args.steps // 10, logging_steps=1,
                                       seed=args.seed, report_to="none"))
            seconds = time.time() - started
            records = [json.loads(line) for line in Path(output_dir, "metrics.jsonl").read_text().splitlines()]
            encoder = AutoModel.from_pretrained(output_dir)
        levels = [1, 2, 3, 4]
        bank = extract_features(encoder, bank_split, levels=levels, progress=False)
        test = extract_features(encoder, test_split, levels=levels, progress=False)
        knn = {}
        for level in levels:
            level_bank = type(bank)(bank.levels[level], bank.labels)
            predictions = knn_classify(level_bank, test.levels[level], k=20, temperature=0.07)
            knn[f"stage{level}"] = round((predictions == test.labels).float().mean().item(), 4)
        last_loss_key = "level_loss/4" if "ladder_levels" in fields else "loss"
        print(json.dumps({
            "bench": "ladder_fashion_mnist", "run": name, "steps": args.steps, "batch_size": args.batch_size,
            "seed": args.seed, "optimizer": "sgd lr 0.05/256", "knn_top1_final": knn["stage4"], "knn_top1_per_stage": knn,
            "early_loss_slope_last_level": round(early_slope(records, last_loss_key, args.steps // 4), 5),
            "final_loss_last_level": round(records[-1][last_loss_key], 4), "pretrain_seconds": round(seconds, 1),
            "machine": f"{platform.machine()}, 2 cores",
        }))


if __name__ == "__main__":
    main()
