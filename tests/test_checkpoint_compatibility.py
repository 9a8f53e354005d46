"""Checkpoints of the older head layout (one attribute per head kind) load into the per-level layout, compute
exactly what they computed, and are saved in the new layout."""

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoModel

from hf_siamese import SiameseConfig, SiameseForPreTraining
from hf_siamese.modeling_siamese import legacy_key

FIXTURES = Path(__file__).parent / "fixtures/legacy_layout"
CASES = ["moco_ladder_dense", "byol_ladder_dense"]
OLD_PREFIXES = ("projector.", "predictor.", "target_projector.", "ladder_", "target_ladder_", "dense_",
                "target_dense_", "queue")


def fixture_inputs():
    """The inputs the fixtures' expected values were computed on (fixtures/legacy_layout/README.md)."""
    generator = torch.Generator().manual_seed(0)
    views = [torch.rand(4, 1, 16, 16, generator=generator) for _ in range(2)]
    geometry = [torch.tensor([[0.0, 0.0, 16.0, 16.0, 0.0]] * 4) for _ in range(2)]
    return dict(source_pixel_values=views, target_pixel_values=[view.flip(-1) for view in views],
                source_geometry=geometry, target_geometry=geometry)


def renamed(key: str) -> str:
    return legacy_key(key, last_level=4)


@pytest.mark.parametrize("case", CASES)
def test_an_old_layout_checkpoint_computes_the_same_loss_and_gradients(case):
    expected = json.loads((FIXTURES / "expected.json").read_text())[case]
    model, loading = SiameseForPreTraining.from_pretrained(FIXTURES / case, output_loading_info=True)
    model.train()
    assert not loading["missing_keys"] and not loading["unexpected_keys"]  # every weight found under its old name
    output = model(**fixture_inputs())
    output.loss.backward()
    assert output.loss.item() == pytest.approx(expected["loss"], rel=1e-6)
    assert {str(k): v.item() for k, v in output.level_losses.items()} == pytest.approx(expected["level_losses"], rel=1e-6)
    gradients = {name: p.grad.double().square().sum().item() for name, p in model.named_parameters()
                 if p.grad is not None}
    old_gradients = {renamed(name): value for name, value in expected["gradient_square_sums"].items()}
    assert set(gradients) == set(old_gradients)
    assert gradients == pytest.approx(old_gradients, rel=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_an_old_layout_checkpoint_is_saved_in_the_new_layout(case, tmp_path):
    old = load_file(FIXTURES / case / "model.safetensors")
    SiameseForPreTraining.from_pretrained(FIXTURES / case).save_pretrained(tmp_path)
    with safe_open(tmp_path / "model.safetensors", "pt") as saved:
        keys = set(saved.keys())
    assert keys == {renamed(key) for key in old} and not [key for key in keys if key.startswith(OLD_PREFIXES)]
    again = SiameseForPreTraining.from_pretrained(tmp_path)
    assert not again.loaded_legacy_layout
    state = again.state_dict()
    assert all(torch.equal(state[renamed(key)], tensor) for key, tensor in old.items())


def test_an_old_layout_state_dict_loads_strictly_with_every_queue_in_place():
    # The path of training checkpoints (accelerate's load_state calls load_state_dict).
    old = load_file(FIXTURES / "moco_ladder_dense" / "model.safetensors")
    model = SiameseForPreTraining(SiameseConfig.from_pretrained(FIXTURES / "moco_ladder_dense"))
    model.load_state_dict(old)
    assert model.loaded_legacy_layout
    model.load_state_dict(model.state_dict())
    assert not model.loaded_legacy_layout  # a later load of today's layout (a resume) is not an older checkpoint
    assert torch.equal(model.heads["2"].queue, old["queue_level2"]) and int(model.heads["2"].queue_ptr) == 8
    assert torch.equal(model.heads["4"].queue, old["queue"]) and int(model.heads["4"].queue_ptr) == 4
    assert torch.equal(model.heads["2"].target_dense_projector[0].weight, old["target_dense_projectors.2.0.weight"])


def test_the_encoder_of_an_old_layout_checkpoint_loads_with_automodel():
    old = load_file(FIXTURES / "byol_ladder_dense" / "model.safetensors")
    encoder = AutoModel.from_pretrained(FIXTURES / "byol_ladder_dense")
    state = encoder.state_dict()
    assert all(torch.equal(state[key.removeprefix("siamese.")], tensor) for key, tensor in old.items()
               if key.startswith("siamese."))


def legacy_name(key: str, last_level: int) -> str:
    """``key`` as the older layout named it (the inverse of ``legacy_key``)."""
    match = re.fullmatch(r"heads\.(\d+)\.([a-z_]+)(\..*)?", key)
    if match is None:
        return key
    level, name, rest = int(match[1]), match[2], match[3] or ""
    last = level == last_level
    names = {"projector": "projector" if last else f"ladder_projectors.{level}",
             "predictor": "predictor" if last else f"ladder_predictors.{level}",
             "target_projector": "target_projector" if last else f"target_ladder_projectors.{level}",
             "dense_projector": f"dense_projectors.{level}", "dense_predictor": f"dense_predictors.{level}",
             "target_dense_projector": f"target_dense_projectors.{level}",
             "queue": "queue" if last else f"queue_level{level}",
             "queue_ptr": "queue_ptr" if last else f"queue_ptr_level{level}"}
    return names[name] + rest


@pytest.mark.parametrize("ladder", [False, True])
def test_a_training_checkpoint_of_the_old_layout_resumes_without_a_ladder_and_refuses_with_one(ladder, tmp_path):
    from safetensors.torch import save_file

    from conftest import killed_before_the_end
    from test_training import TINY_MODEL, run, write_parquet
    from images import structured_images

    data_files = write_parquet(tmp_path / "data", structured_images(16), num_shards=1)
    args = ["--data_files", data_files, "--output_dir", str(tmp_path / "out"), "--per_device_train_batch_size", "8",
            "--report_to", "none", "--logging_steps", "1", "--checkpointing_steps", "1",
            "--dataloader_num_workers", "0", *TINY_MODEL, "--framework", "moco", "--queue_size", "32",
            *(["--ladder_levels", "[2, 4]", "--ladder_dense_weight", "0.5"] if ladder else [])]
    run([*args, "--max_steps", "2"])  # checkpoint-1, then the final model at step 2
    uninterrupted = load_file(tmp_path / "out" / "model.safetensors")
    killed_before_the_end(tmp_path / "out")
    weights = tmp_path / "out" / "checkpoint-1" / "model.safetensors"
    state = load_file(weights)
    old = {legacy_name(key, 4): tensor for key, tensor in state.items()}
    assert {renamed(key) for key in old} == set(state)  # the two helpers are inverses
    save_file(old, weights, metadata={"format": "pt"})
    resume = [*args, "--max_steps", "2", "--resume_from_checkpoint", "latest"]
    if ladder:
        with pytest.raises(ValueError, match="older head layout"):
            run(resume)
    else:
        run(resume)  # step 2 again, from the renamed checkpoint: it must end where the uninterrupted run did
        resumed = load_file(tmp_path / "out" / "model.safetensors")
        assert set(resumed) == set(uninterrupted)
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in resumed)
