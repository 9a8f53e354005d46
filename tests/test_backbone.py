"""Any hf_siamese directory as a transformers backbone: stage maps and channels, out_features / out_indices, the
source encoder's weights (never the target's), and transformers' own UperNet and DETR heads around it."""

import json
from pathlib import Path

import pytest
import torch
from conftest import TINY_VIT, global_views, tiny_config
from transformers import (
    AutoBackbone,
    AutoConfig,
    DetrConfig,
    DetrForObjectDetection,
    UperNetConfig,
    UperNetForSemanticSegmentation,
)

from hf_siamese import (
    SiameseBackbone,
    SiameseConfig,
    SiameseForImageClassification,
    SiameseForPreTraining,
    SiameseModel,
    load_backbone_weights,
)

LEGACY = Path(__file__).parent / "fixtures/legacy_layout/byol_ladder_dense"
RESNET_STAGES = ["stem", "stage1", "stage2", "stage3", "stage4"]


def feature_shapes(backbone: SiameseBackbone, side: int) -> list[tuple[int, int, int]]:
    pixels = torch.randn(2, backbone.config.num_channels, side, side)
    with torch.no_grad():
        return [tuple(feature_map.shape[1:]) for feature_map in backbone.eval()(pixels).feature_maps]


@pytest.mark.parametrize(
    "overrides, side, widths, sides",
    [
        ({}, 32, [64, 64, 128, 256, 512], [16, 8, 4, 2, 1]),  # ImageNet stem: stride 2, then max-pool
        ({"small_image_stem": True, "num_channels": 1, "image_size": 28}, 28, [64, 64, 128, 256, 512],
         [28, 28, 14, 7, 4]),
        ({"small_image_stem": True, "backbone_kwargs": {"channels": [8, 16, 32, 64], "layers": [1, 1, 1, 1]}}, 32,
         [64, 8, 16, 32, 64], [32, 32, 16, 8, 4]),
    ],
    ids=["imagenet_stem", "small_image_stem", "backbone_kwargs_widths"],
)
def test_resnet_stage_maps_and_channels(overrides, side, widths, sides):
    backbone = SiameseBackbone(tiny_config(out_features=RESNET_STAGES, **overrides))
    assert backbone.stage_names == RESNET_STAGES and backbone.channels == widths
    assert feature_shapes(backbone, side) == [(width, s, s) for width, s in zip(widths, sides)]


def test_vit_blocks_are_maps_on_the_patch_grid():
    backbone = SiameseBackbone(tiny_config(backbone="vit_small_patch16_224", out_indices=[0, 1]))
    assert backbone.stage_names == ["block1", "block2"] and backbone.out_features == ["block1", "block2"]
    assert backbone.channels == [TINY_VIT["embed_dim"]] * 2
    assert feature_shapes(backbone, 32) == [(48, 4, 4)] * 2  # 32 px / 8 px patches, class token dropped
    encoder = SiameseModel(backbone.config).eval()
    encoder.load_state_dict(backbone.state_dict())
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        tokens = encoder(pixels, output_hidden_states=True).hidden_states[-1][:, 1:]
        assert torch.allclose(backbone(pixels).feature_maps[-1].flatten(2).transpose(1, 2), tokens, atol=1e-6)


def test_a_vit_backbone_takes_images_of_another_size_than_it_was_trained_at():
    # Dense heads feed their own sizes: the position embedding is interpolated, the weights are the encoder's.
    backbone = SiameseBackbone(tiny_config(backbone="vit_small_patch16_224", out_indices=[1]))
    assert SiameseModel(backbone.config).state_dict().keys() >= backbone.state_dict().keys()
    assert feature_shapes(backbone, 64) == [(48, 8, 8)] and feature_shapes(backbone, 40) == [(48, 5, 5)]


def test_resnet_stage_maps_are_the_encoders_hidden_states_and_return_dict_as_resnet_backbone():
    backbone = AutoBackbone.from_config(tiny_config(out_features=["stage2", "stage4"])).eval()
    assert isinstance(backbone, SiameseBackbone)
    encoder = SiameseModel(backbone.config).eval()
    backbone.load_state_dict(encoder.state_dict())  # one weight layout: every key in place
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        stages = encoder(pixels, output_hidden_states=True).hidden_states
        output = backbone(pixels)
        assert output.hidden_states is None and len(output.feature_maps) == 2
        assert all(torch.equal(a, b) for a, b in zip(output.feature_maps, (stages[1], stages[3])))
        feature_maps, hidden_states = backbone(pixels, output_hidden_states=True, return_dict=False)
        assert len(hidden_states) == 5 and all(torch.equal(a, b) for a, b in zip(hidden_states[1:], stages))
        assert len(backbone(pixels, return_dict=False)) == 1


