"""Siamese self-supervised encoders over timm backbones.

Two branches see different views of the same images (Wang et al., CVPR 2022, Sec. 3): the **source** branch
(encoder, projector, predictor) receives gradients; the **target** branch produces the targets without gradient.
For MoCo, MoCo v3 and BYOL the target is an EMA copy of the source (``momentum_update``); for SimSiam it is the
source itself under stop-gradient.

This file imports only torch, timm, transformers and same-directory modules, so that ``save_pretrained`` can copy
it next to the weights and ``AutoModel.from_pretrained(path, trust_remote_code=True)`` works without hf_siamese.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from timm.models import VisionTransformer
from torch import nn
from transformers import PreTrainedModel
from transformers import initialization as init
from transformers.modeling_outputs import BaseModelOutputWithPooling, ImageClassifierOutput, ModelOutput

from .backbones import create_backbone, forward_stages, pool_stage, stage_cells, stage_indices
from .batchnorm import (
    PerViewStatistics,
    asym_bn_process_group,
    make_ghost,
    make_per_view,
    make_target_sync,
    replace_batch_norms,
    views_in_batch,
)
from .configuration_siamese import SiameseConfig
from .dense import dense_cosine_loss, grid_side, matched_cells
from .distributed import batch_shuffled, gather_without_grad
from .heads import ProjectionHead, build_predictor, build_projector
from .losses import build_loss


@dataclass
class SiamesePreTrainingOutput(ModelOutput):
    """
    Output of [`SiameseForPreTraining`].

    Args:
        loss (`torch.FloatTensor` of shape `()`):
            Total loss: the global-view terms plus the local-crop (MultiCrop) terms, over all directions.
        global_loss (`torch.FloatTensor` of shape `()`):
            The terms between global source views and their targets.
        local_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The mean over local crops of their terms, summed over directions; `None` without local crops.
        level_losses (`dict[int, torch.FloatTensor]`):
            Each loss level's unweighted loss (global + local), keyed by level (Ladder Siamese); one entry without
            a ladder. `loss` is their sum weighted by `ladder_weights`.
        dense_loss (`torch.FloatTensor` of shape `()`, *optional*):
            The dense (matched-cell) terms summed over levels with `ladder_weights`, before `ladder_dense_weight`;
            `None` when the dense term is off.
        source_predictions (`tuple(torch.FloatTensor)` of shape `(batch_size, projector_dim)`):
            The source branch's output for each source view (predictor output where there is a predictor).
        target_embeddings (`tuple(torch.FloatTensor)` of shape `(batch_size, projector_dim)`):
            The L2-normalised target of each target group (mean over its views when there are several).
    """

    loss: torch.FloatTensor | None = None
    global_loss: torch.FloatTensor | None = None
    local_loss: torch.FloatTensor | None = None
    level_losses: dict[int, torch.FloatTensor] | None = None
    dense_loss: torch.FloatTensor | None = None
    source_predictions: tuple[torch.FloatTensor, ...] | None = None
    target_embeddings: tuple[torch.FloatTensor, ...] | None = None


class SiamesePreTrainedModel(PreTrainedModel):
    config: SiameseConfig
    config_class = SiameseConfig
    base_model_prefix = "siamese"
    main_input_name = "pixel_values"
    input_modalities = ("image",)
    supports_gradient_checkpointing = True
    _no_split_modules = ["SiameseModel"]
    # Pretraining-only weights: absent from the encoder and the classifier, and not an error when loading them.
    _keys_to_ignore_on_load_unexpected = [
        r"^projector\.", r"^predictor\.", r"^ladder_", r"^dense_", r"^target_", r"^queue"
    ]

    def _initialize_weights(self, module: nn.Module, is_custom_code: bool = False) -> None:
        # transformers skips, for code outside its tree, every module without tensors of its own (this model's
        # root, timm's residual blocks), guarding against remote code that writes weights unguarded. Ours only
        # writes through the guarded `transformers.initialization` functions, so those modules must run too.
        super()._initialize_weights(module, is_custom_code=False)

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        """Initialise ``module`` so that a model built on the meta device matches one built normally.

        Children are initialised before their parents, and only tensors not loaded from a checkpoint are touched
        (the ``transformers.initialization`` functions skip loaded ones). Rules follow timm's ResNet and ViT and
        PyTorch's defaults for the heads.
        """
        if isinstance(module, nn.Linear):
            init.kaiming_uniform_(module.weight, a=math.sqrt(5))
            if module.bias is not None:
                bound = 1 / math.sqrt(module.in_features)
                init.uniform_(module.bias, -bound, bound)
        elif isinstance(module, nn.Conv2d):
            init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)):
            if getattr(module, "weight", None) is not None:
                init.ones_(module.weight)
            if getattr(module, "bias", None) is not None:
                init.zeros_(module.bias)
            if getattr(module, "running_mean", None) is not None:
                init.zeros_(module.running_mean)
                init.ones_(module.running_var)
                init.zeros_(module.num_batches_tracked)
        elif hasattr(module, "zero_init_last"):
            module.zero_init_last()  # timm residual blocks: the last BN of each branch starts at zero
        elif isinstance(module, VisionTransformer):
            _init_vision_transformer(module)
        elif isinstance(module, SiameseForPreTraining):
            module._init_target_and_queue()
        elif isinstance(module, SiameseForImageClassification):
            # Linear probe head, as in MoCo v3 / SimSiam: N(0, 0.01), zero bias.
            init.normal_(module.classifier.weight, std=0.01)
            init.zeros_(module.classifier.bias)

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        # timm models have their own switch; transformers' default looks for GradientCheckpointingLayer.
        for module in self.modules():
            if isinstance(module, SiameseModel):
                module.backbone.set_grad_checkpointing(enable)


def _init_vision_transformer(vit: VisionTransformer) -> None:
    """timm's default ViT init for the tensors that are not inside a Linear/Conv/norm layer, plus Linear layers."""
    for submodule in vit.modules():
        if isinstance(submodule, nn.Linear):
            init.trunc_normal_(submodule.weight, std=0.02)
            if submodule.bias is not None:
                init.zeros_(submodule.bias)
    if vit.pos_embed is not None:
        init.trunc_normal_(vit.pos_embed, std=0.02)
    for token in (vit.cls_token, vit.reg_token):
        if token is not None:
            init.normal_(token, std=1e-6)


