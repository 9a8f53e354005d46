import io
import logging

import datasets
import pytest
import torch
from conftest import tiny_config
from images import structured_images

from hf_siamese import SiameseModel
from hf_siamese.metrics import classification_accuracy
from hf_siamese.probing import (
    Features,
    FrozenEncoderCheck,
    ProbeSchedule,
    SkippedImages,
    extract_features,
    fit_cached_probe,
    knn_classify,
    predict,
)


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


def test_extract_features_skips_undecodable_images_and_records_each_once(caplog):
    model = SiameseModel(tiny_config(num_channels=1))
    encoded = []
    for image in structured_images(4, size=28, mode="L"):
        encoded.append(io.BytesIO())
        image.save(encoded[-1], "PNG")
    images = [{"bytes": png.getvalue(), "path": None} for png in encoded]
    images.insert(2, {"bytes": b"not an image", "path": None})
    dataset = datasets.Dataset.from_dict(
        {"image": images, "label": [0, 1, 2, 3, 4]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    skipped = SkippedImages("eval")
    with caplog.at_level(logging.WARNING, logger="hf_siamese"):
        for _ in range(2):  # read twice, as the augmented protocol re-reads every epoch: one image, logged once
            result = extract_features(model, dataset, batch_size=2, progress=False, skipped=skipped)
    assert result.labels.tolist() == [0, 1, 3, 4] and len(result.features) == 4
    assert len(skipped) == 1 and skipped.by_row[2].where == "row 2"
    assert "UnidentifiedImageError" in skipped.by_row[2].reason
    assert [record.message for record in caplog.records if "undecodable" in record.message] == [
        f"Skipping an undecodable eval image (row 2): {skipped.by_row[2].reason}"]
    assert list(skipped.kept(dataset)["label"]) == [0, 1, 3, 4]  # row i of the kept rows is feature i
    with pytest.raises(ValueError, match="Every image of the probe data is undecodable \\(1 skipped\\)"):
        extract_features(model, dataset.select([2]), progress=False)


def test_extract_features_per_level():
    model = SiameseModel(tiny_config())
    dataset = datasets.Dataset.from_dict(
        {"image": structured_images(3), "label": [0, 1, 2]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    result = extract_features(model, dataset, progress=False, levels=[1, 2, 4])
    assert {level: tuple(f.shape) for level, f in result.levels.items()} == {1: (3, 64), 2: (3, 128), 4: (3, 512)}
    assert torch.allclose(result.levels[4], result.features, atol=1e-6)  # ResNet: last stage pooled = pooler


def test_extract_features_under_bf16_autocast_gives_float32_features_close_to_float32():
    model = SiameseModel(tiny_config())
    dataset = datasets.Dataset.from_dict(
        {"image": structured_images(4), "label": [0, 1, 2, 3]},
        features=datasets.Features({"image": datasets.Image(), "label": datasets.Value("int64")}),
    )
    full = extract_features(model, dataset, progress=False, levels=[2])
    half = extract_features(model, dataset, progress=False, levels=[2], mixed_precision="bf16")
    assert half.features.dtype == half.levels[2].dtype == torch.float32
    assert not torch.equal(half.features, full.features)  # autocast really ran the encoder in bf16
    relative = (half.features - full.features).norm(dim=1) / full.features.norm(dim=1)
    assert relative.max() < 0.05
    with pytest.raises(ValueError, match="`mixed_precision` must be one of"):
        extract_features(model, dataset, progress=False, mixed_precision="int8")


def test_linear_probe_learns_a_linearly_separable_problem():
    generator = torch.Generator().manual_seed(0)
    directions = torch.randn(4, 32, generator=generator)

    def sample(count):
        labels = torch.randint(0, 4, (count,), generator=generator)
        return Features(3 * directions[labels] + torch.randn(count, 32, generator=generator), labels)

    train, test = sample(400), sample(200)
    heads = fit_cached_probe(train, ["last"], 4, ProbeSchedule(epochs=20, batch_size=64, learning_rate=0.4),
                             progress=False)
    assert heads.linear("last").bias.abs().sum() > 0  # trained, not left at its zero init
    accuracy = classification_accuracy(predict(heads, test)["last"], test.labels)["top1"]
    assert accuracy >= 0.99


def test_probe_heads_start_at_n_0_01_with_zero_bias_from_the_schedules_seed():
    train = Features(torch.randn(10, 2048), torch.arange(10))
    heads = fit_cached_probe(train, ["last"], 1000, ProbeSchedule(epochs=1, learning_rate=0.0), progress=False)
    linear = heads.linear("last")
    assert linear.weight.std().item() == pytest.approx(0.01, rel=0.02) and linear.bias.abs().max() == 0
    torch.manual_seed(123)  # the global generator plays no part
    again = fit_cached_probe(train, ["last"], 1000, ProbeSchedule(epochs=1, learning_rate=0.0), progress=False)
    assert torch.equal(again.linear("last").weight, linear.weight)


def test_a_last_batch_of_one_example_is_merged_not_fed_alone_to_batchnorm():
    train = Features(torch.randn(17, 8), torch.arange(17) % 2)
    heads = fit_cached_probe(train, ["last"], 2, ProbeSchedule(epochs=2, batch_size=16), progress=False)
    assert heads.heads["last"][0].num_batches_tracked.item() == 2  # one batch of 17 per epoch
    with pytest.raises(ValueError, match="at least 2 training examples, got 1"):
        fit_cached_probe(Features(torch.randn(1, 8), torch.tensor([0])), ["last"], 2, ProbeSchedule(), progress=False)


def test_frozen_encoder_check_catches_a_changed_weight_or_bn_statistic():
    model = SiameseModel(tiny_config())
    check = FrozenEncoderCheck(model)
    model.eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 32, 32))
    check.verify(model)  # eval-mode forwards change nothing
    with torch.no_grad():
        model.backbone.conv1.weight[0, 0, 0, 0] += 1e-3
    with pytest.raises(RuntimeError, match="backbone.conv1.weight"):
        check.verify(model)

    model = SiameseModel(tiny_config())
    check = FrozenEncoderCheck(model)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 3, 32, 32))  # train-mode BN updates its running statistics
    with pytest.raises(RuntimeError, match="running_mean|running_var|num_batches_tracked"):
        check.verify(model)
