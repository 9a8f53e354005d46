"""The five asymmetric designs at the model level, and the variance monitor."""

import os
import socket
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn.functional as F
from conftest import tiny_config
from images import structured_images, textured_images
from torch import nn

from hf_siamese import SiameseForPreTraining
from hf_siamese.batchnorm import GhostBatchNorm1d, TargetSyncBatchNorm1d
from hf_siamese.variance import VarianceMonitor, view_variance
from hf_siamese.views import MultiViewTransform, collate_views


def batch_for(config, count=8, seed=0):
    torch.manual_seed(seed)
    transform = MultiViewTransform.from_config(config)
    return collate_views([transform(image) for image in structured_images(count, seed=seed)])


@pytest.mark.parametrize("framework", ["moco", "byol"])
def test_multicrop_loss_is_global_plus_mean_of_local_terms(framework):
    config = tiny_config(framework, multicrop=True, multicrop_local_size=16, multicrop_num_local=3)
    model = SiameseForPreTraining(config).eval()
    batch = batch_for(config)
    output = model(**batch)
    predictions, targets = output.source_predictions, output.target_embeddings
    negatives = model.heads["4"].queue if config.queue_size else None

    def term(p, t):
        return model.criterion(p, t, negatives) if negatives is not None else model.criterion(p, t)

    directions = config.num_target_groups
    expected_global = sum(term(predictions[d], targets[directions - 1 - d]) for d in range(directions))
    expected_local = sum(
        torch.stack([term(p, targets[directions - 1 - d]) for p in predictions[directions:]]).mean()
        for d in range(directions)
    )
    assert len(predictions) == directions + 3
    assert torch.allclose(output.global_loss, expected_global, atol=1e-6)
    assert torch.allclose(output.local_loss, expected_local, atol=1e-6)
    assert torch.allclose(output.loss, expected_global + expected_local, atol=1e-6)


@pytest.mark.parametrize("batch_views", [True, False])
def test_views_of_one_size_share_a_forward_pass_unless_asked_not_to(batch_views):
    config = tiny_config("byol", multicrop=True, multicrop_local_size=16, multicrop_num_local=4, batch_views=batch_views)
    model = SiameseForPreTraining(config).train()
    calls = []
    model.siamese.register_forward_hook(lambda module, args, out: calls.append(tuple(args[0].shape)))
    model(**batch_for(config, count=4))
    if batch_views:
        assert calls == [(8, 3, 32, 32), (16, 3, 16, 16)]  # the source encoder; the target is another module
    else:
        assert calls == [(4, 3, 32, 32)] * 2 + [(4, 3, 16, 16)] * 4


def test_vit_takes_multicrop_local_crops():
    config = tiny_config("mocov3", backbone="vit_tiny_patch16_224", multicrop=True, multicrop_local_size=16,
                         multicrop_num_local=2)
    model = SiameseForPreTraining(config).train()
    output = model(**batch_for(config, count=4))
    assert torch.isfinite(output.loss) and output.local_loss is not None
    output.loss.backward()


def test_mean_encoding_of_identical_views_equals_the_single_view():
    config = tiny_config("byol", mean_encoding=True, mean_encoding_views=3)
    model = SiameseForPreTraining(config).eval()
    view = torch.randn(4, 3, 32, 32)
    single = model.target_mean_projection([view])
    assert torch.allclose(model.target_mean_projection([view, view, view]), single, atol=1e-5)


def test_mean_encoding_of_noisy_views_cuts_the_variance_about_n_fold():
    model = SiameseForPreTraining(tiny_config("byol")).eval()
    torch.manual_seed(0)
    point = torch.randn(1, 3, 32, 32).expand(512, 3, 32, 32)

    def variance(num_views):
        views = [point + 0.05 * torch.randn_like(point) for _ in range(num_views)]
        return model.target_mean_projection(views).var(dim=0).sum().item()

    single = variance(1)
    for num_views in (2, 4):
        assert variance(num_views) / single == pytest.approx(1 / num_views, rel=0.25)


