"""A run reads, writes and starts from exactly what it was told, and says so: data sources over recipes, one run per
output folder, resumes that continue the same run, starting models, and errors that name the file."""

import json
import logging
import subprocess
import sys
from pathlib import Path

import datasets
import pytest
from huggingface_hub import ModelCard
from images import structured_images
from safetensors.torch import load_file

from conftest import killed_before_the_end, tiny_config
from hf_siamese import SiameseForPreTraining
from hf_siamese.cli import parse_pretraining_args
from hf_siamese.data import load_raw_dataset
from hf_siamese.timm_export import export_timm
from hf_siamese.training import train

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "configs").glob("*.yaml"))
ROWS = 24
TINY = ["--backbone", "resnet18", "--backbone_kwargs", "{channels: [8, 16, 32, 64]}", "--small_image_stem", "true",
        "--image_size", "32", "--num_channels", "3", "--projector_hidden_dim", "32", "--projector_dim", "16",
        "--predictor_hidden_dim", "32", "--framework", "simsiam", "--per_device_train_batch_size", "8",
        "--report_to", "none", "--logging_steps", "1", "--dataloader_num_workers", "0", "--mixed_precision", "no"]


def image_table(count: int, seed: int = 0) -> datasets.Dataset:
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=["a", "b"])})
    images = structured_images(count, seed=seed)
    return datasets.Dataset.from_dict({"image": images, "label": [i % 2 for i in range(count)]}, features=features)


@pytest.fixture(scope="module")
def sources(tmp_path_factory) -> dict[str, str]:
    """The same kind of tiny data as a parquet file, an image folder and a local dataset repository."""
    root = tmp_path_factory.mktemp("user_data")
    (root / "files").mkdir()
    image_table(ROWS).to_parquet(str(root / "files" / "mine.parquet"))
    for index, image in enumerate(structured_images(ROWS, seed=1)):
        folder = root / "folder" / ("a" if index % 2 else "b")
        folder.mkdir(parents=True, exist_ok=True)
        image.save(folder / f"{index}.png")
    (root / "repository" / "data").mkdir(parents=True)
    image_table(ROWS, seed=2).to_parquet(str(root / "repository" / "data" / "train-00000-of-00001.parquet"))
    return {"data_files": str(root / "files" / "*.parquet"), "train_dir": str(root / "folder"),
            "dataset_name": str(root / "repository")}


def run(*argv):
    return train(*parse_pretraining_args(list(argv)))


@pytest.mark.parametrize("kind", ["data_files", "train_dir", "dataset_name"])
@pytest.mark.parametrize("recipe", RECIPES, ids=[path.stem for path in RECIPES])
def test_a_source_on_the_command_line_replaces_every_recipes_own(recipe, kind, sources, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_siamese.cli"):
        _, data_args, _ = parse_pretraining_args(["--config", str(recipe), f"--{kind}", sources[kind]])
    given = {name: getattr(data_args, name) for name in ("dataset_name", "train_dir", "data_files")}
    assert given == {name: sources[kind] if name == kind else None for name in given}
    assert data_args.split == "train"  # a recipe's split of its own dataset is not applied to the user's data
    dataset = load_raw_dataset(data_args)
    record = data_args.source_record(dataset)
    rows = record["rows"] if not data_args.streaming else sum(1 for _ in dataset)  # a stream's length is unknown
    assert rows == ROWS and record["name"].endswith(Path(sources[kind]).name)
    recipe_source = next(line for line in recipe.read_text().splitlines() if line.startswith(("dataset_name",
                                                                                               "data_files")))
    assert f"--{kind} on the command line replaces recipe" in caplog.text
    assert f"{recipe_source.split(':')[0]}=" in caplog.text  # the note names what it replaced


def test_a_recipe_run_on_the_users_files_trains_on_them_and_records_it(sources, tmp_path, caplog):
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO):
        run("--config", str(ROOT / "configs/demo_fashion_mnist.yaml"), "--data_files", sources["data_files"],
            "--output_dir", str(out), "--max_steps", "6", *TINY)
    record = json.loads((out / "training_run.json").read_text())
    assert record["epochs"] == pytest.approx(6 * 8 / ROWS)  # 24 rows, not the recipe's 60,000 Fashion-MNIST images
    assert record["data"] == {"kind": "files", "name": sources["data_files"], "files": 1, "rows": ROWS,
                              "streaming": False}
    assert record["model_name_or_path"] is None and record["resumed_from"] is None
    assert f"Pretraining on files {sources['data_files']} (1 files, 24 rows)" in caplog.text
    card = ModelCard.load(out / "README.md")
    assert f"| data | files {sources['data_files']} (1 files, 24 rows) |" in card.text
    assert card.data.datasets is None  # local files are not a Hub dataset


