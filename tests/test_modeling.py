import pytest
import torch
from conftest import FRAMEWORK_NAMES, global_views, tiny_config

from hf_siamese import SiameseForImageClassification, SiameseForPreTraining, SiameseModel


def test_encoder_outputs_for_resnet():
    model = SiameseModel(tiny_config(backbone="resnet18")).eval()
    output = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert output.pooler_output.shape == (2, 512)
    assert output.last_hidden_state.shape == (2, 512, 1, 1)
    assert [tuple(h.shape[1:]) for h in output.hidden_states] == [(64, 8, 8), (128, 4, 4), (256, 2, 2), (512, 1, 1)]
    assert torch.equal(output.hidden_states[-1], output.last_hidden_state)


def test_encoder_outputs_for_vit():
    model = SiameseModel(tiny_config(backbone="vit_tiny_patch16_224")).eval()
    output = model(torch.randn(2, 3, 32, 32), output_hidden_states=True)
    assert output.last_hidden_state.shape == (2, 17, 48)  # class token + 4x4 patches
    assert output.pooler_output.shape == (2, 48)
    assert len(output.hidden_states) == 2 and output.hidden_states[0].shape == (2, 17, 48)
    assert torch.allclose(output.pooler_output, output.last_hidden_state[:, 0])  # class-token pooling


def test_encoder_takes_grayscale_when_configured():
    model = SiameseModel(tiny_config(num_channels=1)).eval()
    assert model(torch.randn(2, 1, 32, 32)).pooler_output.shape == (2, 512)


def test_encoder_tuple_output_and_batching_equivalence():
    model = SiameseModel(tiny_config()).eval()
    pixels = torch.randn(4, 3, 32, 32)
    last_hidden_state, pooled = model(pixels, return_dict=False)
    assert last_hidden_state.shape == (4, 512, 1, 1)
    one_by_one = torch.cat([model(pixels[i : i + 1]).pooler_output for i in range(4)])
    assert torch.allclose(pooled, one_by_one, atol=1e-5)


@pytest.mark.parametrize("framework", FRAMEWORK_NAMES)
def test_forward_backward_finite_and_target_gets_no_gradient(framework):
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config(framework)).train()
    source, target = global_views(model.config)
    output = model(source, target)
    assert torch.isfinite(output.loss) and output.loss.requires_grad
    output.loss.backward()
    assert all(p.grad is not None for p in model.siamese.parameters())
    assert all(p.grad is not None for p in model.heads["4"].projector.parameters())
    if model.target_encoder is not None:
        target_params = [*model.target_encoder.parameters(), *model.heads["4"].target_projector.parameters()]
        assert all(not p.requires_grad and p.grad is None for p in target_params)
    assert all(not t.requires_grad for t in output.target_embeddings)


@pytest.mark.parametrize("framework", FRAMEWORK_NAMES)
def test_a_few_steps_on_a_fixed_batch_lower_the_loss(framework):
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config(framework)).train()
    source, target = global_views(model.config, batch_size=16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    # On a fixed batch MoCo's queue fills with that batch's own keys, which makes the task harder by design;
    # hold the negatives fixed so that the test measures the encoder learning.
    initial_queue = model.heads["4"].queue.clone() if framework == "moco" else None
    losses = []
    for step in range(12):
        if initial_queue is not None:
            model.heads["4"].queue.copy_(initial_queue)
        loss = model(source, target).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.momentum_update(0.9)
        losses.append(loss.item())
    assert losses[-1] < losses[0], losses


def test_loss_pairs_each_global_view_with_the_other_target():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("byol")).eval()
    (a, b), _ = global_views(model.config)
    output = model([a, b], [a, b])
    pred_a, pred_b = output.source_predictions
    target_a, target_b = output.target_embeddings
    expected = model.criterion(pred_a, target_b) + model.criterion(pred_b, target_a)
    assert torch.allclose(output.loss, expected)


def test_simsiam_averages_directions_and_reuses_the_source_projection():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("simsiam")).eval()
    (a, b), _ = global_views(model.config)
    output = model([a, b])
    projection_b = model.heads["4"].projector(model.siamese(b).pooler_output)
    assert torch.allclose(output.target_embeddings[1], torch.nn.functional.normalize(projection_b, dim=1), atol=1e-5)
    pred_a, pred_b = output.source_predictions
    target_a, target_b = output.target_embeddings
    expected = 0.5 * (model.criterion(pred_a, target_b) + model.criterion(pred_b, target_a))
    assert torch.allclose(output.loss, expected)


