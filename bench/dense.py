"""Dense transfer at CPU scale: Fashion-MNIST encoders probed on Fashion-MNIST scenes, over seeds.

Every encoder has the small track's architecture (ResNet-18, widths 32-256, the small-image stem, 28 px, one
channel) and is trained on the 60,000 training images:

* ``random_init``: untrained, the floor;
* ``supervised``: trained with the labels (cross-entropy, random crops and flips) for the same steps and batch as
  the self-supervised runs: the classic comparison (MoCo's paper: self-supervised pretraining transfers better to
  detection than supervised);
* ``byol`` and ``ladder_byol``: the designs sweep's recipes and budget (bench/designs.py, 500 steps of 256);
  ``moco_baseline`` as a reference.

Each is then probed by ``run_dense_probe`` on the same seeded scenes (training scenes from training images,
evaluation scenes from test images): the frozen linear probe at every stage and on all stages together
(``multi``), and UperNet fine-tuning. One JSON line per (encoder, seed, protocol, level) in ``--results``; recorded
probes are skipped and a trained encoder is kept in ``--work_dir`` until all its probes are recorded, so the sweep
runs in parts and in the background:

    nohup python bench/dense.py --seeds 0,1,2 > dense.log 2>&1 &
    python bench/dense.py --report      # mean ± std per encoder and level, Ladder-BYOL minus BYOL paired by seed
"""

import argparse
import datetime
import json
import logging
import platform
import shutil
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import designs  # noqa: E402
from bench import fashion_mnist as track  # noqa: E402
from hf_siamese import SiameseForImageClassification, SiameseModel  # noqa: E402
from hf_siamese.cli import parse_pretraining_args  # noqa: E402
from hf_siamese.dense_probe import DEFAULT_LEARNING_RATES, DenseProbeArguments, run_dense_probe  # noqa: E402
from hf_siamese.fashion_mnist import load_fashion_mnist  # noqa: E402

ENCODERS = ("random_init", "supervised", "byol", "ladder_byol", "moco_baseline")
LINEAR_LEVELS = ("1", "2", "3", "4", "multi")
SMALL_TRACK_RECIPE = ROOT / "configs/fashion_mnist_byol.yaml"  # the architecture every encoder shares
# (probe-training scenes, evaluation scenes): items of disjoint Fashion-MNIST images
TEST = ("train", "test")
VALIDATION = ("train[:50000]", "train[50000:]")  # for choosing the probes' settings; the test scenes stay unread


def probes(args: argparse.Namespace) -> list[tuple[str, str]]:
    """(protocol, level) of every probe of one encoder."""
    return [("linear", level) for level in LINEAR_LEVELS] + ([("upernet", "multi")] if args.upernet else [])


def train_encoder(name: str, seed: int, args: argparse.Namespace, directory: Path) -> dict:
    """Train encoder ``name`` into ``directory`` (unless it is there); what its training cost."""
    if (directory / "config.json").is_file() and (directory / "encoder.json").is_file():
        return json.loads((directory / "encoder.json").read_text())
    started = time.perf_counter()
    if name == "random_init":
        config = parse_pretraining_args(["--config", str(SMALL_TRACK_RECIPE)])[0]
        torch.manual_seed(seed)
        SiameseModel(config).save_pretrained(directory)
        cost = {"steps": training_steps(name, args)}
    elif name == "supervised":
        cost = train_supervised(seed, args, directory)
    else:
        framework = designs.RUNS[name][0]
        run = designs.run_args(name, seed, argparse.Namespace(
            steps=args.steps, eval_every=args.steps, eval_every_ladder=args.steps,
            checkpoint_every=args.checkpoint_every, probe_epochs=0))
        record = track.pretrain_recipe(ROOT / f"configs/fashion_mnist_{framework}.yaml", run, directory)
        cost = {"steps": args.steps, "epochs": record["epochs"], "seconds": record["pretrain_seconds"]}
    cost.setdefault("seconds", round(time.perf_counter() - started, 1))  # the encoder's training time
    (directory / "encoder.json").write_text(json.dumps(cost))
    return cost


