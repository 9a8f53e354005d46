"""Every recipe on Fashion-MNIST at the same step budget, probed the same way, with its floors beside it.

Each run pretrains on the 60k training images for ``--steps`` optimizer steps (batch 256), then
``run_linear_probe`` (cached protocol, last level) gives kNN top-1 (k = 20, 200, T = 0.07, bank = the 60k
training images) and linear-probe top-1/top-5 on the 10k test images. The floors: kNN and logistic regression on
raw pixels, and the same probes on a randomly initialised encoder. One JSON line per run, appended to
``--results`` (runs already there are skipped, so an interrupted sweep continues); ``--report`` draws the loss
curves and the accuracies as PNG files beside it (needs the ``bench`` extra: matplotlib) and prints the table.

    python bench/fashion_mnist.py [--runs moco_baseline,byol] [--steps 150] [--probe_epochs 90]
    python bench/fashion_mnist.py --report

The small-image track (``--runs small_byol,...`` or ``small_floors``): each run is a recipe of ``configs/``
(``fashion_mnist_{framework}.yaml``, ``demo_fashion_mnist.yaml``) at ``--steps``, with any field overridden by
``--set "--field value ..."``. ``--validation`` pretrains on the first 50,000 training images and probes on the
last 10,000 (``train[:50000]`` / ``train[50000:]``), for choosing hyperparameters without the test set; without
it, runs pretrain on all 60,000 and are probed once on the 10,000 test images. Every recipe run logs an online
kNN (k = 20, 10,000-image bank, 2,000 queries from ``train[50000:]``) every ``--eval_every`` steps, with its
pretraining seconds (evaluation time excluded), for the accuracy-versus-wall-time plot.

    python bench/fashion_mnist.py --runs small_byol --steps 600 --validation --set "--crop_min_scale 0.3"
    python bench/fashion_mnist.py --runs small_floors,small_moco,small_mocov3,small_byol,small_simsiam --steps N

The design runs (the first table): the ImageNet-stem ResNet-18 at 32 px (one channel, 512 -> 128 heads, batch 256,
SGD momentum 0.9, weight decay 5e-4, cosine). MoCo-family runs use configs/fashion_mnist_imagenet_stem_moco.yaml
(lr 0.06 per 256, tau 0.2, queue 4096, m 0.99); the predictor-based ones (BYOL, Ladder-BYOL, SimSiam, MoCo v3)
use lr 0.05 per 256 with a 10% warm-up and their framework defaults (bench/ladder_fashion_mnist.py). Design settings follow
configs/asym_moco_*_r50.yaml, with MultiCrop's 96 px local crops scaled to 16 px for 32 px global views.
"""

import argparse
import datetime
import hashlib
import json
import platform
import shlex
import shutil
import tempfile
import time
from pathlib import Path

import torch

from hf_siamese import SiameseConfig, SiameseModel
from hf_siamese.cli import MODEL_FIELDS, load_recipe, parse_pretraining_args
from hf_siamese.data import DataArguments
from hf_siamese.linear_probe import ProbeArguments, run_linear_probe, summarise
from hf_siamese.fashion_mnist import load_fashion_mnist
from hf_siamese.metrics import classification_accuracy
from hf_siamese.probing import Features, ProbeSchedule, fit_cached_probe, knn_classify, predict
from hf_siamese.accelerator import native_mixed_precision
from hf_siamese.monitoring import median_images_per_second
from hf_siamese.training import train
from hf_siamese.training_args import PretrainingArguments

ROOT = Path(__file__).resolve().parents[1]
DEMO = load_recipe(ROOT / "configs/fashion_mnist_imagenet_stem_moco.yaml")
SCALE = {name: DEMO[name] for name in (
    "backbone", "image_size", "num_channels", "image_mean", "image_std", "projector_hidden_dim", "projector_dim")}
MOCO = {name: value for name, value in DEMO.items() if name in MODEL_FIELDS}
PREDICTOR = {**SCALE, "predictor_hidden_dim": 512}
MULTICROP = {"multicrop": True, "multicrop_num_local": 6, "multicrop_local_size": 16}