# Every recipe trains on the user's files end to end; three kinds in the default suite, the rest with -m slow.
QUICK_RECIPES = {"demo_fashion_mnist", "asym_moco_multicrop_r50", "ladder_byol_vits16"}
SHRUNK = ["--max_steps", "1", "--per_device_train_batch_size", "8", "--image_size", "32", "--multicrop_local_size", "16",
          "--asym_bn_source_batch", "8", "--dataloader_num_workers", "0", "--mixed_precision", "no", "--report_to",
          "none"]


@pytest.mark.parametrize("recipe", [pytest.param(path, marks=() if path.stem in QUICK_RECIPES else pytest.mark.slow)
                                    for path in RECIPES], ids=[path.stem for path in RECIPES])
def test_every_recipe_trains_on_the_users_files(recipe, sources, tmp_path):
    out = tmp_path / "out"
    run("--config", str(recipe), "--data_files", sources["data_files"], "--output_dir", str(out), *SHRUNK)
    record = json.loads((out / "training_run.json").read_text())
    assert (record["data"]["kind"], record["data"]["name"]) == ("files", sources["data_files"])
    assert f"| data | files {sources['data_files']}" in (out / "README.md").read_text()


def test_two_sources_at_one_level_are_an_error_naming_both(sources, tmp_path):
    recipe = tmp_path / "two.yaml"
    recipe.write_text(f"dataset_name: fashion_mnist\ntrain_dir: {sources['train_dir']}\n")
    with pytest.raises(ValueError, match=r"two.yaml's training data has two sources, `dataset_name` 'fashion_mnist' "
                                         r"and `train_dir`"):
        parse_pretraining_args(["--config", str(recipe)])
    with pytest.raises(ValueError, match="command line's training data has two sources, `train_dir`.* and `data_files`"):
        parse_pretraining_args(["--train_dir", sources["train_dir"], "--data_files", sources["data_files"]])
    with pytest.raises(ValueError, match="held-out data has two sources, `eval_dir`.* and `eval_data_files`"):
        parse_pretraining_args(["--data_files", sources["data_files"], "--eval_dir", sources["train_dir"],
                                "--eval_data_files", sources["data_files"]])


def test_the_online_knn_data_follows_the_same_rule(sources, tmp_path):
    recipe = tmp_path / "held_out.yaml"
    recipe.write_text("dataset_name: fashion_mnist\neval_split: test\nknn_bank_split: train[:100]\n")
    _, data_args, _ = parse_pretraining_args(["--config", str(recipe), "--eval_dir", sources["train_dir"]])
    assert (data_args.eval_split, data_args.eval_dir) == (None, sources["train_dir"])
    assert data_args.held_out().train_dir == sources["train_dir"]
    # The user's training data: the recipe's splits of its own dataset go with it.
    _, data_args, _ = parse_pretraining_args(["--config", str(recipe), "--data_files", sources["data_files"]])
    assert (data_args.eval_split, data_args.knn_bank_split) == (None, None)
    with pytest.raises(ValueError, match="needs held-out labelled data"):
        data_args.held_out()


@pytest.mark.parametrize("field", ["data_files", "eval_data_files"])
def test_data_files_say_what_they_accept(sources, field):
    def load(pattern: str):
        if field == "data_files":
            return load_raw_dataset(parse_pretraining_args(["--data_files", pattern])[1])
        return parse_pretraining_args(["--data_files", sources["data_files"], "--eval_data_files", pattern])[1].held_out()

    with pytest.raises(ValueError, match=f"`{field}` takes parquet or webdataset .tar files.*is a folder"):
        load(sources["train_dir"])
    with pytest.raises(ValueError, match=f"`{field}` takes parquet.*matches image files.*`train_dir` or `eval_dir`"):
        load(sources["train_dir"] + "/*/*.png")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        load(sources["train_dir"] + "/*.parquet")


