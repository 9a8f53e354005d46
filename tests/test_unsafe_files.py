"""Unsafe files: a pickle disguised as a checkpoint or as weights is refused, with its name, and never runs."""

import ast
import shutil
from pathlib import Path

import pytest
import torch
from test_training import common_args, parquet_files, run  # noqa: F401 (a fixture)

from hf_siamese import SiameseConfig, SiameseForPreTraining
from hf_siamese.checkpointing import UnsafeCheckpointError

ROOT = Path(__file__).resolve().parents[1]


class Payload:
    """Unpickling this runs code: it writes ``marker``."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return exec, (f"open({self.marker!r}, 'w').write('pwned')",)


@pytest.fixture(scope="module")
def checkpoint(parquet_files, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("run")
    run(common_args(parquet_files, output, "--framework", "simsiam", "--max_steps", "2", "--checkpointing_steps", "1"))
    return output / "checkpoint-1"


@pytest.mark.parametrize("name", ["optimizer.bin", "random_states_0.pkl", "model.safetensors"])
def test_a_pickle_in_a_checkpoint_is_refused_before_it_runs(checkpoint, parquet_files, tmp_path, name):
    # accelerate alone would unpickle a custom state fully, and silently skip random states it cannot load.
    output = tmp_path / "out"
    shutil.copytree(checkpoint, output / "checkpoint-1")
    marker = tmp_path / "marker"
    torch.save(Payload(marker), output / "checkpoint-1" / name)
    with pytest.raises(UnsafeCheckpointError, match=name.replace(".", r"\.")):
        run(common_args(parquet_files, output, "--framework", "simsiam", "--max_steps", "2",
                        "--resume_from_checkpoint", "latest"))
    assert not marker.exists()


def test_the_untouched_checkpoint_resumes(checkpoint, parquet_files, tmp_path):
    output = tmp_path / "out"
    shutil.copytree(checkpoint, output / "checkpoint-1")
    result = run(common_args(parquet_files, output, "--framework", "simsiam", "--max_steps", "2",
                             "--resume_from_checkpoint", "latest"))
    assert result.global_step == 2


def test_pickled_weights_are_refused_when_starting_from_a_model(parquet_files, tmp_path):
    model_dir = tmp_path / "model"
    SiameseConfig(backbone="resnet18", image_size=32, framework="simsiam").save_pretrained(model_dir)
    marker = tmp_path / "marker"
    torch.save(Payload(marker), model_dir / "pytorch_model.bin")
    with pytest.raises(OSError, match="model.safetensors"):
        SiameseForPreTraining.from_pretrained(model_dir, use_safetensors=True)
    with pytest.raises(OSError, match="model.safetensors"):
        run(common_args(parquet_files, tmp_path / "out", "--framework", "simsiam", "--max_steps", "1",
                        "--model_name_or_path", str(model_dir)))
    assert not marker.exists()


def test_every_torch_load_in_the_package_is_weights_only():
    calls = []
    for path in (ROOT / "hf_siamese").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and ast.unparse(node.func) in ("torch.load", "load"):
                keywords = {k.arg: ast.unparse(k.value) for k in node.keywords}
                calls.append((path.name, keywords.get("weights_only")))
    assert calls and all(value == "True" for _, value in calls), calls
