"""Encoding a batch's views for the loss: each branch's encoder and heads over the planned forward passes, per loss
level. The source branch gives every source view's projections and predictions; the target branch every target
group's (MeanEnc: mean) projection, without gradient.

Like the modeling file, this imports only torch, timm and same-directory modules (it is copied next to saved
weights for ``trust_remote_code``).
"""

from collections.abc import Callable
from itertools import accumulate

import torch

from .backbones import pool_stage, stage_cells
from .distributed import batch_shuffled
from .levels import LevelFeatures, SourceOutput, Target
from .passes import ForwardPass, plan_source_passes, plan_target_passes
from .view_layout import ModelViews


def encode_sources(model, views: ModelViews) -> dict[int, list[SourceOutput]]:
    """Per level, the source heads' output for every source view (globals, then local crops)."""
    shapes = [view.shape for view in views.source]
    plan = plan_source_passes(shapes, views.num_groups, model.batches_views, model.config.multicrop_joint_bn)
    outputs = {level: [] for level in model.levels}
    for forward_pass, encoded in _in_passes(model, plan, views.source, lambda pixels: _project_source(model, pixels)):
        for level, output in encoded.items():
            outputs[level].extend(output.chunk(len(forward_pass.views)))
    return outputs


@torch.no_grad()
def encode_targets(model, views: ModelViews, sources: dict[int, list[SourceOutput]]) -> dict[int, list[Target]]:
    """Per level, each target group's normalised target."""
    if views.groups_are_sources and model.target_encoder is None:  # SimSiam: already encoded by the source
        return {level: [output.as_target().normalized() for output in outputs[:views.num_groups]]
                for level, outputs in sources.items()}
    return {level: [target.normalized() for target in targets]
            for level, targets in target_projections(model, views.groups).items()}


@torch.no_grad()
def target_projections(model, groups: list[list[torch.Tensor]]) -> dict[int, list[Target]]:
    """Per level, each group's un-normalised target: the mean of its views' projections (MeanEnc normalises them
    together) and the cells of its first view (the others' cells do not line up with it)."""
    flat = [view for group in groups for view in group]
    starts = [0, *accumulate(len(group) for group in groups)]
    indices = [range(start, start + len(group)) for start, group in zip(starts, groups)]
    plan = plan_target_passes(indices, [view.shape for view in flat], model.batches_views, model.config.shuffle_bn)
    encode = _target_encoding(model)
    targets = {level: [] for level in model.levels}
    for forward_pass, encoded in _in_passes(model, plan, flat, encode):
        num_groups, group_size = len(forward_pass.statistics), len(forward_pass.statistics[0])
        for level, target in encoded.items():
            targets[level].extend(target.per_group(num_groups, group_size))
    return targets


def level_features(model, encoder, pixel_values: torch.Tensor) -> dict[int, LevelFeatures]:
    """Every loss level's features of a batch (with the dense term, per cell too)."""
    dense, levels = bool(model.config.ladder_dense_weight), model.levels
    if len(levels) == 1 and not dense:
        return {levels[0]: LevelFeatures(encoder(pixel_values).pooler_output)}
    output = encoder(pixel_values, output_hidden_states=True)
    features = {}
    for level in levels:
        stage = output.hidden_states[level - 1]
        pooled = output.pooler_output if level == levels[-1] else pool_stage(
            stage, encoder.backbone, model.config.ladder_vit_pooling)
        features[level] = LevelFeatures(pooled, stage_cells(stage, encoder.backbone) if dense else None)
    return features


def _project_source(model, pixel_values: torch.Tensor) -> dict[int, SourceOutput]:
    features = level_features(model, model.siamese, pixel_values)
    return {level: model.level_heads(level).project(level_features) for level, level_features in features.items()}


def _target_encoding(model) -> Callable[[torch.Tensor], dict[int, Target]]:
    """The target branch on a batch: per level, its heads' projections; under shuffling BN (MoCo), of a batch
    permuted across processes."""
    encoder, _ = model.target_branch()

    def encode(pixels: torch.Tensor) -> dict[int, Target]:
        features = level_features(model, encoder, pixels)
        return {level: model.level_heads(level).project_target(level_features)
                for level, level_features in features.items()}

    if model.config.shuffle_bn:
        return lambda pixels: batch_shuffled(encode, pixels)
    return encode


def _in_passes(model, plan: list[ForwardPass], views: list[torch.Tensor], encode: Callable):
    """Each pass of ``plan`` and ``encode`` of its views in one batch, BatchNorm statistics per statistics group."""
    for forward_pass in plan:
        pixels = torch.cat([views[index] for index in forward_pass.views])
        with model.view_norms.views_in_batch(len(forward_pass.statistics)):
            encoded = encode(pixels)
        yield forward_pass, encoded