def test_out_features_and_out_indices_follow_each_other():
    assert (tiny_config().out_features, tiny_config().out_indices) == (["stage4"], [4])  # the last stage
    assert tiny_config(out_indices=[1, 3]).out_features == ["stage1", "stage3"]
    assert tiny_config(out_features=["stem", "stage4"]).out_indices == [0, 4]
    backbone = SiameseBackbone(tiny_config())
    backbone.out_features = ["stage2", "stage3"]
    assert backbone.out_indices == [2, 3] and backbone.channels == [128, 256]


@pytest.mark.parametrize(
    "fields",
    [
        {"out_features": ["stage5"]},
        {"out_features": ["block1"]},
        {"out_features": ["stage3", "stage1"]},
        {"out_indices": [7]},
        {"out_features": ["stage1"], "out_indices": [2]},
    ],
    ids=["unknown", "a_vit_name_on_a_resnet", "out_of_order", "index_out_of_range", "disagreeing"],
)
def test_unknown_or_inconsistent_stages_raise(fields):
    with pytest.raises(ValueError, match="out_features|out_indices"):
        tiny_config(**fields)


def test_backbone_kwargs_the_model_does_not_take_raise_naming_the_field():
    with pytest.raises(ValueError, match="`backbone_kwargs`"):
        SiameseConfig(backbone="resnet18", backbone_kwargs={"depth": 3})


def test_configs_round_trip_and_configs_without_backbone_fields_load(tmp_path):
    config = tiny_config(backbone="vit_small_patch16_224", out_features=["block1"])
    config.save_pretrained(tmp_path)
    loaded = AutoConfig.from_pretrained(tmp_path)
    assert (loaded.stage_names, loaded.out_features, loaded.out_indices) == (["block1", "block2"], ["block1"], [0])
    assert AutoConfig.from_pretrained(tmp_path, out_features=["block2"]).out_indices == [1]
    assert "out_features" not in json.loads((LEGACY / "config.json").read_text())
    old = AutoConfig.from_pretrained(LEGACY)
    assert (old.stage_names, old.out_features, old.out_indices) == (RESNET_STAGES, ["stage4"], [4])


@pytest.fixture(scope="module")
def pretraining_dir(tmp_path_factory) -> Path:
    """A pretraining save whose target encoder differs from the source in every tensor (BN statistics too)."""
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("byol")).train()
    model(*global_views(model.config)).loss.backward()  # moves the source's BN statistics
    with torch.no_grad():
        for tensor in model.target_encoder.state_dict().values():
            tensor.add_(1)
    directory = tmp_path_factory.mktemp("pretraining")
    model.save_pretrained(directory)
    return directory


def holds(module: torch.nn.Module, state: dict[str, torch.Tensor]) -> bool:
    own = module.state_dict()
    return all(torch.equal(own[key], tensor) for key, tensor in state.items())


def source_and_target(directory: Path) -> tuple[dict, dict]:
    model = SiameseForPreTraining.from_pretrained(directory)
    return model.siamese.state_dict(), model.target_encoder.state_dict()


def assert_is_the_source(backbone: torch.nn.Module, source: dict, target: dict) -> None:
    state = backbone.state_dict()
    assert {key for key in state if not key.endswith("num_batches_tracked")} <= source.keys()
    for key, tensor in state.items():
        assert torch.equal(tensor, source[key]), key
        assert key.endswith("num_batches_tracked") or not torch.equal(tensor, target[key]), key


