"""Ladder Siamese Network (Yoshihashi et al. 2022): a Siamese loss at every chosen backbone level."""

import pytest
import torch
from conftest import global_views, tiny_config
from test_designs import batch_for
from transformers import AutoModel

from hf_siamese import SiameseConfig, SiameseForPreTraining, SiameseModel


@pytest.mark.parametrize("framework", ["moco", "mocov3", "byol", "simsiam"])
def test_last_level_only_is_exactly_the_plain_framework(framework):
    torch.manual_seed(0)
    plain = SiameseForPreTraining(tiny_config(framework)).train()
    ladder = SiameseForPreTraining(tiny_config(framework, ladder_levels=[4], ladder_dense_weight=0.0)).train()
    assert plain.state_dict().keys() == ladder.state_dict().keys()
    ladder.load_state_dict(plain.state_dict())
    source, target = global_views(plain.config)
    plain_output, ladder_output = plain(source, target), ladder(source, target)
    assert torch.equal(plain_output.loss, ladder_output.loss)
    plain_output.loss.backward()
    ladder_output.loss.backward()
    for (name, a), b in zip(plain.named_parameters(), ladder.parameters()):
        assert (a.grad is None and b.grad is None) or torch.equal(a.grad, b.grad), name


def test_each_level_has_its_own_heads_with_the_stage_width():
    model = SiameseForPreTraining(tiny_config("byol", ladder_levels=[1, 2, 3, 4]))
    assert model.levels == [1, 2, 3, 4]
    widths = {level: heads.projector[0].in_features for level, heads in model.heads.items()}
    assert widths == {"1": 64, "2": 128, "3": 256, "4": 512}
    assert all(heads.predictor is not None and heads.target_projector is not None for heads in model.heads.values())


def test_level_loss_sends_gradients_only_to_the_stem_its_stages_and_its_head():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("byol", ladder_levels=[1, 2, 3, 4])).train()
    source, target = global_views(model.config)
    output = model(source, target)
    assert set(output.level_losses) == {1, 2, 3, 4}
    output.level_losses[2].backward()

    def has_grad(module):
        return any(p.grad is not None and p.grad.abs().sum() > 0 for p in module.parameters())

    backbone = model.siamese.backbone
    assert has_grad(backbone.conv1) and has_grad(backbone.layer1) and has_grad(backbone.layer2)
    assert not has_grad(backbone.layer3) and not has_grad(backbone.layer4)
    assert has_grad(model.heads["2"].projector) and has_grad(model.heads["2"].predictor)
    for other in (model.heads["1"].projector, model.heads["3"].projector, model.heads["4"].projector,
                  model.heads["4"].predictor):
        assert not has_grad(other)


def test_loss_is_the_weighted_sum_of_level_losses():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("simsiam", ladder_levels=[2, 4], ladder_weights=[0.5, 2.0])).eval()
    source, target = global_views(model.config)
    output = model(source, target)
    expected = 0.5 * output.level_losses[2] + 2.0 * output.level_losses[4]
    assert torch.allclose(output.loss, expected)


def test_every_level_target_head_follows_the_ema_and_gets_no_gradient():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("mocov3", ladder_levels=[1, 3, 4])).train()
    source, target = global_views(model.config)
    model(source, target).loss.backward()
    targets = [p for level in ("1", "3") for p in model.heads[level].target_projector.parameters()]
    sources = [p for level in ("1", "3") for p in model.heads[level].projector.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in targets)
    with torch.no_grad():
        for param in sources:
            param.add_(1.0)
    before = [p.clone() for p in targets]
    model.momentum_update(0.5)
    for after, old, source_param in zip(targets, before, sources):
        assert torch.allclose(after, 0.5 * old + 0.5 * source_param)


def test_moco_ladder_keeps_a_queue_per_level():
    model = SiameseForPreTraining(tiny_config("moco", queue_size=16, ladder_levels=[2, 4])).train()
    source, target = global_views(model.config)
    output = model(source, target)
    assert int(model.heads["4"].queue_ptr) == 8 and int(model.heads["2"].queue_ptr) == 8
    assert torch.allclose(model.heads["4"].queue[:8], output.target_embeddings[0])
    assert not torch.allclose(model.heads["2"].queue[:8], model.heads["4"].queue[:8])


def test_vit_ladder_with_cls_and_mean_pooling():
    for pooling in ("cls", "mean"):
        config = tiny_config("byol", backbone="vit_tiny_patch16_224", ladder_levels=[1, 2], ladder_vit_pooling=pooling)
        model = SiameseForPreTraining(config).train()
        source, target = global_views(model.config, batch_size=4)
        output = model(source, target)
        assert torch.isfinite(output.loss) and set(output.level_losses) == {1, 2}
        output.loss.backward()


def test_ladder_composes_with_multicrop_and_mean_encoding():
    config = tiny_config("byol", ladder_levels=[2, 3, 4], multicrop=True, multicrop_local_size=16,
                         multicrop_num_local=2, mean_encoding=True)
    model = SiameseForPreTraining(config).train()
    output = model(**batch_for(config, count=4))
    assert torch.isfinite(output.loss) and output.local_loss is not None
    output.loss.backward()


