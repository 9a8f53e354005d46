#!/usr/bin/env python
"""`make demo`: pretrain the demo recipe on Fashion-MNIST, probe it with kNN, print where the model is.

    python scripts/demo.py [--config configs/demo_fashion_mnist.yaml] [--bank_size 10000] [any run_pretraining field]
"""

import argparse
import glob
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

from transformers import AutoModel

import hf_siamese  # noqa: F401  (registers the Auto classes)
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.fashion_mnist import load_fashion_mnist
from hf_siamese.probing import extract_features, knn_classify
from hf_siamese.training import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo_fashion_mnist.yaml"))
    parser.add_argument("--bank_size", type=int, default=10_000, help="Training images in the kNN memory bank.")
    known, overrides = parser.parse_known_args()
    config, data_args, train_args = parse_pretraining_args(["--config", known.config, *overrides])
    if data_args.data_files and not glob.glob(data_args.data_files):
        shards = Path(data_args.data_files).parent
        print(f"Writing Fashion-MNIST as parquet shards to {shards} ...")
        subprocess.run([sys.executable, str(ROOT / "scripts/prepare_fashion_mnist.py"), "--output_dir", str(shards)],
                       check=True)

    started = time.time()
    result = train(config, data_args, train_args)
    pretrain_seconds = time.time() - started

    encoder = AutoModel.from_pretrained(result.output_dir)
    bank = extract_features(encoder, load_fashion_mnist("train").select(range(known.bank_size)))
    test = extract_features(encoder, load_fashion_mnist("test"))
    predictions = knn_classify(bank, test.features, k=20, temperature=0.07)
    accuracy = (predictions == test.labels).float().mean().item()
    summary = {
        "demo": "fashion_mnist", "framework": config.framework, "backbone": config.backbone,
        "steps": result.global_step, "pretrain_seconds": round(pretrain_seconds, 1),
        "knn_top1": round(accuracy, 4), "knn_k": 20, "bank_size": known.bank_size, "test_images": len(test.labels),
        "model_dir": str(Path(result.output_dir).resolve()),
    }
    Path(result.output_dir, "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(f"\nkNN top-1 on the Fashion-MNIST test set: {accuracy:.2%} (chance 10%).")
    print(f"Hub-ready model (weights, config, modeling code, image processor): {summary['model_dir']}")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})")


if __name__ == "__main__":
    main()