def test_mean_encoding_forward_runs_with_the_view_layout():
    config = tiny_config("moco", mean_encoding=True, mean_encoding_views=2)
    model = SiameseForPreTraining(config).train()
    batch = batch_for(config, count=4)
    assert len(batch["target_pixel_values"]) == 2
    output = model(**batch)
    assert torch.isfinite(output.loss)
    assert torch.allclose(output.target_embeddings[0].norm(dim=1), torch.ones(4))


def test_all_designs_together_train_for_every_ema_framework():
    for framework in ("moco", "mocov3", "byol"):
        config = tiny_config(
            framework, multicrop=True, multicrop_local_size=16, multicrop_num_local=2, scalemix=True, asym_aug=True,
            asym_bn=True, asym_bn_source_batch=2, mean_encoding=True,
        )
        model = SiameseForPreTraining(config).train()
        output = model(**batch_for(config, count=4))
        assert torch.isfinite(output.loss), framework
        output.loss.backward()


def test_asym_bn_swaps_the_projector_norms_and_keeps_checkpoint_keys():
    config = tiny_config("byol", asym_bn=True, asym_bn_source_batch=4)
    model = SiameseForPreTraining(config)
    assert any(isinstance(m, GhostBatchNorm1d) for m in model.heads["4"].projector.modules())
    assert any(isinstance(m, TargetSyncBatchNorm1d) for m in model.heads["4"].target_projector.modules())
    plain = SiameseForPreTraining(tiny_config("byol"))
    assert set(model.state_dict()) == set(plain.state_dict())
    # The swapped-in target layers stay frozen (DDP fails on trainable parameters without gradients).
    assert not [name for name, p in model.named_parameters() if name.startswith("target_") and p.requires_grad]


def test_asym_bn_needs_a_separate_target():
    with pytest.raises(ValueError, match="`asym_bn`"):
        tiny_config("simsiam", asym_bn=True)


def test_ghost_batch_norm_normalises_each_chunk_on_its_own():
    torch.manual_seed(0)
    ghost = GhostBatchNorm1d(5, ghost_batch_size=4).train()
    features = torch.randn(12, 5) * 3 + 1
    expected = torch.cat([F.batch_norm(chunk, None, None, training=True) for chunk in features.split(4)])
    assert torch.allclose(ghost(features), expected, atol=1e-5)
    assert int(ghost.num_batches_tracked) == 3
    plain = nn.BatchNorm1d(5).train()
    assert not torch.allclose(plain(features), expected, atol=1e-3)


def _sync_bn_worker(rank, world_size, port, shards, expected, result_path):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.distributed.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        norm = TargetSyncBatchNorm1d(shards.shape[-1]).train()
        with torch.no_grad():
            output = norm(shards[rank])
        torch.save({"output": output, "running_mean": norm.running_mean, "running_var": norm.running_var},
                   f"{result_path}.{rank}")
    finally:
        torch.distributed.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_target_sync_bn_on_two_gloo_processes_equals_bn_on_the_whole_batch(tmp_path):
    torch.manual_seed(0)
    shards = torch.randn(2, 6, 4) * 2 + 0.5
    whole = nn.BatchNorm1d(4).train()
    expected = whole(shards.reshape(12, 4)).detach()
    mp.spawn(_sync_bn_worker, args=(2, _free_port(), shards, expected, str(tmp_path / "out")), nprocs=2, join=True)
    for rank in range(2):
        result = torch.load(tmp_path / f"out.{rank}", weights_only=True)
        assert torch.allclose(result["output"], expected[rank * 6 : (rank + 1) * 6], atol=1e-5)
        assert torch.allclose(result["running_mean"], whole.running_mean, atol=1e-6)
        assert torch.allclose(result["running_var"], whole.running_var, atol=1e-5)


def test_view_variance_known_values():
    same = F.normalize(torch.randn(1, 5, 8), dim=-1).expand(3, 5, 8)
    assert view_variance(same).item() == pytest.approx(0.0, abs=1e-6)
    z = F.normalize(torch.randn(5, 8), dim=-1)
    opposite = torch.stack([z, -z])  # mean is zero: K/(K-1) * (1 - 0) = 2
    assert view_variance(opposite).item() == pytest.approx(2.0)
    random = F.normalize(torch.randn(50, 20, 512), dim=-1)  # independent directions: about 1
    assert view_variance(random).item() == pytest.approx(1.0, abs=0.02)
    with pytest.raises(ValueError, match="at least 2 views"):
        view_variance(z[None])