def train_supervised(seed: int, args: argparse.Namespace, directory: Path) -> dict:
    """The shared architecture trained with the labels: SGD, cosine, random 28 px crops of 4 px padded images and
    flips, ``--steps`` of 256; its training-set accuracy in the last 50 steps."""
    config = parse_pretraining_args(["--config", str(SMALL_TRACK_RECIPE)])[0]
    config.num_labels = 10
    torch.manual_seed(seed)
    model = SiameseForImageClassification(config).train()
    data = load_fashion_mnist("train").with_format("numpy")
    images = torch.from_numpy(data["image"][:]).float().div(255).sub(config.image_mean[0]).div(config.image_std[0])
    labels = torch.from_numpy(data["label"][:]).long()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.steps)
    generator = torch.Generator().manual_seed(seed)
    correct = []
    for step in range(args.steps):
        batch = torch.randint(len(labels), (256,), generator=generator)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            logits = model(pixel_values=augmented(images[batch], generator)).logits
        loss = F.cross_entropy(logits.float(), labels[batch])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        if step >= args.steps - 50:
            correct.append((logits.argmax(1) == labels[batch]).float().mean().item())
    model.save_pretrained(directory)
    return {"steps": args.steps, "epochs": round(args.steps * 256 / len(labels), 2),
            "train_accuracy_last_50_steps": round(statistics.fmean(correct), 4)}


