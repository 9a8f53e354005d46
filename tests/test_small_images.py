"""The small-image track: the CIFAR-style ResNet stem, the one-channel view recipe and the validation split."""

import numpy as np
import pytest
import torch
from conftest import tiny_config
from isolation import run_without_hf_siamese
from PIL import Image
from test_fashion_mnist import write_idx
from transformers import AutoModel

import hf_siamese  # noqa: F401  (registers the Auto classes)
from hf_siamese import SiameseForPreTraining, SiameseModel
from hf_siamese.data import seeded_randomness
from hf_siamese.fashion_mnist import load_fashion_mnist
from hf_siamese.timm_export import export_timm
from hf_siamese.training import train
from hf_siamese.training_args import PretrainingArguments
from hf_siamese.views import MultiViewTransform, channel_stats, collate_views


def small_config(framework="byol", image_size=28, **overrides):
    return tiny_config(framework, small_image_stem=True, num_channels=1, image_size=image_size,
                       augmentation="small_gray", **overrides)


@pytest.mark.parametrize("size, sides", [(28, [28, 14, 7, 4]), (32, [32, 16, 8, 4])])
def test_the_small_stem_keeps_the_resolution_into_the_first_stage(size, sides):
    encoder = SiameseModel(small_config(image_size=size)).eval()
    output = encoder(torch.randn(2, 1, size, size), output_hidden_states=True)
    assert [tuple(h.shape[-2:]) for h in output.hidden_states] == [(side, side) for side in sides]
    assert [h.shape[1] for h in output.hidden_states] == [64, 128, 256, 512]
    imagenet = SiameseModel(tiny_config("byol", num_channels=1, image_size=size)).eval()
    assert imagenet(torch.randn(2, 1, size, size), output_hidden_states=True).hidden_states[0].shape[-1] == size // 4


def test_ladder_levels_and_the_dense_term_run_on_the_small_stem():
    config = small_config(ladder_levels=[1, 2, 3, 4], ladder_dense_weight=0.5)
    model = SiameseForPreTraining(config).train()
    transform = MultiViewTransform.from_config(config)
    images = [Image.fromarray(np.random.default_rng(i).integers(0, 255, (28, 28), np.uint8)) for i in range(4)]
    output = model(**collate_views([transform(image) for image in images]))
    assert sorted(output.level_losses) == [1, 2, 3, 4] and torch.isfinite(output.loss)
    output.loss.backward()


def test_a_small_stem_checkpoint_loads_with_automodel_and_remote_code(tmp_path):
    model = SiameseForPreTraining(small_config()).eval()
    model.save_pretrained(tmp_path / "ckpt")
    pixels = torch.randn(2, 1, 28, 28)
    torch.save(pixels, tmp_path / "pixels.pt")
    with torch.no_grad():
        expected = model.siamese(pixels).pooler_output
    torch.save(expected, tmp_path / "expected.pt")
    encoder = AutoModel.from_pretrained(tmp_path / "ckpt").eval()
    assert encoder.config.small_image_stem
    with torch.no_grad():
        assert torch.equal(encoder(pixels).pooler_output, expected)
    stdout = run_without_hf_siamese(
        f"""
        import torch
        from transformers import AutoModel
        encoder = AutoModel.from_pretrained({str(tmp_path / "ckpt")!r}, trust_remote_code=True).eval()
        assert encoder.backbone.conv1.stride == (1, 1), encoder.backbone.conv1
        pixels = torch.load({str(tmp_path / "pixels.pt")!r}, weights_only=True)
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=True)
        with torch.no_grad():
            assert torch.equal(encoder(pixels).pooler_output, expected)
        print("remote code OK")
        """,
        tmp_path,
    )
    assert "remote code OK" in stdout