@pytest.mark.parametrize("field", ["train_dir", "eval_dir"])
def test_a_missing_folder_says_it_does_not_exist(sources, tmp_path, field):
    with pytest.raises(FileNotFoundError, match=f"`{field}` '.*nowhere': the folder does not exist"):
        if field == "train_dir":
            load_raw_dataset(parse_pretraining_args(["--train_dir", str(tmp_path / "nowhere")])[1])
        else:
            parse_pretraining_args(["--data_files", sources["data_files"], "--eval_dir",
                                    str(tmp_path / "nowhere")])[1].held_out()


def test_a_second_run_into_a_used_folder_is_refused_and_overwrite_clears_it(sources, tmp_path):
    out = tmp_path / "out"
    run("--data_files", sources["data_files"], "--output_dir", str(out), "--max_steps", "3",
        "--checkpointing_steps", "2", *TINY)
    with pytest.raises(FileExistsError, match=r"holds an earlier run .*--overwrite_output_dir"):
        run("--data_files", sources["data_files"], "--output_dir", str(out), "--max_steps", "2", *TINY)
    run("--data_files", sources["data_files"], "--output_dir", str(out), "--max_steps", "2",
        "--overwrite_output_dir", "true", "--learning_rate", "0.1", *TINY)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2] and not (out / "checkpoint-2").exists()
    assert json.loads((out / "training_run.json").read_text())["base_learning_rate"] == 0.1


def test_a_resume_continues_only_the_same_unfinished_run(sources, tmp_path):
    out = tmp_path / "out"
    args = ["--data_files", sources["data_files"], "--output_dir", str(out), "--checkpointing_steps", "2", *TINY]
    run(*args, "--max_steps", "3")
    finished = load_file(out / "model.safetensors")
    with pytest.raises(ValueError, match="has finished .*nothing to resume"):
        run(*args, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match="has finished"):
        run(*args, "--max_steps", "1", "--resume_from_checkpoint", "latest")
    saved = load_file(out / "model.safetensors")
    assert all(saved[key].equal(finished[key]) for key in finished)  # never replaced by an older state

    killed_before_the_end(out)  # as a run killed after its checkpoint-2
    with pytest.raises(ValueError, match="checkpoint-2 is at step 2, beyond this run's 1 steps"):
        run(*args, "--max_steps", "1", "--resume_from_checkpoint", "latest")
    with pytest.raises(ValueError, match=r"other settings \(total_steps 3 -> 5, learning_rate"):
        run(*args, "--max_steps", "5", "--learning_rate", "0.5", "--resume_from_checkpoint", "latest")
    result = run(*args, "--max_steps", "3", "--resume_from_checkpoint", "latest")
    assert result.global_step == 3
    record = json.loads((out / "training_run.json").read_text())
    assert record["resumed_from"] == str(out / "checkpoint-2")
    assert f"| resumed from | `{out / 'checkpoint-2'}` |" in (out / "README.md").read_text()


def test_a_starting_model_must_be_an_hf_siamese_model(sources, tmp_path):
    out = tmp_path / "out"
    run("--data_files", sources["data_files"], "--output_dir", str(out), "--max_steps", "2", "--checkpointing_steps",
        "1", *TINY)
    export_timm(SiameseForPreTraining(tiny_config()), tmp_path / "timm")
    start = ["--data_files", sources["data_files"], "--max_steps", "1", "--report_to", "none"]
    with pytest.raises(ValueError, match=r"is a timm model \(resnet18\).*timm export is an output"):
        run(*start, "--output_dir", str(tmp_path / "a"), "--model_name_or_path", str(tmp_path / "timm"))
    with pytest.raises(ValueError, match=r"is a training checkpoint.*--resume_from_checkpoint .*checkpoint-1"):
        run(*start, "--output_dir", str(tmp_path / "b"), "--model_name_or_path", str(out / "checkpoint-1"))
    with pytest.raises(ValueError, match="has no config.json"):
        run(*start, "--output_dir", str(tmp_path / "c"), "--model_name_or_path", sources["train_dir"])
    with pytest.raises(ValueError, match=r"does not fit the model to train: \d+ missing keys"):
        run(*start, "--output_dir", str(tmp_path / "d"), "--model_name_or_path", str(out), "--framework", "byol",
            "--per_device_train_batch_size", "8")
    run(*start, "--output_dir", str(tmp_path / "e"), "--model_name_or_path", str(out), "--per_device_train_batch_size",
        "8", "--dataloader_num_workers", "0")
    assert json.loads((tmp_path / "e" / "training_run.json").read_text())["model_name_or_path"] == str(out)
    assert f"| started from | `{out}` |" in (tmp_path / "e" / "README.md").read_text()