def augmented(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Random 28 px crops of the images padded by 4 px (reflected), half of them flipped: ``[B, 1, 28, 28]``."""
    padded = F.pad(images[:, None], (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (len(images), 2), generator=generator)
    crops = torch.stack([image[:, top:top + 28, left:left + 28] for image, (top, left) in zip(padded, offsets.tolist())])
    flips = torch.rand(len(images), generator=generator) < 0.5
    return torch.where(flips[:, None, None, None], crops.flip(-1), crops)


def probe(directory: Path, seed: int, protocol: str, level: str, args: argparse.Namespace) -> dict:
    train_split, eval_split = VALIDATION if args.validation else TEST
    results = run_dense_probe(DenseProbeArguments(
        model_name_or_path=str(directory), protocol=protocol, probe_levels=level, seed=seed,
        train_split=train_split, eval_split=eval_split,
        num_train_scenes=args.train_scenes, num_eval_scenes=args.eval_scenes, scenes_seed=args.scenes_seed,
        num_train_epochs=epochs(protocol, args), learning_rate=learning_rate(protocol, args),
        upernet_hidden_size=args.upernet_hidden_size, output_dir=str(directory / "dense"), pictures=False,
    ))
    scores = {record["metric"]: record for record in results}
    return {"miou": percent(scores["mean_iou"]["value"]),
            "pixel_accuracy": percent(scores["pixel_accuracy"]["value"]),
            "per_class_iou": {name: percent(iou) for name, iou in scores["mean_iou"]["per_class_iou"].items()},
            "probe_seconds": scores["mean_iou"]["seconds"], "probe_epochs": scores["mean_iou"]["epochs"]}


def percent(fraction: float | None) -> float | None:
    """A probe's fraction as the records' percent, to two decimals (None: a class absent from the scenes)."""
    return None if fraction is None else round(100 * fraction, 2)


def epochs(protocol: str, args: argparse.Namespace) -> int:
    return args.linear_epochs if protocol == "linear" else args.upernet_epochs


def learning_rate(protocol: str, args: argparse.Namespace) -> float:
    return args.linear_learning_rate if protocol == "linear" else args.upernet_learning_rate


def sweep(records: list[dict], args: argparse.Namespace) -> list[str]:
    """Every (seed, encoder, probe) not yet in ``records``, each recorded as it finishes; the failures."""
    done = {(r["encoder"], r["steps"], r["seed"], r["protocol"], r["level"], r["learning_rate"], r["probe_epochs"],
             *(r[key] for key in SCENE_SETTINGS)) for r in records}
    failed, scenes = [], settings(args)
    for seed in (int(s) for s in args.seeds.split(",")):
        for name in args.encoders.split(","):
            todo = [(p, level) for p, level in probes(args)
                    if (name, training_steps(name, args), seed, p, level, learning_rate(p, args), epochs(p, args),
                        *(scenes[key] for key in SCENE_SETTINGS)) not in done]
            if not todo:
                continue
            directory = args.work_dir / f"{name}-seed{seed}-steps{args.steps}"
            try:
                cost = train_encoder(name, seed, args, directory)
                for protocol, level in todo:
                    record = {"bench": "dense", "encoder": name, "seed": seed, "protocol": protocol, "level": level,
                              **probe(directory, seed, protocol, level, args), **cost, **settings(args),
                              "learning_rate": learning_rate(protocol, args)}
                    append(args.results, record)
            except Exception as error:  # one failing encoder must not stop the others; retried next time
                logging.exception("%s, seed %d failed", name, seed)
                failed.append(f"{name}/seed{seed}: {type(error).__name__}: {error}")
                continue
            if not args.keep_encoders:
                shutil.rmtree(directory)  # every probe recorded
    return failed


def training_steps(name: str, args: argparse.Namespace) -> int:
    return 0 if name == "random_init" else args.steps


SCENE_SETTINGS = ("train_split", "eval_split", "train_scenes", "eval_scenes", "scenes_seed")  # in every record


def settings(args: argparse.Namespace) -> dict:
    train_split, eval_split = VALIDATION if args.validation else TEST
    return {"train_split": train_split, "eval_split": eval_split, "train_scenes": args.train_scenes,
            "eval_scenes": args.eval_scenes, "scenes_seed": args.scenes_seed,
            "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
            "date": datetime.date.today().isoformat()}


def append(path: Path, record: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a") as stream:
        stream.write(json.dumps(record) + "\n")
    print(json.dumps({k: v for k, v in record.items() if k != "per_class_iou"}), flush=True)


# (encoder, baseline) pairs the report gives paired by seed: the ladder's claim, self-supervised against supervised
# (the classic comparison) and against the untrained floor
PAIRS = (("ladder_byol", "byol"), ("byol", "supervised"), ("ladder_byol", "supervised"),
         ("moco_baseline", "supervised"), ("byol", "random_init"))


def miou_by_probe(records: list[dict]) -> tuple[dict[tuple, dict[int, float]], list[tuple], list[tuple]]:
    """mIoU by (encoder, steps, protocol, level, learning rate) and seed; the probe columns and the encoder rows in
    reading order."""
    by_key: dict[tuple, dict[int, float]] = {}
    for record in records:
        column = (record["protocol"], record["level"], record.get("learning_rate"))
        by_key.setdefault((record["encoder"], record["steps"], *column), {})[record["seed"]] = record["miou"]
    columns = sorted({key[2:] for key in by_key}, key=lambda c: (c[0] != "linear", c[1], c[2] or 0))
    rows = sorted({key[:2] for key in by_key}, key=lambda row: (ENCODERS.index(row[0]), row[1]))
    return by_key, columns, rows


def report(records: list[dict]) -> str:
    """mIoU mean ± std over seeds per encoder (and its training steps) and probe, and the differences of ``PAIRS``
    paired by seed with their 95% t-intervals."""
    by_key, columns, rows = miou_by_probe(records)
    several_rates = len({column[:2] for column in columns}) < len(columns)  # a grid of learning rates (validation)
    lines = ["| encoder | steps | " + " | ".join(f"{p} {level}" + (f" lr {rate:g}" if several_rates else "")
                                                for p, level, rate in columns) + " |",
             "|---|---|" + "---|" * len(columns)]
    for encoder, steps in rows:
        cells = [_spread(list(by_key.get((encoder, steps, *column), {}).values())) for column in columns]
        lines.append(f"| {encoder} | {steps} | " + " | ".join(cells) + " |")
    for encoder, baseline in PAIRS:
        lines += [_paired_row(by_key, encoder, baseline, steps, columns) for name, steps in rows if name == encoder]
    return "\n".join(line for line in lines if line)


def _paired_row(by_key: dict, encoder: str, baseline: str, steps: int, columns: list[tuple]) -> str:
    """``encoder - baseline`` per column, paired by seed (the baseline at the same steps, or untrained); empty when
    no seed has both."""
    cells, paired = [], False
    for column in columns:
        mine = by_key.get((encoder, steps, *column), {})
        theirs = by_key.get((baseline, steps, *column)) or by_key.get((baseline, 0, *column), {})
        differences = [mine[seed] - theirs[seed] for seed in sorted(mine.keys() & theirs.keys())]
        paired |= bool(differences)
        if len(differences) > 1:
            mean, half = designs.paired_interval(differences)
            cells.append(f"{mean:+.2f} ± {half:.2f} (n={len(differences)})")
        else:
            cells.append(f"{differences[0]:+.2f} (1 seed)" if differences else "-")
    return f"| {encoder} - {baseline} | {steps} | " + " | ".join(cells) + " |" if paired else ""


def plot(records: list[dict], path: Path) -> Path:
    """mIoU of every encoder by probe, mean over the seeds with their std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as pyplot

    by_key, columns, rows = miou_by_probe(records)
    figure, axes = pyplot.subplots(figsize=(8, 4.5))
    width = 0.8 / len(rows)
    for index, (encoder, steps) in enumerate(rows):
        runs = [list(by_key.get((encoder, steps, *column), {}).values()) for column in columns]
        positions = [c + (index - (len(rows) - 1) / 2) * width for c, values in enumerate(runs) if values]
        values = [values for values in runs if values]
        axes.errorbar(positions, [statistics.fmean(v) for v in values], fmt="o", capsize=3,
                      yerr=[statistics.stdev(v) if len(v) > 1 else 0 for v in values],
                      label=f"{encoder}, {steps} steps ({_seeds(max(map(len, values)))})")
    axes.set_xticks(range(len(columns)), [f"{protocol} {level}" for protocol, level, _ in columns])
    evaluated_on = ", ".join(sorted({record.get("eval_split", "test") for record in records}))
    axes.set_ylabel(f"mIoU (%), {evaluated_on} scenes, mean ± std over seeds")
    axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    pyplot.close(figure)
    return path


def _seeds(count: int) -> str:
    return "1 seed" if count == 1 else f"{count} seeds"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f} (1 seed)"
    return f"{statistics.fmean(values):.2f} ± {statistics.stdev(values):.2f} ({len(values)})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--encoders", default="random_init,supervised,byol,ladder_byol")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--steps", type=int, default=500, help="Training steps of 256 of every trained encoder.")
    parser.add_argument("--checkpoint_every", type=int, default=100)
    parser.add_argument("--train_scenes", type=int, default=2000)
    parser.add_argument("--eval_scenes", type=int, default=1000)
    parser.add_argument("--scenes_seed", type=int, default=0)
    parser.add_argument("--validation", action="store_true",
                        help="Probe-training scenes of train[:50000], evaluation scenes of train[50000:]; keeps the "
                             "encoders (default results file: dense_validation.jsonl).")
    parser.add_argument("--keep_encoders", action="store_true", help="Keep the trained encoders in --work_dir.")
    parser.add_argument("--linear_epochs", type=int, default=20)
    parser.add_argument("--linear_learning_rate", type=float, default=DEFAULT_LEARNING_RATES["linear"])
    parser.add_argument("--upernet", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--upernet_epochs", type=int, default=3)
    parser.add_argument("--upernet_learning_rate", type=float, default=DEFAULT_LEARNING_RATES["upernet"])
    parser.add_argument("--upernet_hidden_size", type=int, default=64)
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs/bench_dense")
    parser.add_argument("--results", type=Path)
    parser.add_argument("--report", action="store_true", help="Only print the table.")
    args = parser.parse_args()
    args.keep_encoders |= args.validation
    args.results = args.results or ROOT / f"bench/results/dense{'_validation' if args.validation else ''}.jsonl"
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.WARNING)
    records = [json.loads(line) for line in args.results.read_text().splitlines()] if args.results.exists() else []
    if args.report:
        print(report(records))
        if records:
            print(json.dumps({"plot": str(plot(records, args.results.with_suffix(".png")))}))
        return
    unknown = set(args.encoders.split(",")) - set(ENCODERS)
    if unknown:
        parser.error(f"unknown encoder(s) {sorted(unknown)}; choose from {', '.join(ENCODERS)}")
    failed = sweep(records, args)
    if failed:
        sys.exit("Failed (kept for resuming):\n" + "\n".join(failed))


if __name__ == "__main__":
    main()
