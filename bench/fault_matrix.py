"""Bad input against the training script, the probing script and the Python API: one JSON line per case.

Each case makes its own data, runs the real entry point (what run_pretraining.py runs: ``parse_pretraining_args``
and ``train``; ``run_linear_probe.main``; the API's ``hf_siamese.data.open_image``) and classifies what happened:

* ``trained`` / ``probed`` / ``converted``: the input was used, after conversion;
* ``skipped``: the training stream or the probe skipped it and counted it in ``skipped_images``;
* ``error``: a clear error; the case also requires the message to name the culprit (file, column, field, row);
* ``stopped``: a diverged run stopped with its last good checkpoint intact and loadable.

``ok`` is whether that is the expected outcome. The test suite runs the same cases (tests/bench/test_fault_matrix_bench.py).

    python bench/fault_matrix.py [--cases truncated_png/train,nan_loss/train] [--recipe configs/demo_fashion_mnist.yaml]

``--recipe`` runs the training cases through a recipe, as a user does with their own files over one: the case's
``--data_files`` replaces the recipe's data source.
"""

import argparse
import contextlib
import io
import json
import logging
import re
import struct
import sys
import tempfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import datasets
import numpy as np
from huggingface_hub.errors import StrictDataclassError
from PIL import Image
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import run_linear_probe  # noqa: E402
from hf_siamese import SiameseConfig, SiameseModel  # noqa: E402
from hf_siamese.cli import parse_pretraining_args  # noqa: E402
from hf_siamese.data import UndecodableImage, open_image  # noqa: E402
from hf_siamese.checkpointing import completed_checkpoints  # noqa: E402
from hf_siamese.monitoring import NonFiniteLossError  # noqa: E402
from hf_siamese.training import train  # noqa: E402

TINY_MODEL = ["--backbone", "resnet18", "--image_size", "32", "--projector_hidden_dim", "32", "--projector_dim", "16",
              "--predictor_hidden_dim", "16"]