class SiameseModel(SiamesePreTrainedModel):
    """The encoder alone: a timm backbone returning pooled and per-stage features.

    This is what `AutoModel.from_pretrained` gives for any hf_siamese checkpoint, pretraining ones included.
    """

    def __init__(self, config: SiameseConfig):
        super().__init__(config)
        self.backbone = create_backbone(config)
        self.stage_indices = stage_indices(self.backbone)
        self.stage_widths = [self.backbone.feature_info[index]["num_chs"] for index in self.stage_indices]
        self.post_init()

    @property
    def num_features(self) -> int:
        return self.backbone.num_features

    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BaseModelOutputWithPooling | tuple:
        r"""
        Returns:
            [`BaseModelOutputWithPooling`]: `last_hidden_state` is the final feature map `[B, C, H, W]` (ResNet) or
            the token sequence `[B, tokens, D]` (ViT); `pooler_output` the pooled feature `[B, num_features]`;
            `hidden_states` one entry per stage (ResNet stages 1-4, every ViT block) when requested.
        """
        output_hidden_states = (
            output_hidden_states if output_hidden_states is not None else self.config.output_hidden_states
        )
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        pixel_values = pixel_values.to(self.dtype)
        if output_hidden_states:
            last_hidden_state, stages = forward_stages(self.backbone, pixel_values, self.stage_indices)
            hidden_states = tuple(stages)
        else:
            last_hidden_state, hidden_states = self.backbone.forward_features(pixel_values), None
        pooled = self.backbone.forward_head(last_hidden_state, pre_logits=True)
        output = BaseModelOutputWithPooling(
            last_hidden_state=last_hidden_state, pooler_output=pooled, hidden_states=hidden_states
        )
        return output if return_dict else output.to_tuple()