RUNS: dict[str, dict] = {
    "moco_baseline": MOCO,
    "moco_multicrop": {**MOCO, **MULTICROP},
    "moco_scalemix": {**MOCO, "scalemix": True},
    "moco_asymaug": {**MOCO, "asym_aug": True},
    "moco_asymbn": {**MOCO, "asym_bn": True},
    "moco_meanenc": {**MOCO, "mean_encoding": True, "mean_encoding_views": 2},
    "moco_combined": {**MOCO, **MULTICROP, "scalemix": True, "asym_aug": True, "mean_encoding": True},
    "byol": {**PREDICTOR, "framework": "byol"},
    "ladder_byol": {**PREDICTOR, "framework": "byol", "ladder_levels": [1, 2, 3, 4]},
    "simsiam": {**PREDICTOR, "framework": "simsiam"},
    "mocov3": {**PREDICTOR, "framework": "mocov3"},
}
FLOORS = ("raw_pixels", "random_init")
RECIPE_RUNS = {f"small_{name}": ROOT / f"configs/fashion_mnist_{name}.yaml" for name in ("moco", "mocov3", "byol",
                                                                                         "simsiam")}
RECIPE_RUNS["small_demo"] = ROOT / "configs/demo_fashion_mnist.yaml"
SMALL_FLOORS = ("small_raw_pixels", "small_random_init")
SPLITS = {"test": ("train", "test"), "validation": ("train[:50000]", "train[50000:]")}
ONLINE_KNN_QUERIES = "train[50000:]"  # never the test set: the curve is read at every evaluation
# The small track's probe encodes in bf16 where the CPU has it natively (bench/probe_speed.py: 1.56x).
PROBE_PRECISION = native_mixed_precision()