def test_export_timm_refuses_the_small_stem_before_and_after_training(tmp_path):
    with pytest.raises(ValueError, match="small_image_stem.*not an architecture timm"):
        export_timm(SiameseModel(small_config()), tmp_path / "timm")
    assert not (tmp_path / "timm").exists()
    arguments = PretrainingArguments(output_dir=str(tmp_path / "run"), export_timm=str(tmp_path / "timm"))
    with pytest.raises(ValueError, match="small_image_stem"):
        train(small_config(), None, arguments)  # refused before any data is read
    assert not (tmp_path / "run").exists()


def test_the_small_stem_needs_a_resnet():
    with pytest.raises(ValueError, match="`small_image_stem`.*'vit_tiny_patch16_224'"):
        SiameseModel(tiny_config("byol", backbone="vit_tiny_patch16_224", small_image_stem=True))


def test_the_small_gray_recipe_views_shapes_ranges_and_seeding():
    config = small_config()
    transform = MultiViewTransform.from_config(config)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (28, 28), np.uint8))
    with seeded_randomness(1, 2, 3):
        views = transform(image)
    with seeded_randomness(1, 2, 3):
        again = transform(image)
    assert all(torch.equal(a, b) for a, b in zip(views["source_pixel_values"], again["source_pixel_values"]))
    (mean,), (std,) = channel_stats(1, None, None)
    for view in views["source_pixel_values"] + views.get("target_pixel_values", []):
        assert view.shape == (1, 28, 28) and view.dtype == torch.float32
        # Pixels in [0, 1], normalised: [-mean / std, (1 - mean) / std], both ends reached by the random image.
        assert view.min() >= -mean / std - 1e-5 and view.max() <= (1 - mean) / std + 1e-5
    steps = [type(step).__name__ for step in transform.global_source[0].photometric.transforms]
    assert "RandomGrayscale" not in steps  # nothing for it to do on one channel


def test_validation_split_is_disjoint_from_the_rest_and_together_the_training_split(tmp_path):
    rng = np.random.default_rng(0)
    images, labels = rng.integers(0, 255, (30, 28, 28), np.uint8), rng.integers(0, 10, 30, np.uint8)
    write_idx(tmp_path / "train-images-idx3-ubyte", images)
    write_idx(tmp_path / "train-labels-idx1-ubyte", labels)
    train_part, validation = load_fashion_mnist("train[:20]", tmp_path), load_fashion_mnist("train[20:]", tmp_path)
    assert (len(train_part), len(validation)) == (20, 10)
    pixels = [np.asarray(row["image"]) for part in (train_part, validation) for row in part]
    assert np.array_equal(np.stack(pixels), images)  # in order, each image exactly once
    assert [row["label"] for part in (train_part, validation) for row in part] == labels.tolist()


def test_the_online_knn_bank_comes_from_its_own_split(tmp_path, monkeypatch):
    import hf_siamese.fashion_mnist as fashion_mnist
    from accelerate import Accelerator

    from hf_siamese.data import DataArguments
    from hf_siamese.training import _online_knn

    rng = np.random.default_rng(1)
    write_idx(tmp_path / "train-images-idx3-ubyte", rng.integers(0, 255, (30, 28, 28), np.uint8))
    write_idx(tmp_path / "train-labels-idx1-ubyte", np.arange(30, dtype=np.uint8) % 10)
    monkeypatch.setattr(fashion_mnist, "FASHION_MNIST_DIR", tmp_path)
    data_args = DataArguments(dataset_name="fashion_mnist", split="train", knn_bank_split="train[:20]",
                              eval_split="train[20:]", knn_bank_size=100)
    online_knn = _online_knn(PretrainingArguments(eval_steps=1, report_to="none"), data_args, Accelerator(cpu=True))
    bank = {np.asarray(row["image"]).tobytes() for row in online_knn.bank}
    queries = {np.asarray(row["image"]).tobytes() for row in online_knn.queries}
    assert (len(bank), len(queries)) == (20, 10) and not bank & queries  # no query finds itself in the bank
