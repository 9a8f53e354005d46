import pytest
from torch import nn

from hf_siamese import SiameseConfig
from hf_siamese.heads import build_predictor, build_projector


def layer_signature(head):
    """Each layer as a short tag: L(in,out,bias) / BN(affine) / R."""
    tags = []
    for layer in head:
        if isinstance(layer, nn.Linear):
            tags.append(f"L{layer.in_features},{layer.out_features}{'+b' if layer.bias is not None else ''}")
        elif isinstance(layer, nn.BatchNorm1d):
            tags.append("BN" if layer.affine else "BN-")
        elif isinstance(layer, nn.ReLU):
            tags.append("R")
    return tags


def test_moco_projector_is_asym_siam_bn_mlp_and_has_no_predictor():
    config = SiameseConfig(framework="moco")
    assert layer_signature(build_projector(config, 2048)) == [
        "L2048,2048", "BN", "R", "L2048,2048+b", "R", "L2048,128+b",
    ]
    assert build_predictor(config) is None


def test_mocov3_heads_have_no_bias_and_a_non_affine_output_bn():
    config = SiameseConfig(framework="mocov3")
    assert layer_signature(build_projector(config, 2048)) == ["L2048,4096", "BN", "R", "L4096,256", "BN-"]
    assert layer_signature(build_predictor(config)) == ["L256,4096", "BN", "R", "L4096,256"]


def test_byol_heads():
    config = SiameseConfig(framework="byol")
    assert layer_signature(build_projector(config, 2048)) == ["L2048,4096", "BN", "R", "L4096,256+b"]
    assert layer_signature(build_predictor(config)) == ["L256,4096", "BN", "R", "L4096,256+b"]


def test_simsiam_heads():
    config = SiameseConfig(framework="simsiam")
    assert layer_signature(build_projector(config, 2048)) == [
        "L2048,2048", "BN", "R", "L2048,2048", "BN", "R", "L2048,2048", "BN-",
    ]
    assert layer_signature(build_predictor(config)) == ["L2048,512", "BN", "R", "L512,2048+b"]


def test_projector_input_width_follows_the_backbone():
    config = SiameseConfig(framework="byol", backbone="resnet18")
    assert build_projector(config, 512)[0].in_features == 512


# Captured from the heads before the framework table existed: projector 16 -> 8 -> (8 ->) 4, predictor 4 -> 6 -> 4.
HEADS_BEFORE_THE_TABLE = {
    "moco": (["L16,8", "BN", "R", "L8,8+b", "R", "L8,4+b"], ["L4,6", "BN", "R", "L6,4+b"]),
    "mocov3": (["L16,8", "BN", "R", "L8,4", "BN-"], ["L4,6", "BN", "R", "L6,4"]),
    "byol": (["L16,8", "BN", "R", "L8,4+b"], ["L4,6", "BN", "R", "L6,4+b"]),
    "simsiam": (["L16,8", "BN", "R", "L8,8", "BN", "R", "L8,4", "BN-"], ["L4,6", "BN", "R", "L6,4+b"]),
}


@pytest.mark.parametrize("framework", list(HEADS_BEFORE_THE_TABLE))
def test_each_frameworks_heads_keep_their_layout(framework):
    config = SiameseConfig(framework=framework, backbone="resnet18", projector_hidden_dim=8, projector_dim=4,
                           predictor_num_layers=2, predictor_hidden_dim=6)
    projector, predictor = HEADS_BEFORE_THE_TABLE[framework]
    assert layer_signature(build_projector(config, 16)) == projector
    assert layer_signature(build_predictor(config)) == predictor