def test_a_pretraining_directory_loads_its_source_encoder_never_its_target(pretraining_dir):
    source, target = source_and_target(pretraining_dir)
    backbone, info = SiameseBackbone.from_pretrained(pretraining_dir, out_features=RESNET_STAGES[1:],
                                                     output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert backbone.out_features == RESNET_STAGES[1:] and backbone.state_dict().keys() == source.keys()
    assert_is_the_source(backbone, source, target)


def test_encoder_and_classifier_saves_and_an_old_layout_directory_load_too(tmp_path):
    encoder = SiameseModel(tiny_config())
    encoder.save_pretrained(tmp_path / "encoder")
    backbone = SiameseBackbone.from_pretrained(tmp_path / "encoder")
    assert holds(backbone, encoder.state_dict())
    classifier = SiameseForImageClassification(tiny_config(num_labels=3))
    classifier.save_pretrained(tmp_path / "classifier")
    backbone, info = SiameseBackbone.from_pretrained(tmp_path / "classifier", output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert holds(backbone, classifier.siamese.state_dict())
    backbone, info = SiameseBackbone.from_pretrained(LEGACY, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert backbone.channels == [8]  # stage4 of channels [4, 8, 8, 8]


def upernet_for(directory: Path) -> UperNetForSemanticSegmentation:
    backbone_config = AutoConfig.from_pretrained(directory, out_features=RESNET_STAGES[1:])
    return UperNetForSemanticSegmentation(UperNetConfig(backbone_config=backbone_config, num_labels=3,
                                                        hidden_size=16, auxiliary_channels=8))


def detr_for(directory: Path) -> DetrForObjectDetection:
    backbone_config = AutoConfig.from_pretrained(directory, out_features=["stage4"])
    return DetrForObjectDetection(DetrConfig(
        backbone_config=backbone_config, use_pretrained_backbone=False, num_queries=5, d_model=32, encoder_layers=1,
        decoder_layers=1, encoder_ffn_dim=32, decoder_ffn_dim=32, encoder_attention_heads=2,
        decoder_attention_heads=2, num_labels=3))


def train_one_step(model: torch.nn.Module, pixels: torch.Tensor, labels) -> None:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss = model.train()(pixel_values=pixels, labels=labels).loss
    assert torch.isfinite(loss)
    loss.backward()
    optimizer.step()


def box_labels(batch_size: int) -> list[dict[str, torch.Tensor]]:
    return [{"class_labels": torch.tensor([1, 2]), "boxes": torch.tensor([[0.3, 0.3, 0.2, 0.2], [0.7, 0.6, 0.3, 0.4]])}
            for _ in range(batch_size)]


@pytest.mark.parametrize(
    "build, labels, outputs",
    [
        (upernet_for, lambda: torch.randint(0, 3, (2, 32, 32)), ["logits"]),
        (detr_for, lambda: box_labels(2), ["logits", "pred_boxes"]),
    ],
    ids=["upernet", "detr"],
)
def test_transformers_dense_heads_train_and_round_trip_with_the_pretrained_encoder(
        build, labels, outputs, pretraining_dir, tmp_path):
    source, target = source_and_target(pretraining_dir)
    head = build(pretraining_dir)
    assert load_backbone_weights(head, pretraining_dir) > 0
    backbone = next(module for module in head.modules() if isinstance(module, SiameseBackbone))
    assert_is_the_source(backbone, source, target)
    pixels = torch.randn(2, 3, 32, 32)
    train_one_step(head, pixels, labels())
    head.save_pretrained(tmp_path)
    loaded, info = type(head).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    loaded.eval()
    with torch.no_grad():
        expected, again = head.eval()(pixel_values=pixels), loaded(pixel_values=pixels)
    for name in outputs:
        assert torch.equal(expected[name], again[name]), name


def test_load_backbone_weights_refuses_an_encoder_of_other_widths_naming_keys_and_loads_nothing(
        pretraining_dir, tmp_path):
    narrow = tmp_path / "narrow"
    SiameseModel(tiny_config(backbone_kwargs={"channels": [8, 16, 32, 64]})).save_pretrained(narrow)
    head = upernet_for(pretraining_dir)
    before = {key: tensor.clone() for key, tensor in head.backbone.state_dict().items()}
    with pytest.raises(ValueError, match=r"shape mismatch: .*backbone\.layer1\.0\.conv1\.weight \(8, 64, 3, 3\)"):
        load_backbone_weights(head, narrow)
    assert holds(head.backbone, before)


def test_load_backbone_weights_refuses_missing_blocks_and_a_head_without_a_siamese_backbone(pretraining_dir, tmp_path):
    shallow = tmp_path / "shallow"
    SiameseModel(tiny_config(backbone_kwargs={"layers": [1, 1, 1, 1]})).save_pretrained(shallow)
    with pytest.raises(ValueError, match=r"missing: backbone\.layer1\.1\."):
        load_backbone_weights(upernet_for(pretraining_dir), shallow)
    with pytest.raises(ValueError, match="holds 0 SiameseBackbone"):
        load_backbone_weights(torch.nn.Linear(2, 2), pretraining_dir)


def test_gradient_checkpointing_reaches_the_timm_model():
    backbone = SiameseBackbone(tiny_config())
    backbone.activation_checkpointing_enable()
    assert backbone.backbone.grad_checkpointing