def test_simsiam_encodes_given_target_views_and_reuses_the_source_pass_without_them():
    model = SiameseForPreTraining(tiny_config("simsiam")).train()
    (a, b), _ = global_views(model.config)
    batches = []
    model.siamese.register_forward_hook(lambda module, args, output: batches.append(len(args[0])))
    model([a, b])
    assert batches == [16]  # both views in one source pass; the targets are its projections
    batches.clear()
    model([a, b], [a.clone(), b.clone()])
    assert batches == [16, 16]  # the source pass, then the given target views under stop-gradient


def test_simsiam_has_one_encoder():
    model = SiameseForPreTraining(tiny_config("simsiam"))
    encoder_params = sum(p.numel() for p in model.siamese.parameters())
    head_params = sum(p.numel() for p in [*model.heads["4"].projector.parameters(), *model.heads["4"].predictor.parameters()])
    assert model.target_encoder is None and model.heads["4"].target_projector is None
    assert sum(p.numel() for p in model.parameters()) == encoder_params + head_params
    assert not any(key.startswith("target_") for key in model.state_dict())


def test_view_count_errors_name_the_argument():
    model = SiameseForPreTraining(tiny_config("byol"))
    (a, b), _ = global_views(model.config)
    with pytest.raises(ValueError, match="source_pixel_values"):
        model([a], [a, b])
    with pytest.raises(ValueError, match="target_pixel_values"):
        model([a, b], [a, b, a])
    moco = SiameseForPreTraining(tiny_config("moco"))
    with pytest.raises(ValueError, match="`target_pixel_values` is required with one loss direction"):
        moco([a])


def test_momentum_update_extremes():
    model = SiameseForPreTraining(tiny_config("byol"))
    with torch.no_grad():
        for param in [*model.siamese.parameters(), *model.heads["4"].projector.parameters()]:
            param.add_(torch.randn_like(param))
    before = [p.clone() for p in model.target_encoder.parameters()]
    model.momentum_update(1.0)
    assert all(torch.equal(p, q) for p, q in zip(model.target_encoder.parameters(), before))
    model.momentum_update(0.0)
    assert all(torch.equal(t, s) for t, s in zip(model.target_encoder.parameters(), model.siamese.parameters()))
    assert all(torch.equal(t, s) for t, s in zip(model.heads["4"].target_projector.parameters(), model.heads["4"].projector.parameters()))


def test_momentum_update_is_an_exponential_moving_average():
    model = SiameseForPreTraining(tiny_config("mocov3"))
    with torch.no_grad():
        for param in model.heads["4"].projector.parameters():
            param.add_(1.0)
    target_before = [p.clone() for p in model.heads["4"].target_projector.parameters()]
    model.momentum_update(0.75)
    for after, before, source in zip(model.heads["4"].target_projector.parameters(), target_before, model.heads["4"].projector.parameters()):
        assert torch.allclose(after, 0.75 * before + 0.25 * source)


def test_momentum_schedule_is_a_half_cosine():
    model = SiameseForPreTraining(tiny_config("byol"))
    assert model.momentum_at(0.0) == pytest.approx(0.996)
    assert model.momentum_at(0.5) == pytest.approx(0.998)
    assert model.momentum_at(1.0) == pytest.approx(1.0)
    moco = SiameseForPreTraining(tiny_config("moco"))
    assert moco.momentum_at(0.3) == pytest.approx(0.999)


def test_target_starts_as_a_copy_of_the_source():
    model = SiameseForPreTraining(tiny_config("byol"))
    for target, source in zip(model.target_encoder.state_dict().values(), model.siamese.state_dict().values()):
        assert torch.equal(target, source)


def test_moco_loss_and_gradient_use_the_queue_before_this_steps_keys():
    model = SiameseForPreTraining(tiny_config("moco", queue_size=16)).train()
    source, target = global_views(model.config, batch_size=4)
    for step in range(3):  # the queue snapshot is reused from step to step
        queue_before = model.heads["4"].queue.clone()
        output = model(source_pixel_values=source, target_pixel_values=target)
        prediction = output.source_predictions[0]
        expected = model.criterion(prediction, output.target_embeddings[0], queue_before)
        assert torch.allclose(output.loss, expected)
        (gradient,) = torch.autograd.grad(output.loss, prediction, retain_graph=True)
        (expected_gradient,) = torch.autograd.grad(expected, prediction)
        assert torch.allclose(gradient, expected_gradient, atol=1e-7)
        assert torch.equal(model.heads["4"].queue[4 * step : 4 * step + 4], output.target_embeddings[0].detach())
        output.loss.backward()
        model.zero_grad()


