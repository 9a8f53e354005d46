"""The pretraining model's seams: one view layout read by transform, collate and model; one pass planner; the
per-view BatchNorms found once."""

import pytest
import torch
from conftest import tiny_config
from PIL import Image

from hf_siamese import SiameseForPreTraining
from hf_siamese.batchnorm import PerViewStatistics, ViewSyncBatchNorm
from hf_siamese.passes import ForwardPass, plan_source_passes, plan_target_passes
from hf_siamese.view_layout import ViewLayout, paired_group
from hf_siamese.views import MultiViewTransform, collate_views

DESIGNS = {  # fields -> (groups, target views drawn per image, recipe of each target view)
    "byol": ({}, 2, None),
    "moco": ({}, 1, [1]),
    "byol_mean_encoding": ({"mean_encoding": True, "mean_encoding_views": 3}, 2, [0, 0, 0, 1, 1, 1]),
    "byol_asym_aug": ({"asym_aug": True}, 2, [0, 1]),
    "byol_scalemix": ({"scalemix": True}, 2, [0, 1]),
    "moco_mean_encoding": ({"mean_encoding": True, "mean_encoding_views": 2}, 1, [1, 1]),
}


@pytest.mark.parametrize("design", list(DESIGNS))
def test_the_transform_draws_the_views_the_layout_names_and_the_model_takes_them(design):
    fields, num_groups, target_recipes = DESIGNS[design]
    framework = design.split("_")[0]
    config = tiny_config(framework, multicrop=True, multicrop_num_local=2, multicrop_local_size=16, **fields)
    layout = ViewLayout.from_config(config)
    assert layout.num_groups == num_groups == config.num_target_groups
    assert layout.draws_target_views == (target_recipes is not None)
    if layout.draws_target_views and not layout.shares_global_views:
        assert layout.target_recipes() == target_recipes
    transform = MultiViewTransform.from_config(config)
    batch = collate_views([transform(Image.new("RGB", (40, 40), (90, 30, 200))) for _ in range(4)])
    assert list(batch) == ["source_pixel_values", *(["target_pixel_values"] if target_recipes else [])]
    assert len(batch["source_pixel_values"]) == num_groups + 2
    views = layout.read(batch["source_pixel_values"], batch.get("target_pixel_values"), None, None)
    assert views.num_groups == num_groups and views.groups_are_sources == (target_recipes is None)
    output = SiameseForPreTraining(config).train()(**batch)
    assert torch.isfinite(output.loss) and len(output.target_embeddings) == num_groups


def test_each_global_view_predicts_the_other_views_target():
    assert [paired_group(direction, 2) for direction in range(2)] == [1, 0]
    assert paired_group(0, 1) == 0


def test_the_layout_refuses_inputs_that_do_not_fit_and_names_the_argument():
    layout = ViewLayout.from_config(tiny_config("moco"))
    with pytest.raises(ValueError, match="`target_pixel_values` is required"):
        layout.read(["view"], None, None, None)
    symmetric = ViewLayout.from_config(tiny_config("byol"))
    with pytest.raises(ValueError, match="needs at least 2 global view"):
        symmetric.read(["view"], None, None, None)
    with pytest.raises(ValueError, match="2 group\\(s\\) of equal size, got 3"):
        symmetric.read(["a", "b"], ["c", "d", "e"], None, None)
    dense = ViewLayout.from_config(tiny_config("byol", ladder_levels=[3, 4], ladder_dense_weight=1.0))
    with pytest.raises(ValueError, match="`source_geometry` and `target_geometry` are required"):
        dense.read(["a", "b"], None, None, None)


G, L = (3, 32, 32), (3, 16, 16)


@pytest.mark.parametrize("batched, joint_local, expected", [
    (True, False, [((0,), (1,)), ((2,), (3,))]),
    (False, False, [((0,),), ((1,),), ((2,),), ((3,),)]),
    (True, True, [((0,), (1,)), ((2, 3),)]),
    (False, True, [((0,),), ((1,),), ((2, 3),)]),
])
def test_source_views_of_one_size_share_a_pass_with_statistics_per_view(batched, joint_local, expected):
    plan = plan_source_passes([G, G, L, L], num_global=2, batched=batched, joint_local_bn=joint_local)
    assert [forward_pass.statistics for forward_pass in plan] == expected
    assert [view for forward_pass in plan for view in forward_pass.views] == [0, 1, 2, 3]


def test_a_global_view_of_another_size_gets_a_pass_of_its_own():
    plan = plan_source_passes([G, L, L], num_global=1, batched=True, joint_local_bn=False)
    assert plan == [ForwardPass(((0,),)), ForwardPass(((1,), (2,)))]


@pytest.mark.parametrize("batched, shuffled, shapes, expected", [
    (True, False, [G] * 4, [((0, 1), (2, 3))]),  # MeanEnc: a group's views are normalised together
    (True, True, [G] * 4, [((0, 1),), ((2, 3),)]),  # shuffling BN permutes each group's batch on its own
    (False, False, [G] * 4, [((0, 1),), ((2, 3),)]),
    (True, False, [G, G, L, L], [((0, 1),), ((2, 3),)]),  # groups of other sizes cannot share a pass
])
def test_target_groups_share_a_pass_only_when_alike(batched, shuffled, shapes, expected):
    plan = plan_target_passes([(0, 1), (2, 3)], shapes, batched=batched, shuffled=shuffled)
    assert [forward_pass.statistics for forward_pass in plan] == expected


def test_the_per_view_norms_are_found_once_and_again_after_a_sync_bn_conversion(monkeypatch):
    config = tiny_config("byol")
    model = SiameseForPreTraining(config).train()
    per_view = [module for module in model.modules() if isinstance(module, PerViewStatistics)]
    assert model.view_norms.norms == per_view and model.batches_views

    def no_search(self):
        raise AssertionError("a forward pass searched the module tree")

    views = [torch.randn(4, 3, 32, 32) for _ in range(2)]
    monkeypatch.setattr(torch.nn.Module, "modules", no_search)
    model(source_pixel_values=views)
    monkeypatch.undo()
    model.convert_sync_batchnorm()
    assert model.view_norms.norms == [module for module in model.modules() if isinstance(module, PerViewStatistics)]
    assert any(isinstance(norm, ViewSyncBatchNorm) for norm in model.view_norms.norms)