def pretrain(name: str, steps: int, seed: int, output_dir: Path) -> dict:
    """Pretrain run ``name`` into ``output_dir``; its step time and loss curve."""
    fields = RUNS[name]
    moco_family = "queue_size" in fields
    optimizer = {"learning_rate": DEMO["learning_rate"], "warmup_steps": 0} if moco_family else {
        "learning_rate": 0.05, "warmup_steps": steps // 10}
    started = time.time()
    result = train(
        SiameseConfig(**fields),
        DataArguments(dataset_name="fashion_mnist", dataloader_num_workers=2),
        PretrainingArguments(output_dir=str(output_dir), per_device_train_batch_size=256, max_steps=steps,
                             optimizer="sgd", weight_decay=5e-4, logging_steps=5, seed=seed, report_to="none",
                             **optimizer),
    )
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    return {"pretrain_seconds": round(time.time() - started, 1), "final_loss": round(result.loss, 4),
            "loss_curve": [[r["step"], round(r["loss"], 4)] for r in records if "loss" in r]}


def probe(model_dir: Path, probe_epochs: int) -> dict:
    results = run_linear_probe(ProbeArguments(
        model_name_or_path=str(model_dir), dataset_name="fashion_mnist", num_train_epochs=probe_epochs,
        output_dir=str(model_dir), disable_tqdm=True, pictures=False,
    ))
    return summarise(results)


def raw_pixel_floor(probe_epochs: int, seed: int, train_split: str = "train", eval_split: str = "test") -> dict:
    """kNN and logistic regression (the same linear probe) on standardised raw pixels."""
    splits = {}
    for split in (train_split, eval_split):
        dataset = load_fashion_mnist(split).with_format("numpy")
        pixels = torch.from_numpy(dataset["image"][:]).flatten(1).float() / 255
        splits[split] = Features((pixels - DEMO["image_mean"][0]) / DEMO["image_std"][0],
                                 torch.from_numpy(dataset["label"][:]).long())
    train_set, test_set = splits[train_split], splits[eval_split]
    summary = {}
    for k in (20, 200):
        predictions = knn_classify(train_set, test_set.features, k=k, temperature=0.07, num_classes=10)
        summary[f"knn{k}_top1"] = round((predictions == test_set.labels).float().mean().item(), 4)
    heads = fit_cached_probe(train_set, ["last"], 10, ProbeSchedule(epochs=probe_epochs, seed=seed), progress=False)
    for name, value in classification_accuracy(predict(heads, test_set)["last"], test_set.labels).items():
        summary[f"linear_{name}"] = round(value, 4)
    return summary


def pretrain_recipe(recipe: Path, args: argparse.Namespace, output_dir: Path) -> dict:
    """Pretrain a recipe (with ``--set`` overrides) on the run's split; its budget, loss and online-kNN curves."""
    train_split, _ = SPLITS[args.split]
    config, data_args, train_args = parse_pretraining_args([
        "--config", str(recipe), *shlex.split(args.set), "--dataset_name", "fashion_mnist", "--split", train_split,
        "--output_dir", str(output_dir), "--max_steps", str(args.steps), "--seed", str(args.seed),
        "--report_to", "none", "--logging_steps", "10", "--eval_steps", str(args.eval_every),
        "--eval_split", ONLINE_KNN_QUERIES, "--knn_bank_split", SPLITS["validation"][0],
        "--max_eval_samples", "2000", "--knn_bank_size", "10000",
        # A killed run continues from its last checkpoint (its clock too) when the sweep is started again.
        "--checkpointing_steps", str(args.checkpoint_every), "--checkpoints_total_limit", "1",
        "--resume_from_checkpoint", "latest",
    ])
    if not (output_dir / "training_run.json").is_file():  # a run that finished before a kill is not run again
        train(config, data_args, train_args)
    records = [json.loads(line) for line in (output_dir / "metrics.jsonl").read_text().splitlines()]
    run_info = json.loads((output_dir / "training_run.json").read_text())
    losses = [record for record in records if "loss" in record]
    return {"pretrain_seconds": round(run_info["train_seconds"], 1), "epochs": round(run_info["epochs"], 2),
            "images_per_s": median_images_per_second(output_dir),
            "processes": run_info["processes"], "cpu_threads": torch.get_num_threads(),
            "final_loss": round(losses[-1]["loss"], 4),
            "loss_curve": [[r["step"], round(r["loss"], 4)] for r in losses],
            "knn_curve": [[r["step"], r["seconds"], r["knn_top1"]] for r in records if "knn_top1" in r]}


def probe_split(model_dir: Path, args: argparse.Namespace, probe_levels: str = "last") -> dict:
    """kNN and linear probe of the run's split; with ``probe_levels`` beyond the last, each level's in ``levels``."""
    train_split, eval_split = SPLITS[args.split]
    results = run_linear_probe(ProbeArguments(
        model_name_or_path=str(model_dir), dataset_name="fashion_mnist", train_split=train_split,
        eval_split=eval_split, num_train_epochs=args.probe_epochs, output_dir=str(model_dir), disable_tqdm=True,
        dataloader_num_workers=2, mixed_precision=PROBE_PRECISION, pictures=False, probe_levels=probe_levels,
    ))
    summary = {**summarise(results), "probe_precision": PROBE_PRECISION}
    levels = sorted({record["level"] for record in results} - {"last"})
    if levels:
        summary["levels"] = {str(level): summarise(results, level) for level in levels}
    return summary


def run_small(name: str, args: argparse.Namespace) -> dict:
    """A run of the small-image track: a recipe, or a floor measured with the track's encoder (every recipe's)."""
    record = {"bench": "fashion_mnist_small", **_requested_record(name, args)}
    if name == "small_raw_pixels":
        return {**record, **raw_pixel_floor(args.probe_epochs, args.seed, *SPLITS[args.split])}
    model_dir = args.work_dir / hashlib.sha1(json.dumps(record, sort_keys=True).encode()).hexdigest()[:12]
    if name == "small_random_init":
        config, _, _ = parse_pretraining_args(["--config", str(RECIPE_RUNS["small_moco"])])
        torch.manual_seed(args.seed)
        SiameseModel(config).save_pretrained(model_dir)
    else:
        record.update(pretrain_recipe(RECIPE_RUNS[name], args, model_dir))
    if args.probe:
        record.update(probe_split(model_dir, args))
    shutil.rmtree(model_dir)  # measured: its record holds what it showed
    return record


def run(name: str, args: argparse.Namespace) -> dict:
    record = {"bench": "fashion_mnist", "run": name, "steps": 0 if name in FLOORS else args.steps, "seed": args.seed,
              "probe_epochs": args.probe_epochs}
    if name == "raw_pixels":
        return {**record, **raw_pixel_floor(args.probe_epochs, args.seed)}
    with tempfile.TemporaryDirectory() as scratch:
        model_dir = Path(scratch)
        if name == "random_init":
            torch.manual_seed(args.seed)
            SiameseModel(SiameseConfig(**MOCO)).save_pretrained(model_dir)
        else:
            record.update(pretrain(name, args.steps, args.seed, model_dir))
        return {**record, **probe(model_dir, args.probe_epochs)}


def markdown_table(results_path: Path) -> str:
    """The ImageNet-stem sweep as the table of docs/benchmarks.md: one row per run, accuracies in %."""
    keys = ("knn20_top1", "knn200_top1", "linear_top1", "linear_top5")
    rows = ["| run | steps | pretrain s | kNN k=20 | kNN k=200 | linear top-1 | linear top-5 | final loss |",
            "|---|---|---|---|---|---|---|---|"]
    for record in map(json.loads, results_path.read_text().splitlines()):
        accuracies = " | ".join(f"{record[key] * 100:.2f}" for key in keys)
        rows.append(f"| {record['run']} | {record['steps']} | {record.get('pretrain_seconds', '-')} | {accuracies} | "
                    f"{record.get('final_loss', '-')} |")
    return "\n".join(rows)


def small_table(results_path: Path) -> str:
    """The small track's records as a markdown table: budget, online-kNN curve, and the probes when run."""
    rows = ["| run | split | overrides | steps | seed | epochs | train min | images/s | online kNN by minute | "
            "kNN k=20 | kNN k=200 | linear top-1 |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for record in map(json.loads, results_path.read_text().splitlines()):
        rows.append(f"| {record['run']} | {record.get('split', 'test')} | {record.get('set') or '-'} | "
                    f"{_budget_cells(record)} | {_curve_by_minute(record.get('knn_curve', [])) or '-'} | "
                    f"{_probe_cells(record)} |")
    return "\n".join(rows)


def results_table(results_path: Path) -> str:
    """The README's table of the small track's test-set runs: budget and probes, one row per run."""
    rows = ["| run | steps | seed | epochs | train min | images/s | kNN k=20 | kNN k=200 | linear top-1 |",
            "|---|---|---|---|---|---|---|---|---|"]
    for record in map(json.loads, results_path.read_text().splitlines()):
        if record.get("split", "test") != "test" or not record.get("probe", True):
            continue
        rows.append(f"| {record['run'].removeprefix('small_')} | {_budget_cells(record)} | {_probe_cells(record)} |")
    return "\n".join(rows)


def _budget_cells(record: dict) -> str:
    """Steps, seed, epochs, pretraining minutes and images/s, as table cells."""
    seconds = record.get("pretrain_seconds")
    return (f"{record['steps']} | {record['seed']} | {record.get('epochs', '-')} | "
            f"{round(seconds / 60, 1) if seconds else '-'} | {record.get('images_per_s', '-')}")


def _probe_cells(record: dict) -> str:
    """kNN k=20, kNN k=200 and linear top-1 in %, as table cells ("-" for a probe not run)."""
    return " | ".join(f"{record[key] * 100:.2f}" if key in record else "-"
                      for key in ("knn20_top1", "knn200_top1", "linear_top1"))


def _curve_by_minute(curve: list, points: int = 5) -> str:
    """At most ``points`` evenly spaced points of an online-kNN curve, as "minutes: %" pairs."""
    stride = max(1, -(-len(curve) // points))
    kept = curve[stride - 1::stride] if curve else []
    if curve and kept[-1] is not curve[-1]:
        kept.append(curve[-1])
    return ", ".join(f"{seconds / 60:.1f}: {knn * 100:.1f}" for _, seconds, knn in kept)


def plot_knn_curves(results_path: Path) -> Path:
    """Online kNN against training minutes, one line per recipe run, as a PNG beside the results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 5))
    curves = [record for record in map(json.loads, results_path.read_text().splitlines()) if record.get("knn_curve")]
    for index, record in enumerate(curves):
        _, seconds, knn = zip(*record["knn_curve"])
        label = f"{record['run']} ({record['steps']} steps, seed {record['seed']}) {record.get('set', '')}".strip()
        style = ("-", "--", ":")[index // 10 % 3]  # the colour cycle has ten colours
        axes.plot([s / 60 for s in seconds], [k * 100 for k in knn], marker="o", linestyle=style, label=label)
    axes.set(xlabel="training minutes (2 CPU cores)", ylabel="online kNN top-1 (%)",
             title="Fashion-MNIST small-image track: online kNN on train[50000:]")
    axes.legend(fontsize=7)
    path = results_path.with_name(f"{results_path.stem}_knn.png")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    return path


def plot(results_path: Path) -> list[Path]:
    """Loss curves (each normalised by its first value) and accuracies per run, as PNG files beside the results."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = {r["run"]: r for r in map(json.loads, results_path.read_text().splitlines())}
    losses, axes = plt.subplots(figsize=(8, 5))
    for name, record in records.items():
        if record.get("loss_curve"):
            steps, values = zip(*record["loss_curve"])
            axes.plot(steps, [v / values[0] for v in values], label=name)
    axes.set(xlabel="step", ylabel="loss / first logged loss", title="Fashion-MNIST pretraining loss")
    axes.legend(fontsize=8)
    accuracy, axes = plt.subplots(figsize=(10, 5))
    names = list(records)
    for offset, key in ((-0.2, "knn20_top1"), (0.2, "linear_top1")):
        axes.bar([i + offset for i in range(len(names))], [records[n].get(key, 0) * 100 for n in names],
                 width=0.4, label=key)
    axes.set_xticks(range(len(names)), names, rotation=45, ha="right")
    axes.set(ylabel="top-1 on the test set (%)", title="Fashion-MNIST probes")
    axes.legend(loc="lower right")
    paths = [results_path.with_name(f"{results_path.stem}_{kind}.png") for kind in ("loss", "accuracy")]
    for figure, path in zip((losses, accuracy), paths):
        figure.tight_layout()
        figure.savefig(path, dpi=100)
    return paths


def _run_key(record: dict) -> tuple:
    return (record["run"], record["steps"], record["seed"], record.get("probe_epochs", 90),
            record.get("split", "test"), record.get("set", ""), record.get("probe", True))


def _requested_record(name: str, args: argparse.Namespace) -> dict:
    """The key fields a finished run ``name`` with these arguments has."""
    floor = name in FLOORS or name in SMALL_FLOORS
    record = {"run": name, "steps": 0 if floor else args.steps, "seed": args.seed, "probe_epochs": args.probe_epochs}
    if name in RECIPE_RUNS or name in SMALL_FLOORS:
        record.update(split=args.split, set="" if floor else args.set, probe=args.probe or floor)
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default=",".join([*FLOORS, *RUNS]),
                        help="Comma-separated subset; `small_floors` stands for the small track's two floors.")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--validation", dest="split", action="store_const", const="validation", default="test",
                        help="Small track: pretrain on train[:50000], probe on train[50000:] (not the test set).")
    parser.add_argument("--set", default="", help='Small track: recipe overrides, e.g. "--crop_min_scale 0.3".')
    parser.add_argument("--eval_every", type=int, default=50, help="Small track: online kNN every N steps.")
    parser.add_argument("--no_probe", dest="probe", action="store_false",
                        help="Small track: only the online-kNN curve (a quick validation proxy), no final probe.")
    parser.add_argument("--checkpoint_every", type=int, default=500, help="Small track: checkpoint every N steps.")
    parser.add_argument("--work_dir", type=Path, default=ROOT / "outputs/bench_fashion_mnist",
                        help="Small track: one directory per unfinished run, resumed from its checkpoint.")
    parser.add_argument("--probe_epochs", type=int, default=90)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--results", type=Path, default=ROOT / "bench/results/fashion_mnist.jsonl")
    parser.add_argument("--report", action="store_true",
                        help="Only draw the PNG plots of the results file and print its markdown table.")
    parser.add_argument("--readme_table", action="store_true",
                        help="Only print the README's table of a small-track results file.")
    args = parser.parse_args()
    if args.readme_table:
        print(results_table(args.results))
        return
    if args.report:
        small = json.loads(args.results.read_text().splitlines()[0]).get("bench") == "fashion_mnist_small"
        plots = [plot_knn_curves(args.results)] if small else plot(args.results)
        print(json.dumps({"plots": [str(path) for path in plots]}))
        print(small_table(args.results) if small else markdown_table(args.results))
        return
    args.results.parent.mkdir(parents=True, exist_ok=True)
    done = {_run_key(json.loads(line)) for line in args.results.read_text().splitlines()} if args.results.exists() else set()
    names = args.runs.replace("small_floors", ",".join(SMALL_FLOORS)).split(",")
    known = [*FLOORS, *RUNS, *SMALL_FLOORS, *RECIPE_RUNS]
    for name in names:
        if name not in known:
            parser.error(f"unknown run {name!r}; choose from {', '.join(known)}")
        if _run_key(_requested_record(name, args)) in done:
            continue  # already measured with this budget
        measured = run_small(name, args) if name in RECIPE_RUNS or name in SMALL_FLOORS else run(name, args)
        record = {**measured, "machine": f"{platform.machine()}, {torch.get_num_threads()} threads",
                  "date": datetime.date.today().isoformat()}
        with args.results.open("a") as stream:
            stream.write(json.dumps(record) + "\n")
        print(json.dumps({k: v for k, v in record.items() if not k.endswith("_curve")}), flush=True)


if __name__ == "__main__":
    main()