def test_two_moco_forwards_before_one_backward_is_refused_not_wrong():
    model = SiameseForPreTraining(tiny_config("moco", queue_size=16)).train()
    source, target = global_views(model.config, batch_size=4)
    first = model(source_pixel_values=source, target_pixel_values=target)
    model(source_pixel_values=source, target_pixel_values=target)
    with pytest.raises(RuntimeError, match="inplace operation"):
        first.loss.backward()


def test_queue_enqueues_in_fifo_order_and_wraps_around():
    model = SiameseForPreTraining(tiny_config("moco", queue_size=12))
    initial = model.heads["4"].queue.clone()
    assert torch.allclose(initial.norm(dim=1), torch.ones(12))
    keys = [torch.full((4, 32), float(i)) for i in range(1, 5)]
    model.heads["4"].enqueue(keys[0])
    assert torch.equal(model.heads["4"].queue[:4], keys[0]) and torch.equal(model.heads["4"].queue[4:], initial[4:])
    assert int(model.heads["4"].queue_ptr) == 4
    model.heads["4"].enqueue(keys[1])
    model.heads["4"].enqueue(keys[2])
    assert int(model.heads["4"].queue_ptr) == 0  # wrapped around
    model.heads["4"].enqueue(keys[3])  # overwrites the oldest
    assert torch.equal(model.heads["4"].queue[:4], keys[3]) and torch.equal(model.heads["4"].queue[4:8], keys[1])
    with pytest.raises(ValueError, match="queue_size"):
        model.heads["4"].enqueue(torch.ones(5, 32))


def test_queue_receives_the_target_keys_only_in_training():
    model = SiameseForPreTraining(tiny_config("moco", queue_size=16)).train()
    source, target = global_views(model.config, batch_size=8)
    output = model(source, target)
    assert torch.allclose(model.heads["4"].queue[:8], output.target_embeddings[0])
    assert int(model.heads["4"].queue_ptr) == 8
    model.eval()
    model(source, target)
    assert int(model.heads["4"].queue_ptr) == 8


def test_image_classification_with_a_frozen_encoder():
    model = SiameseForImageClassification(tiny_config(num_labels=5, freeze_encoder=True)).train()
    assert not model.siamese.training and model.classifier.training
    running_mean = model.siamese.backbone.bn1.running_mean.clone()
    output = model(torch.randn(4, 3, 32, 32), labels=torch.tensor([0, 1, 2, 3]))
    assert output.logits.shape == (4, 5)
    output.loss.backward()
    assert all(p.grad is None for p in model.siamese.parameters())
    assert model.classifier.weight.grad is not None
    assert torch.equal(model.siamese.backbone.bn1.running_mean, running_mean)
    assert model.classifier.weight.std().item() == pytest.approx(0.01, rel=0.2)


def test_meta_device_init_covers_every_tensor():
    """Built on meta, materialised with NaN, then initialised: nothing may stay NaN (from_pretrained's path)."""
    for framework, backbone in [("moco", "resnet18"), ("byol", "vit_tiny_patch16_224")]:
        config = tiny_config(framework, backbone=backbone)
        with torch.device("meta"):
            model = SiameseForPreTraining(config)
        model.to_empty(device="cpu")
        with torch.no_grad():
            for tensor in [*model.parameters(), *model.buffers()]:
                tensor.fill_(float("nan")) if tensor.is_floating_point() else tensor.fill_(7)
        model.init_weights()
        for name, tensor in [*model.named_parameters(), *model.named_buffers()]:
            assert not tensor.isnan().any(), name
        for name, buffer in model.named_buffers():
            if name.endswith("num_batches_tracked"):
                assert int(buffer) == 0, name
        for target, source in zip(model.target_encoder.state_dict().values(), model.siamese.state_dict().values()):
            assert torch.equal(target, source)
        source, target = global_views(config)
        assert torch.isfinite(model.train()(source, target).loss)


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = SiameseForPreTraining(tiny_config("simsiam")).train()
    source, target = global_views(model.config)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model(source, target).loss.backward()
    plain = [p.grad.clone() for p in model.siamese.parameters()]
    model.zero_grad()
    model.load_state_dict(state)
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    assert model.siamese.backbone.grad_checkpointing
    model(source, target).loss.backward()
    for a, b in zip(plain, (p.grad for p in model.siamese.parameters())):
        assert torch.allclose(a, b, atol=1e-5)
