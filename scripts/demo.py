#!/usr/bin/env python
"""`make demo`: pretrain the demo recipe on Fashion-MNIST, probe it (kNN, linear, dense), print where the model is.

    python scripts/demo.py [--config configs/demo_fashion_mnist.yaml] [--probe_epochs 90] [any run_pretraining field]

The probe is `run_linear_probe.py`'s default (cached protocol): kNN (k = 20, 200) with the 60k training images as
the bank, and a linear classifier trained on their features, both scored on the 10k test images. The dense probe is
`run_dense_probe.py`'s frozen linear segmentation probe on every stage (`--probe_levels multi`), on scenes of
training items, scored on scenes of test items.
"""

import argparse
import glob
import json
import logging
import subprocess
import sys
import time
from pathlib import Path

import hf_siamese  # noqa: F401  (registers the Auto classes)
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.dense_probe import DenseProbeArguments, run_dense_probe
from hf_siamese.linear_probe import ProbeArguments, format_results, run_linear_probe, summarise
from hf_siamese.accelerator import native_mixed_precision
from hf_siamese.monitoring import median_images_per_second
from hf_siamese.training import train

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default=str(ROOT / "configs/demo_fashion_mnist.yaml"))
    parser.add_argument("--probe_epochs", type=int, default=90, help="Linear-probe epochs on the cached features.")
    known, overrides = parser.parse_known_args()
    native_bf16 = native_mixed_precision() == "bf16"
    if not native_bf16 and "--mixed_precision" not in overrides:
        print("This CPU has no native bf16 (AVX-512 BF16 or AMX): pretraining and probing in fp32.")
        overrides = [*overrides, "--mixed_precision", "no"]
    if not {"--overwrite_output_dir", "--resume_from_checkpoint"} & set(overrides):
        overrides = [*overrides, "--overwrite_output_dir", "true"]  # the demo runs again from scratch
    config, data_args, train_args = parse_pretraining_args(["--config", known.config, *overrides])
    if data_args.data_files and not glob.glob(data_args.data_files):
        shards = Path(data_args.data_files).parent
        print(f"Writing Fashion-MNIST as parquet shards to {shards} ...")
        subprocess.run([sys.executable, str(ROOT / "scripts/prepare_fashion_mnist.py"), "--output_dir", str(shards)],
                       check=True)

    started = time.time()
    result = train(config, data_args, train_args)
    pretrain_seconds = time.time() - started

    started = time.time()
    results = run_linear_probe(ProbeArguments(
        model_name_or_path=result.output_dir, dataset_name="fashion_mnist", num_train_epochs=known.probe_epochs,
        disable_tqdm=True, dataloader_num_workers=2, mixed_precision="bf16" if native_bf16 else "no",
    ))
    probe_seconds = time.time() - started
    dense = run_dense_probe(DenseProbeArguments(model_name_or_path=result.output_dir, probe_levels="multi"))
    dense_scores = {record["metric"]: record for record in dense}
    run = json.loads(Path(result.output_dir, "training_run.json").read_text())
    summary = {
        "demo": "fashion_mnist", "framework": config.framework, "backbone": config.backbone,
        "steps": result.global_step, "epochs": _rounded(run["epochs"]), "mixed_precision": run["mixed_precision"],
        "images_per_s": median_images_per_second(Path(result.output_dir)),
        "pretrain_seconds": round(pretrain_seconds, 1), "probe_seconds": round(probe_seconds, 1), **summarise(results),
        "dense_miou": dense_scores["mean_iou"]["value"],
        "dense_pixel_accuracy": dense_scores["pixel_accuracy"]["value"],
        "dense_probe_seconds": dense_scores["mean_iou"]["seconds"],
        "model_dir": str(Path(result.output_dir).resolve()),
    }
    Path(result.output_dir, "demo_results.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary))
    print(format_results(results))
    epochs = f"{summary['epochs']} epochs" if summary["epochs"] is not None else "streamed: epochs not counted"
    print(f"\nPretrained {summary['steps']} steps ({epochs}) in {pretrain_seconds / 60:.1f} min at "
          f"{summary['images_per_s']} images/s ({summary['mixed_precision']}); probed in {probe_seconds / 60:.1f} min.")
    print(f"Linear-probe top-1 on the Fashion-MNIST test set: {summary['linear_top1']:.2%}, kNN (k=20) "
          f"{summary['knn20_top1']:.2%} (chance 10%).")
    print(f"Dense transfer, frozen linear probe on every stage: {summary['dense_miou']:.2%} mIoU over 11 classes "
          f"(background included) on Fashion-MNIST scenes of test items, in {summary['dense_probe_seconds'] / 60:.1f} "
          f"min; scenes, truth and prediction: {summary['model_dir']}/dense_examples.png.")
    print(f"Hub-ready model (weights, config, modeling code, image processor, eval_results.json): {summary['model_dir']}")
    pictures = json.loads(Path(result.output_dir, "eval_results.json").read_text()).get("pictures")
    if pictures:
        print(f"What the encoder learned, in its model card too: nearest neighbours {summary['model_dir']}/"
              f"{pictures['gallery']}, {pictures['map_method']} map {summary['model_dir']}/{pictures['embedding_map']} "
              f"(drawn in {pictures['seconds']} s).")
    print(f"Load it with: AutoModel.from_pretrained({summary['model_dir']!r})")


def _rounded(value: float | None) -> float | None:
    return round(value, 2) if value is not None else None


if __name__ == "__main__":
    main()