def test_asym_aug_lowers_target_variance_and_ratio_on_a_random_encoder():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("moco"))  # one encoder, measured under both view recipes
    images = textured_images(48, seed=3)
    reports = {}
    for asym_aug in (False, True):
        transform = MultiViewTransform.from_config(tiny_config("moco", asym_aug=asym_aug))
        torch.manual_seed(1)
        reports[asym_aug] = VarianceMonitor.from_view_transform(images, transform, num_draws=4).measure(model)
    assert reports[True].target < reports[False].target
    assert reports[True].ratio < reports[False].ratio


class _PoolingEncoder(nn.Module):
    """Encoder stand-in: the pooled pixels, so that the expected encodings are plain arithmetic."""

    def __init__(self):
        super().__init__()
        self.anchor = nn.Parameter(torch.zeros(()))  # gives the monitor a device

    def forward(self, pixels):
        return SimpleNamespace(pooler_output=pixels.mean(dim=(2, 3)))


class _Branches:
    def __init__(self):
        self.encoder = _PoolingEncoder()

    def source_branch(self):
        return self.encoder, nn.Identity()

    def target_branch(self):
        return self.encoder, nn.Identity()


class _RecordingViews:
    """A view transform drawing random views of two sizes, each call recorded in order."""

    def __init__(self, with_target: bool):
        self.with_target, self.calls = with_target, []
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, image):
        def view(size):
            return torch.randn(4, size, size, generator=self.generator)

        views = {"source_pixel_values": [view(8), view(8), view(4)]}  # two global views and a local crop
        if self.with_target:
            views["target_pixel_values"] = [view(8), view(8)]  # one MeanEnc group of two
        self.calls.append(views)
        return views


def _pooled_unit(views):
    return F.normalize(torch.stack(views).mean(dim=(2, 3)), dim=-1)


@pytest.mark.parametrize("with_target", [True, False])
def test_variance_monitor_measures_every_source_view_and_each_target_group(with_target):
    images, draws = list(range(5)), 3
    transform = _RecordingViews(with_target)
    monitor = VarianceMonitor(images, transform, num_global=2, target_group=2, num_draws=draws)
    report = monitor.measure(_Branches())
    calls = [transform.calls[d * len(images):(d + 1) * len(images)] for d in range(draws)]
    source = [_pooled_unit([c["source_pixel_values"][p] for c in draw]) for draw in calls for p in range(3)]
    if with_target:  # the normalised mean of the group's projections
        target = [F.normalize(sum(torch.stack([c["target_pixel_values"][p] for c in draw]).mean(dim=(2, 3))
                                  for p in range(2)), dim=-1) for draw in calls]
    else:  # the global source views, one encoding each (the local crop is not a target)
        target = [_pooled_unit([c["source_pixel_values"][p] for c in draw]) for draw in calls for p in range(2)]
    assert report.source == pytest.approx(float(view_variance(torch.stack(source))), rel=1e-5)
    assert report.target == pytest.approx(float(view_variance(torch.stack(target))), rel=1e-5)


def test_mean_encoding_lowers_the_measured_target_variance():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("moco"))
    images = textured_images(32, seed=4)
    reports = {}
    for views in (1, 3):
        config = tiny_config("moco", mean_encoding=views > 1, mean_encoding_views=views)
        torch.manual_seed(1)
        reports[views] = VarianceMonitor.from_view_transform(images, MultiViewTransform.from_config(config)).measure(model)
    assert reports[3].target < reports[1].target
    assert reports[3].source == pytest.approx(reports[1].source, rel=0.2)  # the source side is untouched


def test_variance_monitor_leaves_the_model_unchanged():
    config = tiny_config("byol")
    model = SiameseForPreTraining(config).eval()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    monitor = VarianceMonitor.from_view_transform(structured_images(8), MultiViewTransform.from_config(config))
    report = monitor.measure(model)
    assert 0 < report.source and 0 < report.target
    assert set(report.as_dict()) == {"variance/source", "variance/target", "variance/ratio"}
    assert not model.training and not model.siamese.training
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
