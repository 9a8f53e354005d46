"""Siamese self-supervised encoders over timm backbones.

Two branches see different views of the same images (Wang et al., CVPR 2022, Sec. 3): the **source** branch
(encoder, projector, predictor) receives gradients; the **target** branch produces the targets without gradient.
For MoCo, MoCo v3 and BYOL the target is an EMA copy of the source (``momentum_update``); for SimSiam it is the
source itself under stop-gradient.

This file imports only torch, timm, transformers and same-directory modules, so that ``save_pretrained`` can copy
it next to the weights and ``AutoModel.from_pretrained(path, trust_remote_code=True)`` works without hf_siamese.
"""

import math
import re
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
from .distributed import batch_shuffled
from .levels import LevelFeatures, LevelHeads, SourceOutput, Target
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
        r"^heads\.", r"^target_",
        r"^projector\.", r"^predictor\.", r"^ladder_", r"^dense_", r"^queue",  # the layout of one attribute per head kind
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
    """Source encoder, the target encoder, and per loss level its heads and MoCo queue.

    ``self.siamese`` is the source encoder, so ``AutoModel.from_pretrained`` on a pretraining checkpoint returns
    it with its trained weights. ``target_encoder`` is its EMA copy (``None`` for SimSiam). ``heads[str(level)]``
    holds a loss level's heads and queue: one level normally, one per listed backbone level with ``ladder_levels``
    (Ladder Siamese Network, Yoshihashi et al. 2022), the last level's being the ordinary ones.
    """

    main_input_name = "source_pixel_values"
    _keys_to_ignore_on_load_unexpected = []

    def __init__(self, config: SiameseConfig):
        super().__init__(config)
        self.siamese = SiameseModel(config)
        self.levels = _resolve_ladder_levels(config, len(self.siamese.stage_indices))
        self.level_weights = list(config.ladder_weights or [1.0] * len(self.levels))
        self.heads = nn.ModuleDict({
            str(level): LevelHeads(config, self._pooled_width(level), self.siamese.stage_widths[level - 1])
            for level in self.levels
        })
        self.target_encoder = SiameseModel(config) if config.uses_momentum_target else None
        if config.asym_bn:
            # AsymBN: target projector BN over a larger (synchronised) batch than the source's ghost batches.
            group = asym_bn_process_group(config.asym_bn_group_size)
            for heads in self.heads.values():
                replace_batch_norms(heads.projector, make_ghost(config.asym_bn_source_batch))
                replace_batch_norms(heads.target_projector, make_target_sync(group))
        # Every other BatchNorm tells apart the views sharing a forward pass (batch_views).
        replace_batch_norms(self, make_per_view, kinds=(nn.BatchNorm1d, nn.BatchNorm2d))
        for target in self.target_modules():  # after AsymBN's swap, whose new layers start trainable
            target.requires_grad_(False)
        self.criterion = build_loss(config)
        self.loaded_legacy_layout = False
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' ``from_pretrained``; also reads checkpoints written with one attribute per head kind
        (``projector``, ``ladder_projectors``, ``queue_level2``, ...), and saves them in the per-level layout."""
        config = kwargs.get("config")
        if not isinstance(config, SiameseConfig):
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config = SiameseConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        kwargs.setdefault("key_mapping", legacy_key_mapping(_last_level(config)))
        loaded = super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.loaded_legacy_layout = bool(getattr(model, "_weight_conversions", None))
        model._weight_conversions = []  # transformers would save in the layout the weights were read from
        return loaded

    def _pooled_width(self, level: int) -> int:
        return self.siamese.num_features if level == self.levels[-1] else self.siamese.stage_widths[level - 1]

    def level_heads(self, level: int) -> LevelHeads:
        return self.heads[str(level)]

    def _target_source_pairs(self) -> list[tuple[nn.Module, nn.Module]]:
        """Each target module with the source module it follows."""
        if self.target_encoder is None:
            return []
        return [(self.target_encoder, self.siamese), *(pair for heads in self.heads.values()
                                                        for pair in heads.target_source_pairs())]

    def target_modules(self) -> list[nn.Module]:
        """The modules of the target branch (EMA copies; none for SimSiam)."""
        return [target for target, _ in self._target_source_pairs()]

    def source_branch(self) -> tuple["SiameseModel", nn.Module]:
        """The source encoder and its last-level projector."""
        return self.siamese, self.level_heads(self.levels[-1]).projector

    def target_branch(self) -> tuple["SiameseModel", nn.Module]:
        """The encoder and last-level projector that make targets: the EMA copies, or SimSiam's source ones."""
        encoder = self.target_encoder if self.target_encoder is not None else self.siamese
        return encoder, self.level_heads(self.levels[-1]).target_heads[0]

    def queue_buffer_names(self) -> list[str]:
        """Names of MoCo's queue buffers (queues and pointers of every level), identical on every process by
        construction: each enqueues the same gathered keys."""
        if not self.config.queue_size:
            return []
        return [f"heads.{level}.{name}" for level in self.levels for name in ("queue", "queue_ptr")]

    def _init_target_and_queue(self) -> None:
        # Runs after every child is initialised or loaded: a target that was not in the checkpoint starts as a
        # copy of the source, as in every EMA framework; loaded target tensors are left alone.
        for target, source in self._target_source_pairs():
            # keep_vars: the tensors themselves, which carry the "loaded from the checkpoint" flag.
            target_tensors = target.state_dict(keep_vars=True).values()
            for target_tensor, source_tensor in zip(target_tensors, source.state_dict().values()):
                init.copy_(target_tensor, source_tensor)
        for heads in self.heads.values():
            if heads.has_queue and not getattr(heads.queue, "_is_hf_initialized", False):
                heads.reset_queue()

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

    def forward(
        self,
        source_pixel_values: list[torch.Tensor],
        target_pixel_values: list[torch.Tensor] | None = None,
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
            target_pixel_values (`list[torch.Tensor]`, *optional*):
                Views for the target branch: one group per global source view (2 groups with a symmetric loss),
                each of equal size (more than one view per group = MeanEnc). Global source view `d` is paired
                with target group `1 - d` (symmetric) or group 0; local crops are paired with every group.
                Omitted: each global source view is also its own target group, as in BYOL and SimSiam, and
                SimSiam reuses its source projection as the target (Chen & He 2021, Alg. 1).
            source_geometry, target_geometry (`list[torch.Tensor]`, *optional*):
                Each view's crop geometry `[B, 5]` (top, left, height, width, flipped), as `collate_views` gives
                it; required by the Ladder's dense term (`ladder_dense_weight > 0`).
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        groups, group_geometry = self._target_groups(
            source_pixel_values, target_pixel_values, source_geometry, target_geometry)
        source = self._project_source_views(source_pixel_values, num_global=len(groups))
        if target_pixel_values is None and self.target_encoder is None:  # SimSiam: already encoded by the source
            targets = {level: [view.as_target().normalized() for view in views[:len(groups)]]
                       for level, views in source.items()}
        else:
            targets = self._encode_targets(groups)
        losses = {level: self._level_loss(self.level_heads(level), source[level], targets[level], source_geometry,
                                          group_geometry) for level in self.levels}
        if self.config.queue_size and self.training:
            for level in self.levels:
                self.level_heads(level).enqueue(torch.cat([target.embedding for target in targets[level]]))
        last = self.levels[-1]
        output = self._output(losses, source[last], targets[last])
        return output if return_dict else output.to_tuple()

    def _target_groups(self, source_pixel_values, target_pixel_values, source_geometry, target_geometry) -> tuple:
        """The target views cut into the framework's groups and each group's crop geometry, after checking that
        the inputs fit the config. Without target views, each global source view is its own group."""
        num_groups = self.config.num_target_groups
        if len(source_pixel_values) < num_groups:
            raise ValueError(
                f"`source_pixel_values` needs at least {num_groups} global view(s) for framework "
                f"{self.config.framework!r} (symmetric_loss={self.config.symmetric_loss}), got {len(source_pixel_values)}."
            )
        if target_pixel_values is None and not self.config.symmetric_loss:
            raise ValueError(
                f"`target_pixel_values` is required with one loss direction (framework {self.config.framework!r}): "
                "the target view must be another view of the image than the source's."
            )
        if target_pixel_values is None:
            groups = [[view] for view in source_pixel_values[:num_groups]]
            geometry = None if source_geometry is None else source_geometry[:num_groups]
        elif not target_pixel_values or len(target_pixel_values) % num_groups:
            raise ValueError(
                f"`target_pixel_values` must hold {num_groups} group(s) of equal size, got {len(target_pixel_values)} views."
            )
        else:
            size = len(target_pixel_values) // num_groups
            groups = [target_pixel_values[group * size : (group + 1) * size] for group in range(num_groups)]
            geometry = None if target_geometry is None else target_geometry[::size]
        if self.config.ladder_dense_weight and (source_geometry is None or geometry is None):
            raise ValueError(
                "`source_geometry` and `target_geometry` are required when `ladder_dense_weight` > 0 (the dense "
                "term matches cells by crop geometry); build the views with MultiViewTransform.from_config."
            )
        return groups, geometry

    def _level_features(self, encoder: "SiameseModel", pixel_values: torch.Tensor) -> dict[int, LevelFeatures]:
        """Every loss level's features of a batch (with the dense term, per cell too)."""
        dense = bool(self.config.ladder_dense_weight)
        if len(self.levels) == 1 and not dense:
            return {self.levels[0]: LevelFeatures(encoder(pixel_values).pooler_output)}
        output = encoder(pixel_values, output_hidden_states=True)
        features = {}
        for level in self.levels:
            stage = output.hidden_states[level - 1]
            pooled = output.pooler_output if level == self.levels[-1] else pool_stage(
                stage, encoder.backbone, self.config.ladder_vit_pooling)
            features[level] = LevelFeatures(pooled, stage_cells(stage, encoder.backbone) if dense else None)
        return features

    def _project_source(self, pixel_values: torch.Tensor) -> dict[int, SourceOutput]:
        features = self._level_features(self.siamese, pixel_values)
        return {level: self.level_heads(level).project(level_features) for level, level_features in features.items()}

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

    def _project_source_views(self, views: list[torch.Tensor], num_global: int) -> dict[int, list[SourceOutput]]:
        """Per level, the source heads' output for every view, each view with its own BatchNorm statistics as in
        the references (local crops optionally together)."""
        outputs = {level: [] for level in self.levels}
        for views_by_norm in self._source_passes(views, num_global):
            num_views = sum(len(group) for group in views_by_norm)
            for level, output in self._in_one_pass(views_by_norm, self._project_source).items():
                outputs[level].extend(output.chunk(num_views))
        return outputs

    @torch.no_grad()
    def _encode_targets(self, groups: list[list[torch.Tensor]]) -> dict[int, list[Target]]:
        """Per level, each target group's normalised target from the target branch."""
        targets = {level: [] for level in self.levels}
        for group_targets in self._target_mean_projections(groups):
            for level, target in group_targets.items():
                targets[level].append(target.normalized())
        return targets

    @torch.no_grad()
    def _target_mean_projections(self, groups: list[list[torch.Tensor]]) -> list[dict[int, Target]]:
        """Per target group, per level, the mean of the target's un-normalised projections of the group's views
        (MeanEnc normalises them together) and the cell projections of its first view (the others' cells do not
        line up with it). Groups share a pass with `batch_views`, except under shuffling BN, which permutes each
        group's batch on its own as MoCo does."""
        encoder, _ = self.target_branch()

        def encode(pixels: torch.Tensor) -> dict[int, Target]:
            features = self._level_features(encoder, pixels)
            return {level: self.level_heads(level).project_target(level_features)
                    for level, level_features in features.items()}

        def encode_shuffled(pixels: torch.Tensor) -> dict[int, Target]:
            return batch_shuffled(encode, pixels)

        shuffle = self.config.shuffle_bn
        alike = len({(len(group), group[0].shape) for group in groups}) == 1
        passes = [groups] if self._batches_views and alike and not shuffle else [[group] for group in groups]
        results = []
        for pass_groups in passes:
            targets = self._in_one_pass(pass_groups, encode_shuffled if shuffle else encode)
            per_group = {level: target.per_group(len(pass_groups), len(pass_groups[0]))
                         for level, target in targets.items()}
            results.extend({level: split[group] for level, split in per_group.items()}
                           for group in range(len(pass_groups)))
        return results

    def target_mean_projection(self, views: list[torch.Tensor]) -> torch.Tensor:
        """MeanEnc (Wang et al. 2022, Sec. 4.5): the mean of the target's un-normalised projections of ``views``.

        The views are encoded in one batch. With a single view this is just its target projection.
        """
        return self._target_mean_projections([views])[0][self.levels[-1]].embedding

    def _level_loss(self, heads: LevelHeads, views: list[SourceOutput], targets: list[Target], source_geometry,
                    group_geometry) -> "LevelLoss":
        """One level's global, local (MultiCrop) and dense terms."""
        negatives = heads.negatives()
        global_term, local_term = self._pair_terms([view.prediction for view in views],
                                                   [target.embedding for target in targets], negatives)
        dense_term = None
        if self.config.ladder_dense_weight:
            dense_term = self._dense_term([view.cell_prediction for view in views],
                                          [target.cells for target in targets], source_geometry, group_geometry)
        return LevelLoss(global_term, local_term, dense_term)

    def _pair_loss(self, prediction: torch.Tensor, target: torch.Tensor, negatives: torch.Tensor | None) -> torch.Tensor:
        # In fp32 whatever the branches' dtypes (16-bit source and fp32 target under DeepSpeed bf16/fp16).
        prediction, target = prediction.float(), target.float()
        if negatives is not None:
            return self.criterion(prediction, target, negatives)
        return self.criterion(prediction, target)

    def _pair_terms(self, predictions, targets, negatives) -> tuple[torch.Tensor, torch.Tensor | None]:
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

    def _output(self, losses: dict[int, "LevelLoss"], last_views: list[SourceOutput],
                last_targets: list[Target]) -> SiamesePreTrainingOutput:
        """The total loss (levels weighted by `ladder_weights`) and its parts."""
        weighted = list(zip(self.level_weights, losses.values()))
        global_loss = _weighted_sum((weight, loss.global_term) for weight, loss in weighted)
        local_loss = _weighted_sum((weight, loss.local_term) for weight, loss in weighted)
        dense_loss = _weighted_sum((weight, loss.dense_term) for weight, loss in weighted)
        loss = global_loss if local_loss is None else global_loss + local_loss
        if dense_loss is not None:
            loss = loss + self.config.ladder_dense_weight * dense_loss
        return SiamesePreTrainingOutput(
            loss=loss,
            global_loss=global_loss,
            local_loss=local_loss,
            level_losses={level: loss.total(self.config.ladder_dense_weight) for level, loss in losses.items()},
            dense_loss=dense_loss,
            source_predictions=tuple(view.prediction for view in last_views),
            target_embeddings=tuple(target.embedding for target in last_targets),
        )


@dataclass
class LevelLoss:
    """One level's unweighted terms: global views, local crops (MultiCrop) and matched cells (dense term)."""

    global_term: torch.Tensor
    local_term: torch.Tensor | None = None
    dense_term: torch.Tensor | None = None

    def total(self, dense_weight: float) -> torch.Tensor:
        total = self.global_term if self.local_term is None else self.global_term + self.local_term
        return total if self.dense_term is None else total + dense_weight * self.dense_term


def _weighted_sum(terms) -> torch.Tensor | None:
    """``sum(weight * term)`` over the terms that exist; ``None`` when none does."""
    weighted = [weight * term for weight, term in terms if term is not None]
    return sum(weighted[1:], weighted[0]) if weighted else None


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")
_LEGACY_PER_LEVEL = {"ladder_projectors": "projector", "ladder_predictors": "predictor",
                     "target_ladder_projectors": "target_projector", "dense_projectors": "dense_projector",
                     "dense_predictors": "dense_predictor", "target_dense_projectors": "target_dense_projector"}


def legacy_key_mapping(last_level: int) -> dict[str, str]:
    """Regular-expression renames from the layout with one attribute per head kind (``projector``,
    ``ladder_projectors.2``, ``queue_level2``, ...) to ``heads.{level}.*``."""
    mapping = {rf"^{old}\.(\d+)\.": rf"heads.\1.{new}." for old, new in _LEGACY_PER_LEVEL.items()}
    mapping.update({rf"^{name}\.": f"heads.{last_level}.{name}." for name in ("projector", "predictor",
                                                                              "target_projector")})
    mapping.update({r"^queue_level(\d+)$": r"heads.\1.queue", r"^queue_ptr_level(\d+)$": r"heads.\1.queue_ptr",
                    r"^queue$": f"heads.{last_level}.queue", r"^queue_ptr$": f"heads.{last_level}.queue_ptr"})
    return mapping


def legacy_key(name: str, last_level: int) -> str:
    """``name`` of the layout with one attribute per head kind in the per-level layout (other names unchanged)."""
    for pattern, replacement in legacy_key_mapping(last_level).items():
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return name


def _rename_legacy_keys(model: "SiameseForPreTraining", state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook (training checkpoints): old-layout keys renamed in place."""
    for key in [key for key in state_dict if key.startswith(prefix)]:
        renamed = legacy_key(key[len(prefix):], model.levels[-1])
        if renamed != key[len(prefix):]:
            state_dict[prefix + renamed] = state_dict.pop(key)
            model.loaded_legacy_layout = True


def _last_level(config: SiameseConfig) -> int:
    """The last loss level of ``config``'s model: the backbone's number of levels, read from a meta-device copy."""
    if config.ladder_levels:
        return list(config.ladder_levels)[-1]
    with torch.device("meta"):
        return len(stage_indices(create_backbone(config)))



def _same_size_runs(views: list[torch.Tensor]) -> list[list[torch.Tensor]]:
    """``views`` cut into runs of consecutive views of one shape (MultiCrop's local crops of one size)."""
    runs = []
    for view in views:
        if runs and runs[-1][-1].shape == view.shape:
            runs[-1].append(view)
        else:
            runs.append([view])
    return runs


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