class SiameseForPreTraining(SiamesePreTrainedModel):
    """Source encoder + projector + predictor, the target branch, and MoCo's queue.

    ``self.siamese`` is the source encoder, so ``AutoModel.from_pretrained`` on a pretraining checkpoint returns
    it with its trained weights. ``target_encoder``/``target_projector`` are EMA copies (``None`` for SimSiam).
    With ``ladder_levels`` (Ladder Siamese Network, Yoshihashi et al. 2022) every listed backbone level has its
    own projector, predictor, target projector (and queue); the last level's are the ordinary ones.
    """

    main_input_name = "source_pixel_values"
    _keys_to_ignore_on_load_unexpected = []

    def __init__(self, config: SiameseConfig):
        super().__init__(config)
        self.siamese = SiameseModel(config)
        self.levels = _resolve_ladder_levels(config, len(self.siamese.stage_indices))
        self.level_weights = list(config.ladder_weights or [1.0] * len(self.levels))
        widths = {level: self.siamese.stage_widths[level - 1] for level in self.levels[:-1]}
        self.projector = build_projector(config, self.siamese.num_features)
        self.predictor = build_predictor(config)
        self.ladder_projectors = nn.ModuleDict({str(l): build_projector(config, w) for l, w in widths.items()})
        self.ladder_predictors = nn.ModuleDict(
            {str(l): build_predictor(config) for l in widths} if self.predictor is not None else {}
        )
        # Dense term: a 1x1-conv MLP per level, i.e. the level's MLP applied to every cell.
        dense_widths = {**widths, self.levels[-1]: self.siamese.stage_widths[-1]} if config.ladder_dense_weight else {}
        self.dense_projectors = nn.ModuleDict({str(l): build_projector(config, w) for l, w in dense_widths.items()})
        self.dense_predictors = nn.ModuleDict(
            {str(l): build_predictor(config) for l in dense_widths} if self.predictor is not None else {}
        )
        self.target_encoder = None
        self.target_projector = None
        self.target_ladder_projectors = nn.ModuleDict()
        self.target_dense_projectors = nn.ModuleDict()
        if config.uses_momentum_target:
            self.target_encoder = SiameseModel(config)
            self.target_projector = build_projector(config, self.siamese.num_features)
            self.target_ladder_projectors = nn.ModuleDict(
                {str(l): build_projector(config, w) for l, w in widths.items()}
            )
            self.target_dense_projectors = nn.ModuleDict(
                {str(l): build_projector(config, w) for l, w in dense_widths.items()}
            )
        if config.asym_bn:
            # AsymBN: target projector BN over a larger (synchronised) batch than the source's ghost batches.
            group = asym_bn_process_group(config.asym_bn_group_size)
            for source, target in [(self.projector, self.target_projector),
                                   (self.ladder_projectors, self.target_ladder_projectors)]:
                replace_batch_norms(source, make_ghost(config.asym_bn_source_batch))
                replace_batch_norms(target, make_target_sync(group))
        # Every other BatchNorm tells apart the views sharing a forward pass (batch_views).
        replace_batch_norms(self, make_per_view, kinds=(nn.BatchNorm1d, nn.BatchNorm2d))
        for target in self.target_modules():  # after AsymBN's swap, whose new layers start trainable
            target.requires_grad_(False)
        if config.queue_size:
            for level in self.levels:
                queue_name, pointer_name = self._queue_names(level)
                self.register_buffer(queue_name, torch.empty(config.queue_size, config.projector_dim))
                self.register_buffer(pointer_name, torch.zeros((), dtype=torch.long))
        self.criterion = build_loss(config)
        self._queue_snapshots: dict[int, torch.Tensor] = {}  # see _queue_snapshot
        self.post_init()

    def _queue_names(self, level: int) -> tuple[str, str]:
        """MoCo's queue of a level: ``queue``/``queue_ptr`` for the last level, one pair per other level."""
        if level == self.levels[-1]:
            return "queue", "queue_ptr"
        return f"queue_level{level}", f"queue_ptr_level{level}"

    def _level_heads(self, level: int) -> tuple[nn.Module, nn.Module | None, nn.Module | None]:
        """The (projector, predictor, target projector) of ``level``."""
        if level == self.levels[-1]:
            return self.projector, self.predictor, self.target_projector
        key = str(level)
        return (self.ladder_projectors[key], self.ladder_predictors[key] if key in self.ladder_predictors else None,
                self.target_ladder_projectors[key] if key in self.target_ladder_projectors else None)

    def _target_source_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each target module with the source module it follows."""
        if self.target_encoder is None:
            return []
        return [(self.target_encoder, self.siamese), (self.target_projector, self.projector),
                (self.target_ladder_projectors, self.ladder_projectors),
                (self.target_dense_projectors, self.dense_projectors)]

    def target_modules(self) -> list[nn.Module]:
        """The modules of the target branch (EMA copies; none for SimSiam)."""
        return [target for target, _ in self._target_source_pairs()]

    def queue_buffer_names(self) -> list[str]:
        """Names of MoCo's queue buffers (queues and pointers of every level), identical on every process by
        construction: each enqueues the same gathered keys."""
        if not self.config.queue_size:
            return []
        return [name for level in self.levels for name in self._queue_names(level)]

    def _init_target_and_queue(self) -> None:
        # Runs after every child is initialised or loaded: a target that was not in the checkpoint starts as a
        # copy of the source, as in every EMA framework; loaded target tensors are left alone.
        for target, source in self._target_source_pairs():
            # keep_vars: the tensors themselves, which carry the "loaded from the checkpoint" flag.
            target_tensors = target.state_dict(keep_vars=True).values()
            for target_tensor, source_tensor in zip(target_tensors, source.state_dict().values()):
                init.copy_(target_tensor, source_tensor)
        if self.config.queue_size:
            for level in self.levels:
                queue_name, pointer_name = self._queue_names(level)
                queue = getattr(self, queue_name)
                if not getattr(queue, "_is_hf_initialized", False):
                    queue.copy_(F.normalize(torch.randn_like(queue), dim=1))
                    init.zeros_(getattr(self, pointer_name))

    @torch.no_grad()
    def momentum_update(self, momentum: float) -> None:
        """``target = m * target + (1 - m) * source`` for every target parameter (every level's heads included).

        Target buffers (BatchNorm statistics) are the target's own, updated by its forward passes, as in the MoCo
        and BYOL references. A no-op for SimSiam, whose target is the source itself.
        """
        for target, source in self._target_source_pairs():
            target_params = list(target.parameters())
            if not target_params:
                continue
            source_params = [param.detach().to(target_params[0].dtype) for param in source.parameters()]
            torch._foreach_lerp_(target_params, source_params, 1.0 - momentum)

    def momentum_at(self, progress: float) -> float:
        """EMA momentum after ``progress`` (0 to 1) of training: a half-cosine from `momentum` to `momentum_final`."""
        start, final = self.config.momentum, self.config.momentum_final
        return final - (final - start) * (1 + math.cos(math.pi * progress)) / 2

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor, level: int | None = None) -> None:
        """Replace the oldest keys of a level's FIFO queue (the last level's by default) with ``keys`` gathered
        from every process."""
        queue_name, pointer_name = self._queue_names(level if level is not None else self.levels[-1])
        queue, pointer = getattr(self, queue_name), getattr(self, pointer_name)
        keys = gather_without_grad(keys)
        queue_size = queue.shape[0]
        if queue_size % len(keys):
            raise ValueError(
                f"`queue_size` ({queue_size}) must be a multiple of the number of keys enqueued per step "
                f"({len(keys)} = global batch size x target groups)."
            )
        # Positions computed on the device: reading the pointer on the host would wait for the GPU every step.
        positions = (pointer + torch.arange(len(keys), device=queue.device)) % queue_size
        queue.index_copy_(0, positions, keys.to(queue.dtype))
        pointer.copy_((pointer + len(keys)) % queue_size)

    def _queue_snapshot(self, level: int) -> torch.Tensor:
        """The level's queue as this step's loss sees it.

        The queue is updated in place after the loss, and the loss's backward needs the keys it saw, so they are
        copied into a tensor kept from step to step: a fresh clone costs about seven times as much (every page
        of the new allocation faults in). Two forwards before one backward make autograd refuse loudly.
        """
        queue = getattr(self, self._queue_names(level)[0])
        snapshot = self._queue_snapshots.get(level)
        fits = snapshot is not None and (snapshot.shape, snapshot.device, snapshot.dtype) == (
            queue.shape, queue.device, queue.dtype)
        if not fits:
            snapshot = self._queue_snapshots[level] = torch.empty_like(queue)
        return snapshot.copy_(queue)

    def _level_features(self, encoder: "SiameseModel", pixel_values: torch.Tensor) -> dict:
        """Pooled features of every loss level (``level -> [B, C]``), and with the dense term each level's cells
        (``("cells", level) -> [B, cells, C]``). Without a ladder or dense term: just ``pooler_output``."""
        dense = bool(self.config.ladder_dense_weight)
        if len(self.levels) == 1 and not dense:
            return {self.levels[0]: encoder(pixel_values).pooler_output}
        output = encoder(pixel_values, output_hidden_states=True)
        features = {
            level: pool_stage(output.hidden_states[level - 1], encoder.backbone, self.config.ladder_vit_pooling)
            for level in self.levels[:-1]
        }
        features[self.levels[-1]] = output.pooler_output
        if dense:
            for level in self.levels:
                features["cells", level] = stage_cells(output.hidden_states[level - 1], encoder.backbone)
        return features

    def _project_source(self, pixel_values: torch.Tensor) -> dict:
        """Per level, the source projection ``z`` and prediction ``p`` (``p = z`` without a predictor); with the
        dense term, also per level ``("cells", level) ->`` (cell projections, cell predictions)."""
        projected = {}
        for key, features in self._level_features(self.siamese, pixel_values).items():
            projector, predictor = self._source_heads(key)
            projection = _per_cell(projector, features)
            projected[key] = (projection, _per_cell(predictor, projection) if predictor is not None else projection)
        return projected

    def _source_heads(self, key) -> tuple[nn.Module, nn.Module | None]:
        if isinstance(key, tuple):  # ("cells", level)
            name = str(key[1])
            return self.dense_projectors[name], self.dense_predictors[name] if name in self.dense_predictors else None
        projector, predictor, _ = self._level_heads(key)
        return projector, predictor

    def _target_head(self, key) -> nn.Module:
        if isinstance(key, tuple):
            name = str(key[1])
            return self.target_dense_projectors[name] if self.target_encoder is not None else self.dense_projectors[name]
        projector, _, target_projector = self._level_heads(key)
        return target_projector if target_projector is not None else projector

    def _in_one_pass(self, views_by_norm: list[list[torch.Tensor]], encode) -> dict:
        """``encode`` of all the views in one batch, BatchNorm statistics per entry of ``views_by_norm``."""
        pixels = torch.cat([view for views in views_by_norm for view in views])
        if len(views_by_norm) == 1:
            return encode(pixels)
        with views_in_batch(self._per_view_norms(), len(views_by_norm)):
            return encode(pixels)

    def _per_view_norms(self) -> list[PerViewStatistics]:
        return [module for module in self.modules() if isinstance(module, PerViewStatistics)]

    @property
    def _batches_views(self) -> bool:
        """`batch_views`, unless a BatchNorm cannot tell views apart (a backbone's own BatchNorm subclass, such as
        timm's BatchNormAct2d) or activation checkpointing recomputes the pass outside it: then one pass per view."""
        if not self.config.batch_views or getattr(self.siamese.backbone, "grad_checkpointing", False):
            return False
        norms = (module for module in self.modules() if isinstance(module, nn.modules.batchnorm._BatchNorm))
        return all(isinstance(norm, PerViewStatistics) for norm in norms)

    def _source_passes(self, views: list[torch.Tensor], num_global: int) -> list[list[list[torch.Tensor]]]:
        """The source views as forward passes, each a list of views normalised together.

        Each run of same-size global views or local crops shares a pass with `batch_views`; otherwise each view
        has its own. Local crops normalised jointly (`multicrop_joint_bn`) always share one.
        """
        batched = self._batches_views

        def one_statistics_per_view(run: list[torch.Tensor]) -> list[list[list[torch.Tensor]]]:
            return [[[view] for view in run]] if batched else [[[view]] for view in run]

        passes = [p for run in _same_size_runs(views[:num_global]) for p in one_statistics_per_view(run)]
        for run in _same_size_runs(views[num_global:]):
            passes.extend([[run]] if self.config.multicrop_joint_bn else one_statistics_per_view(run))
        return passes

    def _project_source_views(self, views: list[torch.Tensor], num_global: int) -> dict[int, tuple[list, list]]:
        """Per level, the projections and predictions of every source view, each view with its own BatchNorm
        statistics as in the references (local crops optionally together)."""
        outputs = {}
        for views_by_norm in self._source_passes(views, num_global):
            num_views = sum(len(group) for group in views_by_norm)
            for key, (projection, prediction) in self._in_one_pass(views_by_norm, self._project_source).items():
                projections, predictions = outputs.setdefault(key, ([], []))
                projections.extend(projection.chunk(num_views))
                predictions.extend(prediction.chunk(num_views))
        return outputs

    @torch.no_grad()
    def _target_mean_projections(self, groups: list[list[torch.Tensor]]) -> list[dict]:
        """Per target group, per level, the mean of the target's un-normalised projections of the group's views
        (MeanEnc normalises them together); per dense level, the cell projections of the group's first view (the
        others' cells do not line up with it). Groups share a pass with `batch_views`, except under shuffling BN,
        which permutes each group's batch on its own as MoCo does."""
        encoder = self.target_encoder if self.target_encoder is not None else self.siamese

        def encode(pixels: torch.Tensor) -> dict:
            features = self._level_features(encoder, pixels)
            return {key: _per_cell(self._target_head(key), value) for key, value in features.items()}

        def encode_shuffled(pixels: torch.Tensor) -> dict:
            return batch_shuffled(encode, pixels)

        shuffle = self.config.shuffle_bn
        alike = len({(len(group), group[0].shape) for group in groups}) == 1
        passes = [groups] if self._batches_views and alike and not shuffle else [[group] for group in groups]
        results = []
        for pass_groups in passes:
            projections = self._in_one_pass(pass_groups, encode_shuffled if shuffle else encode)
            shape = (len(pass_groups), len(pass_groups[0]), len(pass_groups[0][0]))
            per_key = {
                key: p.view(*shape, *p.shape[1:])[:, 0] if isinstance(key, tuple) else p.view(*shape, -1).mean(dim=1)
                for key, p in projections.items()
            }
            results.extend({key: value[group] for key, value in per_key.items()} for group in range(len(pass_groups)))
        return results

    def target_mean_projection(self, views: list[torch.Tensor]) -> torch.Tensor:
        """MeanEnc (Wang et al. 2022, Sec. 4.5): the mean of the target's un-normalised projections of ``views``.

        The views are encoded in one batch. With a single view this is just its target projection.
        """
        return self._target_mean_projections([views])[0][self.levels[-1]]

    def _pair_loss(self, prediction: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        # In fp32 whatever the branches' dtypes (16-bit source and fp32 target under DeepSpeed bf16/fp16).
        prediction, target = prediction.float(), target.float()
        if negatives is not None:
            return self.criterion(prediction, target, negatives)
        return self.criterion(prediction, target)

    def _level_terms(self, predictions, targets, negatives) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One level's global and local (MultiCrop) terms, combined over directions as the framework does."""
        num_groups = len(targets)
        global_terms, local_terms = [], []
        for direction in range(num_groups):
            target = targets[num_groups - 1 - direction]
            global_terms.append(self._pair_loss(predictions[direction], target, negatives))
            local_predictions = predictions[num_groups:]
            if local_predictions:
                local_terms.append(torch.stack([self._pair_loss(p, target, negatives) for p in local_predictions]).mean())
        reduce = torch.mean if self.criterion.direction_reduction == "mean" else torch.sum
        return reduce(torch.stack(global_terms)), reduce(torch.stack(local_terms)) if local_terms else None

    def forward(
        self,
        source_pixel_values: list[torch.Tensor],
        target_pixel_values: list[torch.Tensor],
        source_geometry: list[torch.Tensor] | None = None,
        target_geometry: list[torch.Tensor] | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SiamesePreTrainingOutput | tuple:
        r"""
        Args:
            source_pixel_values (`list[torch.Tensor]`):
                Views for the source branch: the global views first (2 with a symmetric loss, else 1), then any
                local crops. Each `[B, C, H, W]`; each has its own BatchNorm statistics, whether it shares a
                forward pass with views of its size (`batch_views`) or not.
            target_pixel_values (`list[torch.Tensor]`):
                Views for the target branch: one group per global source view (2 groups with a symmetric loss),
                each of equal size (more than one view per group = MeanEnc). Global source view `d` is paired
                with target group `1 - d` (symmetric) or group 0; local crops are paired with every group.
            source_geometry, target_geometry (`list[torch.Tensor]`, *optional*):
                Each view's crop geometry `[B, 5]` (top, left, height, width, flipped), as `collate_views` gives
                it; required by the Ladder's dense term (`ladder_dense_weight > 0`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        target_groups = self._target_groups(source_pixel_values, target_pixel_values, source_geometry, target_geometry)
        views_per_group = len(target_groups[0])
        source = self._project_source_views(source_pixel_values, num_global=len(target_groups))
        targets = self._target_embeddings(target_groups, source_pixel_values, source)

        level_losses, global_loss, local_loss, dense_loss = self._weighted_level_losses(
            source, targets, source_geometry, None if target_geometry is None else target_geometry[::views_per_group])
        loss = global_loss if local_loss is None else global_loss + local_loss
        if dense_loss is not None:
            loss = loss + self.config.ladder_dense_weight * dense_loss

        if self.config.queue_size and self.training:
            for level in self.levels:
                self._enqueue(torch.cat(targets[level]), level)

        last = self.levels[-1]
        output = SiamesePreTrainingOutput(
            loss=loss,
            global_loss=global_loss,
            local_loss=local_loss,
            level_losses=level_losses,
            dense_loss=dense_loss,
            source_predictions=tuple(source[last][1]),
            target_embeddings=tuple(targets[last]),
        )
        return output if return_dict else output.to_tuple()

    def _target_groups(self, source_pixel_values, target_pixel_values, source_geometry, target_geometry) -> list:
        """The target views cut into the framework's groups, after checking that the inputs fit the config."""
        if self.config.ladder_dense_weight and (source_geometry is None or target_geometry is None):
            raise ValueError(
                "`source_geometry` and `target_geometry` are required when `ladder_dense_weight` > 0 (the dense "
                "term matches cells by crop geometry); build the views with MultiViewTransform.from_config."
            )
        num_groups = self.config.num_target_groups
        if len(source_pixel_values) < num_groups:
            raise ValueError(
                f"`source_pixel_values` needs at least {num_groups} global view(s) for framework "
                f"{self.config.framework!r} (symmetric_loss={self.config.symmetric_loss}), got {len(source_pixel_values)}."
            )
        if not target_pixel_values or len(target_pixel_values) % num_groups:
            raise ValueError(
                f"`target_pixel_values` must hold {num_groups} group(s) of equal size, got {len(target_pixel_values)} views."
            )
        views_per_group = len(target_pixel_values) // num_groups
        return [target_pixel_values[group * views_per_group : (group + 1) * views_per_group]
                for group in range(num_groups)]

    def _target_embeddings(self, target_groups: list, source_pixel_values: list, source: dict) -> dict:
        """Per level (and dense level), each group's normalised target: SimSiam's reused source projection where
        the view is a source view, else the target branch's (mean) projection."""
        reused = [self._reused_source_projections(group, source_pixel_values, source) for group in target_groups]
        to_encode = [group for group, embeddings in zip(target_groups, reused) if embeddings is None]
        encoded = iter(self._target_mean_projections(to_encode) if to_encode else [])
        targets = {}
        for embeddings in reused:
            if embeddings is None:
                embeddings = {k: F.normalize(p, dim=-1) for k, p in next(encoded).items()}
            for key, embedding in embeddings.items():
                targets.setdefault(key, []).append(embedding)
        return targets

    def _weighted_level_losses(self, source: dict, targets: dict, source_geometry, group_geometry) -> tuple:
        """Per level, its loss; over levels (weighted), the global, local (MultiCrop) and dense terms."""
        level_losses, global_loss, local_loss, dense_loss = {}, 0.0, None, None
        for level, weight in zip(self.levels, self.level_weights):
            negatives = self._queue_snapshot(level) if self.config.queue_size else None
            level_global, level_local = self._level_terms(source[level][1], targets[level], negatives)
            level_losses[level] = level_global if level_local is None else level_global + level_local
            global_loss = global_loss + weight * level_global
            if level_local is not None:
                local_loss = weight * level_local if local_loss is None else local_loss + weight * level_local
            if self.config.ladder_dense_weight:
                level_dense = self._dense_term(source["cells", level][1], targets["cells", level],
                                               source_geometry, group_geometry)
                level_losses[level] = level_losses[level] + self.config.ladder_dense_weight * level_dense
                dense_loss = weight * level_dense if dense_loss is None else dense_loss + weight * level_dense
        return level_losses, global_loss, local_loss, dense_loss

    def _dense_term(self, cell_predictions, cell_targets, source_geometry, target_geometry) -> torch.Tensor:
        """Matched-cell loss between each global source view and the first view of its target group."""
        num_groups = len(cell_targets)
        terms = []
        for direction in range(num_groups):
            group = num_groups - 1 - direction
            predictions, targets = cell_predictions[direction], cell_targets[group]
            index, valid = matched_cells(source_geometry[direction], target_geometry[group],
                                         grid_side(predictions.shape[1]), grid_side(targets.shape[1]))
            terms.append(dense_cosine_loss(predictions.float(), targets.float(), index, valid))
        reduce = torch.mean if self.criterion.direction_reduction == "mean" else torch.sum
        return reduce(torch.stack(terms))

    def _reused_source_projections(self, group, source_pixel_values, source) -> dict | None:
        """SimSiam's target for a view the source already encoded: its projections under stop-gradient.

        This is SimSiam's own computation (Chen & He 2021, Alg. 1) and saves a forward pass per view.
        """
        if self.target_encoder is not None or len(group) != 1:
            return None
        for index, view in enumerate(source_pixel_values):
            if view is group[0]:
                return {key: F.normalize(value[0][index].detach(), dim=-1) for key, value in source.items()}
        return None


def _same_size_runs(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``views`` cut into runs of consecutive views of one shape (MultiCrop's local crops of one size)."""
    runs = []
    for view in views:
        if runs and runs[-1][-1].shape == view.shape:
            runs[-1].append(view)
        else:
            runs.append([view])
    return runs


def _per_cell(head: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """Apply an MLP head to ``[B, C]`` features, or to every cell of ``[B, cells, C]`` (a 1x1-conv MLP)."""
    if features.dim() == 2:
        return head(features)
    batch, cells, _ = features.shape
    return head(features.flatten(0, 1)).view(batch, cells, -1)


def _resolve_ladder_levels(config: SiameseConfig, num_levels: int) -> list[int]:
    """The loss levels; the last backbone level always carries the ordinary loss."""
    levels = list(config.ladder_levels or [num_levels])
    if levels[-1] != num_levels:
        raise ValueError(
            f"`ladder_levels` must end with the last level of {config.backbone!r} ({num_levels}), whose heads are "
            f"the ordinary ones; got {levels}."
        )
    return levels


class SiameseForImageClassification(SiamesePreTrainedModel):
    """The encoder with a linear classifier on its pooled features (linear probe or fine-tuning)."""

    def __init__(self, config: SiameseConfig):
        super().__init__(config)
        self.num_labels = config.num_labels
        self.siamese = SiameseModel(config)
        self.classifier = nn.Linear(self.siamese.num_features, config.num_labels)
        if config.freeze_encoder:
            self.siamese.requires_grad_(False)
        self.post_init()

    def train(self, mode: bool = True):
        super().train(mode)
        if self.config.freeze_encoder:
            self.siamese.eval()  # a frozen encoder must not update its BatchNorm statistics either
        return self

    def forward(
        self,
        pixel_values: torch.Tensor,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> ImageClassifierOutput | tuple:
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        outputs = self.siamese(pixel_values, output_hidden_states=output_hidden_states, return_dict=True)
        logits = self.classifier(outputs.pooler_output)
        loss = F.cross_entropy(logits, labels) if labels is not None else None
        output = ImageClassifierOutput(loss=loss, logits=logits, hidden_states=outputs.hidden_states)
        return output if return_dict else output.to_tuple()


SiameseConfig.register_for_auto_class()
SiameseModel.register_for_auto_class("AutoModel")
SiameseForPreTraining.register_for_auto_class("AutoModelForPreTraining")
SiameseForImageClassification.register_for_auto_class("AutoModelForImageClassification")

__all__ = [
    "SiameseForImageClassification",
    "SiameseForPreTraining",
    "SiameseModel",
    "SiamesePreTrainedModel",
    "SiamesePreTrainingOutput",
]