BATCH = 8
TRAINING_RECIPE: list[str] = []  # ["--config", path] when the training cases run through a recipe


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` (8-bit grey) over a few bytes of data."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 16)) + chunk(b"IEND", b"")


def _base(size: int = 32) -> Image.Image:
    ramp = np.linspace(0, 255, size, dtype=np.uint8)
    return Image.fromarray(np.stack([np.add.outer(ramp, ramp // 2), np.tile(ramp, (size, 1)),
                                     np.tile(ramp[:, None], (1, size))], axis=-1).astype(np.uint8), "RGB")


def _jpeg(image: Image.Image, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", **kwargs)
    return buffer.getvalue()


def _palette_with_transparency() -> bytes:
    image = _base().convert("P")
    image.info["transparency"] = 0
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", transparency=0)
    return buffer.getvalue()


# name -> (encoded image, whether it can be used after conversion)
IMAGES: dict[str, tuple[Callable[[], bytes], bool]] = {
    "truncated_png": (lambda: _png(_base())[:60], False),
    "truncated_jpeg": (lambda: _jpeg(_base(64))[:400], False),
    "random_bytes": (lambda: np.random.default_rng(0).bytes(2048), False),
    "empty_file": (lambda: b"", False),
    "zero_size": (lambda: _png_header(0, 5), False),
    "decompression_bomb": (lambda: _png_header(30_000, 30_000), False),
    "smaller_than_crop": (lambda: _png(_base().resize((1, 1))), True),
    "grayscale": (lambda: _png(_base().convert("L")), True),
    "rgba": (lambda: _png(_base().convert("RGBA")), True),
    "cmyk_jpeg": (lambda: _jpeg(_base().convert("CMYK")), True),
    "palette": (_palette_with_transparency, True),
    "sixteen_bit": (lambda: _png(Image.fromarray((np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16))), True),
    "very_large": (lambda: _jpeg(_base(64).resize((6000, 4000)), quality=70), True),
}


@dataclass
class Outcome:
    outcome: str
    detail: str = ""


@dataclass(frozen=True)
class Case:
    name: str
    surface: str  # train | probe | api
    expected: str
    run: Callable[[Path], Outcome]
    names: str = ""  # an error's message must match this regular expression

    @property
    def key(self) -> str:
        return f"{self.name}/{self.surface}"


def _write(directory: Path, images: list, labels: list | None = None, label_feature=None) -> str:
    features = {"image": datasets.Image()}
    columns = {"image": images}
    if labels is not None:
        features["label"] = label_feature or datasets.Value("int64")
        columns["label"] = labels
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "data.parquet"
    datasets.Dataset.from_dict(columns, features=datasets.Features(features)).to_parquet(str(path))
    return str(path)


def _good_images(count: int, first: int = 0) -> list[dict]:
    return [{"bytes": _png(_base().rotate(15 * index)), "path": None} for index in range(first, first + count)]


def _train(work: Path, data_files: str, *extra: str) -> Outcome:
    """One optimizer step of batch 8 on ``data_files``; ``trained`` if nothing was skipped."""
    result = train(*parse_pretraining_args([
        *TRAINING_RECIPE, "--data_files", data_files, "--dataloader_num_workers", "0", "--output_dir", str(work / "out"), "--per_device_train_batch_size", str(BATCH),
        "--max_steps", "1", "--shuffle_buffer_size", "1", "--report_to", "none", "--framework", "simsiam",
        *TINY_MODEL, *extra,
    ]))
    if result.skipped_images:
        return Outcome("skipped", f"{result.skipped_images} skipped, {result.global_step} step(s) trained")
    return Outcome("trained", f"{result.global_step} step(s), nothing skipped")


def _tiny_encoder(work: Path) -> Path:
    directory = work / "encoder"
    SiameseModel(SiameseConfig(backbone="resnet18", image_size=32, framework="simsiam", projector_hidden_dim=32,
                               projector_dim=16, predictor_hidden_dim=16)).save_pretrained(directory)
    return directory


def _probe(work: Path, train_files: str, eval_files: str | None = None) -> Outcome:
    """The probe on ``train_files``, evaluated on ``eval_files`` (default: four other good images); ``probed`` if
    nothing was skipped."""
    eval_files = eval_files or _write(work / "eval", _good_images(4, first=BATCH), labels=[0, 1] * 2)
    with contextlib.redirect_stdout(io.StringIO()):  # the script's table: this bench prints only JSON lines
        run_linear_probe.main([
            "--model_name_or_path", str(_tiny_encoder(work)), "--train_data_files", train_files,
            "--eval_data_files", eval_files, "--num_train_epochs", "1", "--knn_k", "3",
            "--per_device_train_batch_size", "4", "--disable_tqdm", "true", "--output_dir", str(work / "probe"),
        ])
    skipped = json.loads((work / "probe" / "eval_results.json").read_text())["results"][0]["skipped_images"]
    if any(skipped.values()):
        return Outcome("skipped", f"skipped undecodable images: {skipped}")
    return Outcome("probed", "eval_results.json written")


def _image_cases() -> list[Case]:
    cases = []
    for name, (make, usable) in IMAGES.items():
        def train_case(work: Path, make=make) -> Outcome:
            rows = [{"bytes": make(), "path": None}] + _good_images(BATCH)
            return _train(work, _write(work / "data", rows))

        def probe_case(work: Path, make=make) -> Outcome:
            rows = [{"bytes": make(), "path": None}] + _good_images(7)
            return _probe(work, _write(work / "data", rows, labels=[index % 2 for index in range(8)]))

        def api_case(work: Path, make=make) -> Outcome:
            image = open_image(make(), "RGB")
            return Outcome("converted", f"{image.mode} {image.width}x{image.height}")

        cases += [
            Case(name, "train", "trained" if usable else "skipped", train_case),
            Case(name, "probe", "probed" if usable else "skipped", probe_case),
            Case(name, "api", "converted" if usable else "error", api_case, names=r"\w"),
        ]
    return cases


def _missing_image_column(work: Path) -> Outcome:
    path = work / "data.parquet"
    datasets.Dataset.from_dict({"pixels": [[0, 1]] * 8, "label": [0, 1] * 4}).to_parquet(str(path))
    return _train(work, str(path))


def _empty_dataset(work: Path) -> Outcome:
    return _train(work, _write(work / "data", []))


def _empty_probe_data(work: Path) -> Outcome:
    return _probe(work, _write(work / "train", _good_images(8), labels=[0, 1] * 4), _write(work / "eval", [], labels=[]))


def _probe_without(label_column_case: str) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        images = _good_images(8)
        if label_column_case == "absent":
            return _probe(work, _write(work / "data", images))
        if label_column_case == "strings":
            files = _write(work / "data", images, ["cat", "dog"] * 4, datasets.Value("string"))
        else:
            files = _write(work / "data", images, [0.5, 1.5] * 4, datasets.Value("float32"))
        return _probe(work, files)
    return run


def _recipe(text: str) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        recipe = work / "recipe.yaml"
        recipe.write_text(text)
        return _train(work, _write(work / "data", _good_images(BATCH)), "--config", str(recipe))
    return run


def _config(**fields) -> Callable[[Path], Outcome]:
    def run(work: Path) -> Outcome:
        SiameseConfig(backbone="resnet18", **fields)
        return Outcome("converted", "the config was accepted")
    return run


def _queue_not_divisible(work: Path) -> Outcome:
    return _train(work, _write(work / "data", _good_images(BATCH)), "--framework", "moco", "--queue_size", "100")


def _nan_loss(work: Path) -> Outcome:
    """SimSiam at a learning rate of 1e9: a few steps on, the weights overflow and the loss turns NaN."""
    output_dir = work / "out"
    try:
        _train(work, _write(work / "data", _good_images(BATCH)), "--max_steps", "8", "--checkpointing_steps", "1",
               "--learning_rate", "1e9", "--no_scale_learning_rate", "--deterministic", "true", "--logging_steps", "1",
               "--output_dir", str(output_dir))
    except NonFiniteLossError as error:
        named = re.search(r"last good checkpoint is (\S+);", str(error))
        good = Path(named.group(1)) if named else None
        remaining = completed_checkpoints(output_dir)
        finite = good is not None and all(bool(v.isfinite().all()) for v in load_file(good / "model.safetensors").values())
        if finite and remaining and remaining[-1] == good and not (output_dir / "model.safetensors").exists():
            return Outcome("stopped", str(error))
        return Outcome("error", f"{error} (named checkpoint finite: {finite}; checkpoints left: {remaining})")
    return Outcome("trained", "the run finished without noticing the divergence")


CASES: list[Case] = [
    *_image_cases(),
    Case("missing_image_column", "train", "error", _missing_image_column, names=r"No image column.*'pixels', 'label'"),
    Case("empty_dataset", "train", "error", _empty_dataset, names=r"no full batch|empty"),
    Case("empty_dataset", "probe", "error", _empty_probe_data, names=r"eval.*is empty"),
    Case("label_column_absent", "probe", "error", _probe_without("absent"), names=r"`label_column` 'label'"),
    Case("label_column_strings", "probe", "error", _probe_without("strings"), names=r"`label_column` 'label'.*'cat'"),
    Case("label_column_float", "probe", "error", _probe_without("float"), names=r"`label_column` 'label'.*0\.5"),
    Case("unknown_field", "train", "error", _recipe("max_stpes: 10\n"), names=r"max_stpes.*recipe\.yaml"),
    Case("wrong_type", "train", "error", _recipe("max_steps: 2.5\n"), names=r"`max_steps` in recipe .*recipe\.yaml"),
    Case("wrong_model_type", "train", "error", _recipe("crop_min_scale: small\n"),
         names=r"recipe\.yaml.*'crop_min_scale'.*expected float"),
    Case("misspelt_field", "api", "error", _config(multicropp=True), names=r"`multicropp`.*`multicrop`"),
    Case("wrong_type", "api", "error", _config(image_size="big"), names=r"'image_size'.*expected int"),
    Case("queue_not_divisible", "train", "error", _queue_not_divisible, names=r"`queue_size` \(100\)"),
    Case("nan_loss", "train", "stopped", _nan_loss, names=r"NaN or infinite at step \d+.*checkpoint-\d+"),
]


def run_case(case: Case, work: Path) -> dict:
    """Run ``case`` in the empty directory ``work``; the JSON record of what happened."""
    try:
        outcome = case.run(work)
    except (ValueError, FileNotFoundError, UndecodableImage, StrictDataclassError) as error:
        outcome = Outcome("error", f"{type(error).__name__}: {error}")
    except SystemExit as error:  # argparse
        outcome = Outcome("error", f"SystemExit({error.code})")
    except Exception as error:  # anything else is a crash, not a clear error
        outcome = Outcome("crashed", f"{type(error).__name__}: {error}")
    named = not case.names or re.search(case.names, outcome.detail, flags=re.S) is not None
    ok = outcome.outcome == case.expected and (named if outcome.outcome in ("error", "stopped") else True)
    return {"bench": "fault_matrix", "case": case.name, "surface": case.surface, "expected": case.expected,
            "outcome": outcome.outcome, "ok": ok, "detail": outcome.detail.splitlines()[0][:300]}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", help="Comma-separated name/surface keys (default: all).")
    parser.add_argument("--recipe", type=Path, help="Run the training cases through this recipe.")
    args = parser.parse_args(argv)
    TRAINING_RECIPE[:] = ["--config", str(args.recipe)] if args.recipe else []
    logging.basicConfig(level=logging.ERROR)
    wanted = set(args.cases.split(",")) if args.cases else None
    failures = 0
    for case in CASES:
        if wanted and case.key not in wanted:
            continue
        with tempfile.TemporaryDirectory() as work:
            record = run_case(case, Path(work))
        failures += not record["ok"]
        print(json.dumps(record), flush=True)
    summary = {"bench": "fault_matrix", "cases": sum(1 for c in CASES if not wanted or c.key in wanted),
               "failures": failures, "recipe": str(args.recipe) if args.recipe else None}
    print(json.dumps(summary))
    return int(failures > 0)


if __name__ == "__main__":
    sys.exit(main())
