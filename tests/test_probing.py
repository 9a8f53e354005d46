import datasets
import pytest
import torch
from conftest import tiny_config
from images import structured_images

from hf_siamese import SiameseModel
from hf_siamese.probing import Features, extract_features, knn_classify


def test_knn_separates_two_clusters():
    torch.manual_seed(0)
    centres = torch.tensor([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    train = Features(torch.cat([centres[0] + 0.1 * torch.randn(20, 3), centres[1] + 0.1 * torch.randn(20, 3)]),
                     torch.tensor([0] * 20 + [1] * 20))
    queries = torch.cat([centres[0] + 0.1 * torch.randn(10, 3), centres[1] + 0.1 * torch.randn(10, 3)])
    assert knn_classify(train, queries, k=5).tolist() == [0] * 10 + [1] * 10


def test_knn_weights_votes_by_similarity():
    # Two neighbours of class 1 slightly less similar than one of class 0: unweighted majority would say 1,
    # but exp(sim / T) with a small T lets the closest neighbour win; a large T gives the majority.
    train = Features(torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.8, -0.6]]), torch.tensor([0, 1, 1]))
    query = torch.tensor([[1.0, 0.0]])
    assert knn_classify(train, query, k=3, temperature=0.01).tolist() == [0]
    assert knn_classify(train, query, k=3, temperature=100.0).tolist() == [1]


def test_knn_tie_between_equally_similar_neighbours_goes_to_the_lower_label():
    train = Features(torch.tensor([[0.0, 1.0], [0.0, -1.0]]), torch.tensor([1, 0]))
    assert knn_classify(train, torch.tensor([[1.0, 0.0]]), k=2).tolist() == [0]


def test_extract_features_from_a_dataset():
    model = SiameseModel(tiny_config(num_channels=1))
    dataset = datasets.Dataset.from_dict(
        {"image": structured_images(5, size=28, mode="L"), "label": [0, 1, 2, 3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    result = extract_features(model, dataset, batch_size=2, progress=False)
    assert result.features.shape == (5, 512) and result.labels.tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="`label_column` 'target'"):
        extract_features(model, dataset, label_column="target", progress=False)


def test_extract_features_per_level():
    model = SiameseModel(tiny_config())
    dataset = datasets.Dataset.from_dict(
        {"image": structured_images(3), "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    result = extract_features(model, dataset, progress=False, levels=[1, 2, 4])
    assert {level: tuple(f.shape) for level, f in result.levels.items()} == {1: (3, 64), 2: (3, 128), 4: (3, 512)}
    assert torch.allclose(result.levels[4], result.features, atol=1e-6)  # ResNet: last stage pooled = pooler