def test_ladder_checkpoint_round_trip_and_encoder_loading(tmp_path):
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("moco", queue_size=16, ladder_levels=[3, 4])).eval()
    model.save_pretrained(tmp_path)
    loaded = SiameseForPreTraining.from_pretrained(tmp_path).eval()
    for key, tensor in model.state_dict().items():
        assert torch.equal(tensor, loaded.state_dict()[key]), key
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(encoder, SiameseModel) and not info["unexpected_keys"] and not info["missing_keys"]


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"ladder_levels": [0, 4]}, "`ladder_levels`"),
        ({"ladder_levels": [3, 2, 4]}, "`ladder_levels`"),
        ({"ladder_levels": [1, 4], "ladder_weights": [1.0]}, "`ladder_weights`"),
        ({"ladder_vit_pooling": "max"}, "`ladder_vit_pooling`"),
        ({"ladder_dense_weight": -1.0}, "`ladder_dense_weight`"),
    ],
)
def test_invalid_ladder_config(fields, message):
    with pytest.raises(ValueError, match=message):
        SiameseConfig(**fields)


def test_ladder_must_end_at_the_last_level():
    with pytest.raises(ValueError, match=r"`ladder_levels` must end with the last level .* \(4\)"):
        SiameseForPreTraining(tiny_config("byol", ladder_levels=[1, 2]))


def dense_config(framework="byol", **fields):
    return tiny_config(framework, **{"ladder_levels": [2, 3, 4], "ladder_dense_weight": 0.5, **fields})


@pytest.mark.parametrize("framework", ["moco", "byol", "simsiam"])
def test_dense_term_adds_to_the_loss_and_trains_the_cell_heads(framework):
    config = dense_config(framework, **({"queue_size": 16} if framework == "moco" else {}))
    model = SiameseForPreTraining(config).train()
    batch = batch_for(config, count=4)
    assert len(batch["source_geometry"]) == len(batch["source_pixel_values"])
    output = model(**batch)
    assert output.dense_loss is not None and torch.isfinite(output.dense_loss)
    expected = output.global_loss + 0.5 * output.dense_loss
    assert torch.allclose(output.loss, expected)
    output.loss.backward()
    for heads in model.heads.values():
        assert all(p.grad is not None for p in heads.dense_projector.parameters())
        target_heads = heads.target_dense_projector
        assert (target_heads is None) == (framework == "simsiam")  # SimSiam's target heads are the source's
        assert target_heads is None or all(p.grad is None for p in target_heads.parameters())


def test_dense_target_heads_follow_the_ema():
    model = SiameseForPreTraining(dense_config("mocov3"))
    sources = [p for heads in model.heads.values() for p in heads.dense_projector.parameters()]
    targets = [p for heads in model.heads.values() for p in heads.target_dense_projector.parameters()]
    with torch.no_grad():
        for param in sources:
            param.add_(1.0)
    before = [p.clone() for p in targets]
    model.momentum_update(0.0)
    assert all(torch.equal(t, s) for t, s in zip(targets, sources))
    assert not all(torch.equal(t, b) for t, b in zip(targets, before))


def test_dense_term_pulls_matched_cells_together():
    """With identical views (same geometry), minimising the dense term alone makes matched cells agree."""
    torch.manual_seed(0)
    config = dense_config("simsiam", ladder_levels=[3, 4], ladder_weights=[1.0, 0.0])
    model = SiameseForPreTraining(config).train()
    view = torch.randn(8, 3, 32, 32)
    geometry = torch.tensor([[0.0, 0.0, 1.0, 1.0, 0.0]]).expand(8, 5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    losses = []
    for _ in range(15):
        output = model([view, view], [view, view], [geometry, geometry], [geometry, geometry])
        optimizer.zero_grad()
        output.dense_loss.backward()
        optimizer.step()
        losses.append(output.dense_loss.item())
    assert losses[-1] < losses[0]


def test_dense_needs_geometry_and_no_scalemix():
    model = SiameseForPreTraining(dense_config())
    source, target = global_views(model.config)
    with pytest.raises(ValueError, match="`source_geometry`"):
        model(source, target)
    with pytest.raises(ValueError, match="`ladder_dense_weight`.*ScaleMix"):
        dense_config(scalemix=True)


def test_dense_on_vit_and_with_mean_encoding():
    config = tiny_config("byol", backbone="vit_tiny_patch16_224", ladder_levels=[1, 2], ladder_dense_weight=1.0,
                         mean_encoding=True)
    model = SiameseForPreTraining(config).train()
    output = model(**batch_for(config, count=4))
    assert torch.isfinite(output.loss) and output.dense_loss is not None
    output.loss.backward()


def test_dense_checkpoint_loads_as_an_encoder(tmp_path):
    model = SiameseForPreTraining(dense_config())
    model.save_pretrained(tmp_path)
    encoder, info = AutoModel.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(encoder, SiameseModel) and not info["unexpected_keys"] and not info["missing_keys"]
