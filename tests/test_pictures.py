"""The probe's pictures: a nearest-neighbour gallery that shows the kNN probe's own neighbours, an embedding map,
both in the model card, and a probe that still finishes without matplotlib."""

import json
import logging
import sys

import pytest
import torch
import torch.nn.functional as F
from huggingface_hub import ModelCard
from PIL import Image
from test_linear_probe import data, model_dir  # noqa: F401 (fixtures)

import run_linear_probe
from hf_siamese.linear_probe import ProbeArguments, load_encoder
from hf_siamese.pictures import embedding_2d, gallery_queries
from hf_siamese.probing import extract_features


def probe_with_pictures(model_dir, data, *extra):
    run_linear_probe.main([
        "--model_name_or_path", str(model_dir), "--train_data_files", data["train"], "--eval_data_files",
        data["test"], "--num_train_epochs", "2", "--disable_tqdm", "true", *extra,
    ])
    return json.loads((model_dir / "eval_results.json").read_text())


def test_the_gallery_shows_the_knn_probes_neighbours_of_two_queries_per_class(model_dir, data):  # noqa: F811
    pictures = probe_with_pictures(model_dir, data)["pictures"]
    queries, neighbours = torch.tensor(pictures["gallery_queries"]), torch.tensor(pictures["gallery_neighbours"])
    args = ProbeArguments(model_name_or_path=str(model_dir), train_data_files=data["train"],
                          eval_data_files=data["test"])
    model, spec = load_encoder(args)
    train_raw, eval_raw = (datasets_split(data[split]) for split in ("train", "test"))
    train = extract_features(model, train_raw, progress=False, transform=spec.eval_transform(), input_spec=spec)
    test = extract_features(model, eval_raw, progress=False, transform=spec.eval_transform(), input_spec=spec)
    assert sorted(test.labels[queries].tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    similarity = F.normalize(test.features[queries], dim=1) @ F.normalize(train.features, dim=1).T
    assert torch.equal(neighbours, similarity.topk(8, dim=1).indices)  # the kNN probe's top-k, nearest first

    gallery = Image.open(model_dir / pictures["gallery"])
    assert gallery.size == (990, 1000)  # 1 + 8 columns of 1.1 in, 8 rows of 1.25 in, at 100 dpi
    embedding_map = Image.open(model_dir / pictures["embedding_map"])
    embedding_map.load()
    assert pictures["map_method"] == "t-SNE" and pictures["map_points"] == 24
    card_text = (model_dir / "README.md").read_text()
    assert f"]({pictures['gallery']})" in card_text and f"]({pictures['embedding_map']})" in card_text
    assert ModelCard.load(model_dir / "README.md").data.eval_results  # the front matter still parses


def datasets_split(path: str):
    import datasets

    return datasets.load_dataset("parquet", data_files=path, split="train")


def test_without_matplotlib_the_probe_finishes_and_says_why_there_are_no_pictures(model_dir, data, monkeypatch,  # noqa: F811
                                                                                caplog):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    with caplog.at_level(logging.WARNING):
        saved = probe_with_pictures(model_dir, data)
    assert "pictures" not in saved and saved["results"]
    assert "Pictures skipped: matplotlib is not installed" in caplog.text
    assert not (model_dir / "knn_gallery.png").exists()


def test_gallery_queries_are_seeded_and_balanced():
    labels = torch.arange(10).repeat(30)
    first, again = gallery_queries(labels, per_class=2, seed=3), gallery_queries(labels, per_class=2, seed=3)
    assert torch.equal(first, again) and torch.bincount(labels[first]).tolist() == [2] * 10
    assert not torch.equal(first, gallery_queries(labels, per_class=2, seed=4))


def test_the_map_falls_back_to_pca_without_scikit_learn_or_umap(monkeypatch):
    monkeypatch.setitem(sys.modules, "sklearn.manifold", None)
    monkeypatch.setitem(sys.modules, "umap", None)
    features = torch.randn(50, 16)
    points, method = embedding_2d(features)
    assert method == "PCA" and points.shape == (50, 2)
    centred = F.normalize(features, dim=1) - F.normalize(features, dim=1).mean(dim=0)
    variance_first_two = points.var(dim=0).sum()
    assert variance_first_two <= centred.var(dim=0).sum() + 1e-5
    assert variance_first_two >= torch.linalg.svdvals(centred)[:2].square().sum() / (len(features) - 1) - 1e-4
