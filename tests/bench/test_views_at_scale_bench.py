"""bench/views_at_scale.py builds an ImageNet-like corpus, gives every pipeline the recipe's views, and resumes."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from bench.views_at_scale import (PHOTOGRAPHS, PIPELINES, RECIPES, Unavailable, batch_views, build_corpus, draw_image,
                                  main, make_loader, report)

VIEW_SIZES = {  # each recipe's views, largest first
    "mocov2": [224] * 2,
    "byol": [224] * 2,
    "multicrop": [224] * 2 + [96] * 6,
    "scalemix": [224] * 4,
    "meanenc": [224] * 3,
    "asymaug": [224] * 4,
}
LINE_KEYS = {"bench", "recipe", "pipeline", "workers", "host_ms_per_image", "images_per_s_per_core", "images_per_s",
             "repeats", "images", "ratio_to_official", "machine", "date", "torch", "torchvision"}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    return build_corpus(tmp_path_factory.mktemp("corpus"), 12, seed=0)


def test_the_corpus_is_imagenet_sized_jpegs_of_varied_quality_in_class_folders(corpus: Path):
    files = sorted(corpus.rglob("*.jpg"))
    assert len(files) == 12 and sorted(p.name for p in corpus.iterdir() if p.is_dir()) == sorted(PHOTOGRAPHS)
    tables = set()
    for file in files:
        with Image.open(file) as image:
            assert image.format == "JPEG" and image.mode == "RGB"
            long, short = max(image.size), min(image.size)
            assert 300 <= long <= 800 and 1 <= long / short <= 4 / 3 + 0.01
            tables.add(tuple(tuple(table) for table in image.quantization.values()))
            assert np.asarray(image).std() > 20  # a photograph, not a flat field
    assert len(tables) > 3  # qualities differ, in the files themselves
    qualities = [params["quality"] for params in json.loads((corpus / "corpus.json").read_text())["images"].values()]
    assert all(75 <= q <= 95 for q in qualities)


def test_the_size_distribution_has_imagenets_median_and_orientations():
    draws = [draw_image(np.random.default_rng([0, i]), (640, 427)) for i in range(400)]
    widths, heights = np.array([d["size"] for d in draws]).T
    assert abs(np.median(np.maximum(widths, heights)) - 500) < 15
    assert abs(np.median(np.minimum(widths, heights)) - 375) < 15
    assert 0.72 < np.mean(widths >= heights) < 0.88


def test_the_corpus_is_the_same_bytes_for_a_seed_and_a_prefix_for_fewer_images(tmp_path: Path, corpus: Path):
    again = build_corpus(tmp_path / "again", 12, seed=0)
    other = build_corpus(tmp_path / "other", 12, seed=1)
    for file in corpus.rglob("*.jpg"):
        assert (again / file.relative_to(corpus)).read_bytes() == file.read_bytes()
        assert (other / file.relative_to(corpus)).read_bytes() != file.read_bytes()
    build_corpus(again, 4, seed=0)  # shrinking the cached corpus keeps its first images and removes the rest
    assert sorted(p.name for p in again.rglob("*.jpg")) == ["00000.jpg", "00001.jpg", "00002.jpg", "00003.jpg"]


@pytest.mark.parametrize("recipe", list(RECIPES))
def test_every_pipeline_gives_the_recipes_views(recipe: str, corpus: Path):
    for name, build in PIPELINES.items():
        try:
            pipeline = build(recipe)
        except Unavailable as reason:
            assert (name, recipe) in {("lightly", "scalemix"), ("lightly", "asymaug")}
            continue
        batch = next(iter(make_loader(corpus, pipeline, batch=2, workers=0, seed=0)))
        if pipeline.finish is not None:  # the device side: uint8 views (and parameter rows) in, the model's views out
            assert all(v.dtype == torch.uint8 for v in batch_views(batch))
            batch = pipeline.finish(batch)
        views = batch_views(batch)
        assert sorted((v.shape[-1] for v in views), reverse=True) == VIEW_SIZES[recipe], name
        assert all(v.shape[:2] == (2, 3) and v.shape[-2] == v.shape[-1] for v in views), name
        if name == "floor":  # the crops alone: uint8, as they lie in memory
            assert all(v.dtype == torch.uint8 and v.is_contiguous(memory_format=torch.channels_last) for v in views)
            continue
        assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in views), name


def test_a_tiny_run_writes_its_lines_and_a_second_run_skips_them(tmp_path: Path, capsys):
    results = tmp_path / "results.jsonl"
    argv = ["--images", "6", "--repeats", "1", "--batch", "4", "--workers", "0,1", "--recipes", "mocov2,scalemix",
            "--results", str(results), "--corpus", str(tmp_path / "corpus")]
    threads = torch.get_num_threads()
    main(argv)
    assert torch.get_num_threads() == threads  # measuring on one thread leaves the caller's threads as they were
    lines = [json.loads(line) for line in results.read_text().splitlines()]
    assert capsys.readouterr().out.splitlines() == results.read_text().splitlines()
    cases = {(recipe, name, w) for recipe in ("mocov2", "scalemix") for name in PIPELINES for w in (0, 1)}
    assert {(r["recipe"], r["pipeline"], r["workers"]) for r in lines} == cases
    for line in lines:
        assert LINE_KEYS <= set(line) and line["bench"] == "views_at_scale" and line["images"] == 6
        if line["pipeline"] == "lightly" and line["recipe"] == "scalemix":
            assert line["host_ms_per_image"] is None and "ScaleMix" in line["skipped"]
            continue
        if line["pipeline"] in ("host", "device_split"):
            assert 0 < line["device_side_cpu_ms_per_image"] < line["host_and_device_cpu_ms_per_image"]
        assert line["host_ms_per_image"] > 0 and line["images_per_s"] > 0 and line["ratio_to_official"] > 0
        assert line["views_per_image"] == len(VIEW_SIZES[line["recipe"]])
    main(argv)
    assert capsys.readouterr().out == "" and len(results.read_text().splitlines()) == len(lines)
    assert report(str(results)).count("\n") == len(lines) + 1