def test_a_skipped_image_is_named_by_its_file_and_counted_once(sources, tmp_path, caplog):
    folder = tmp_path / "images" / "a"
    folder.mkdir(parents=True)
    for index, image in enumerate(structured_images(10)):
        image.save(folder / f"{index}.png")
    broken = folder / "broken.png"
    broken.write_bytes((folder / "0.png").read_bytes()[:40])  # a truncated file
    with caplog.at_level(logging.WARNING, logger="hf_siamese.data"):
        result = run("--train_dir", str(tmp_path / "images"), "--output_dir", str(tmp_path / "out"), "--max_steps",
                     "4", "--per_device_train_batch_size", "5", *TINY[:-8], "--report_to", "none",
                     "--dataloader_num_workers", "0", "--mixed_precision", "no")
    # 10 good images at batch 5: two batches an epoch, so the 4 steps read the broken file twice.
    assert result.skipped_images == 1
    assert caplog.text.count("Skipping undecodable image") == 1 and repr(str(broken)) in caplog.text


def test_push_to_hub_without_the_hub_fails_before_training(sources, tmp_path):
    with pytest.raises(RuntimeError, match="HF_HUB_OFFLINE is set.*`hf upload"):
        run("--data_files", sources["data_files"], "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
            "--push_to_hub", "true", *TINY)
    assert not (tmp_path / "out").exists()


def test_tracker_logs_go_beside_the_model_folder(sources, tmp_path):
    out = tmp_path / "out"
    run("--data_files", sources["data_files"], "--output_dir", str(out), "--max_steps", "2", *TINY[:-8],
        "--report_to", "tensorboard", "--per_device_train_batch_size", "8", "--dataloader_num_workers", "0",
        "--mixed_precision", "no")
    assert list((tmp_path / "out-logs").rglob("events.out.tfevents.*"))
    assert not list(out.rglob("events.out.tfevents.*"))


def test_a_shrunk_recipe_warns_about_what_no_longer_fits(sources, tmp_path, caplog):
    with caplog.at_level(logging.WARNING, logger="hf_siamese.training"):
        run("--data_files", sources["data_files"], "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
            "--warmup_steps", "5", "--multicrop", "true", "--multicrop_num_local", "2", "--multicrop_local_size", "40",
            *TINY)
    assert "warm-up (5 steps) is as long as the run (2 steps)" in caplog.text
    assert "local crops (multicrop_local_size 40) are larger than the global views (image_size 32)" in caplog.text


def test_list_fields_take_commas_and_misspelt_recipe_keys_get_a_suggestion(tmp_path):
    config, _, _ = parse_pretraining_args(["--ladder_levels", "1,2,3,4", "--image_mean", "0.5,0.4,0.3",
                                           "--dataset_name", "fashion_mnist"])
    assert list(config.ladder_levels) == [1, 2, 3, 4] and list(config.image_mean) == [0.5, 0.4, 0.3]
    recipe = tmp_path / "typo.yaml"
    recipe.write_text("warmup_epoch: 1\n")
    with pytest.raises(ValueError, match=r"warmup_epoch \(did you mean warmup_epochs\?\) in recipe"):
        parse_pretraining_args(["--config", str(recipe)])


def test_an_unknown_flag_or_a_bad_recipe_is_one_line():
    for argv, expected in ((["--lerning_rate", "0.1"], "did you mean --learning_rate?"),
                           (["--config", str(ROOT / "configs/demo_fashion_mnist.yaml"), "--dataset_name",
                             "fashion_mnist", "--data_files", "x.parquet"], "has two sources")):
        result = subprocess.run([sys.executable, str(ROOT / "run_pretraining.py"), *argv], capture_output=True,
                                text=True, timeout=300)
        assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
        assert expected in result.stderr
