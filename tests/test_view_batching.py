"""Views of one size in one forward pass, BatchNorm statistics per view: equal to one forward per view."""

import pytest
import torch
import torch.nn.functional as F
from conftest import FRAMEWORK_NAMES, batched_against_separate, design_views, tiny_config
from torch import nn

from hf_siamese import SiameseForPreTraining
from hf_siamese.batchnorm import ViewBatchNorm1d, ViewBatchNorm2d, views_in_batch

DESIGNS = {
    "base": {},
    "multicrop": {"multicrop": True, "multicrop_num_local": 3, "multicrop_local_size": 16},
    "mean_encoding": {"mean_encoding": True, "mean_encoding_views": 2},
    "ladder": {"ladder_levels": [2, 4]},
}


NORM_CASES = {  # (per-view class, plain class, input shape, keyword arguments, dtype, memory format)
    "2d": (ViewBatchNorm2d, nn.BatchNorm2d, (12, 5, 3, 3), {}, torch.float32, torch.contiguous_format),
    "2d_cumulative": (ViewBatchNorm2d, nn.BatchNorm2d, (12, 5, 3, 3), {"momentum": None}, torch.float32,
                      torch.contiguous_format),
    "2d_channels_last_bf16": (ViewBatchNorm2d, nn.BatchNorm2d, (12, 5, 3, 3), {}, torch.bfloat16, torch.channels_last),
    "2d_no_affine_no_stats": (ViewBatchNorm2d, nn.BatchNorm2d, (12, 5, 3, 3),
                              {"affine": False, "track_running_stats": False}, torch.float32, torch.contiguous_format),
    "1d": (ViewBatchNorm1d, nn.BatchNorm1d, (12, 5), {}, torch.float32, torch.contiguous_format),
    "1d_sequence": (ViewBatchNorm1d, nn.BatchNorm1d, (12, 5, 4), {"affine": False}, torch.float32,
                    torch.contiguous_format),
}


@pytest.mark.parametrize("case", list(NORM_CASES))
def test_per_view_batch_norm_equals_a_batch_norm_per_chunk(case):
    kind, plain, shape, kwargs, dtype, memory_format = NORM_CASES[case]
    torch.manual_seed(0)
    features = (torch.randn(shape) * 3 + 1).to(dtype).contiguous(memory_format=memory_format).requires_grad_()
    per_view, separate = kind(5, **kwargs).train(), plain(5, **kwargs).train()
    if per_view.affine:
        with torch.no_grad():
            for norm in (per_view, separate):
                norm.weight.copy_(torch.linspace(0.5, 1.5, 5))
                norm.bias.copy_(torch.linspace(-1, 1, 5))
    with views_in_batch([per_view], 3):
        output = per_view(features)
    expected = torch.cat([separate(chunk) for chunk in features.chunk(3)])
    tolerance = 1e-2 if dtype == torch.bfloat16 else 1e-5
    assert torch.allclose(output.float(), expected.float(), atol=tolerance)
    upstream = torch.randn(output.shape).to(dtype).transpose(0, 1).contiguous().transpose(0, 1)  # not contiguous
    inputs = [features, *([per_view.weight, per_view.bias] if per_view.affine else [])]
    expected_inputs = [features, *([separate.weight, separate.bias] if separate.affine else [])]
    grads = torch.autograd.grad((output * upstream).float().sum(), inputs)
    expected_grads = torch.autograd.grad((expected * upstream).float().sum(), expected_inputs)
    assert all(torch.allclose(g.float(), e.float(), atol=tolerance * 10) for g, e in zip(grads, expected_grads))
    if per_view.track_running_stats:
        assert torch.allclose(per_view.running_mean, separate.running_mean, atol=1e-6)
        assert torch.allclose(per_view.running_var, separate.running_var, atol=1e-5)
        assert int(per_view.num_batches_tracked) == 3
    assert per_view.num_views == 1  # reset after the block
    joint = plain(5, **kwargs).train()(features)
    assert not torch.allclose(output.float(), joint.float(), atol=1e-2)


def test_per_view_batch_norm_refuses_a_view_of_one_value_per_channel():
    norm = ViewBatchNorm1d(4).train()
    with views_in_batch([norm], 3), pytest.raises(ValueError, match="more than 1 value per channel"):
        norm(torch.randn(3, 4))


def test_per_view_batch_norm_in_eval_uses_running_statistics_and_refuses_uneven_views():
    norm = ViewBatchNorm1d(4).eval()
    features = torch.randn(6, 4)
    with views_in_batch([norm], 3):
        assert torch.allclose(norm(features), F.batch_norm(features, norm.running_mean, norm.running_var,
                                                           norm.weight, norm.bias, eps=norm.eps))
    with views_in_batch([norm.train()], 4), pytest.raises(ValueError, match="6 does not split into 4 views"):
        norm(features)


def test_every_batch_norm_of_the_pretraining_model_is_per_view_and_keeps_its_initialisation():
    model = SiameseForPreTraining(tiny_config("byol"))
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) in (ViewBatchNorm1d, ViewBatchNorm2d) for m in norms)
    # timm zero-initialises the last BN of each residual branch; the swap must not undo it.
    assert model.siamese.backbone.layer1[0].bn2.weight.abs().max() == 0


@pytest.mark.parametrize("design", list(DESIGNS))
@pytest.mark.parametrize("framework", FRAMEWORK_NAMES)
def test_batched_views_equal_one_forward_per_view(framework, design):
    config = tiny_config(framework, **DESIGNS[design])
    source, target = design_views(config)
    differences = batched_against_separate(framework, source, target, **DESIGNS[design])
    assert differences["gradients_missing"] == 0
    assert differences["loss"] < 1e-5 and differences["gradients"] < 1e-5 and differences["buffers"] < 1e-5, differences


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_batched_views_equal_one_forward_per_view_with_asym_bn(framework):
    overrides = {"asym_bn": True, "asym_bn_source_batch": 4, **DESIGNS["multicrop"]}
    source, target = design_views(tiny_config(framework, **overrides))
    differences = batched_against_separate(framework, source, target, **overrides)
    assert max(differences.values()) < 1e-5, differences


def test_batched_views_equal_one_forward_per_view_on_a_vit():
    overrides = {"backbone": "vit_tiny_patch16_224", **DESIGNS["multicrop"], "ladder_levels": [1, 2]}
    source, target = design_views(tiny_config("mocov3", **overrides))
    differences = batched_against_separate("mocov3", source, target, **overrides)
    assert max(differences.values()) < 1e-5, differences


def test_multicrop_normalises_each_local_crop_unless_asked_to_normalise_them_jointly():
    overrides = DESIGNS["multicrop"]
    source, target = design_views(tiny_config("moco", **overrides))
    losses = {}
    for joint in (False, True):
        torch.manual_seed(0)
        model = SiameseForPreTraining(tiny_config("moco", multicrop_joint_bn=joint, **overrides)).train()
        output = model(source, target)
        losses[joint] = (output.global_loss.item(), output.local_loss.item())
    assert losses[False][0] == pytest.approx(losses[True][0], rel=1e-6)  # the global view is alone either way
    assert losses[False][1] != pytest.approx(losses[True][1], rel=1e-4)
