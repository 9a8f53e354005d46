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

from .backbones import create_backbone, forward_stages, stage_indices
from .batchnorm import (
    ViewNorms,
    asym_bn_process_group,
    convert_sync_batchnorm,
    make_ghost,
    make_per_view,
    make_target_sync,
    replace_batch_norms,
)
from .checkpoint_layout import legacy_key, legacy_key_mapping, unnumbered_level
from .configuration_siamese import SiameseConfig
from .encoding import encode_sources, encode_targets, target_projections
from .levels import LevelHeads
from .objective import SiameseObjective
from .view_layout import ViewLayout


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
        # writes through the guarded `transformers.initialization` functions, so those modules must run too
        # (transformers 5 has no public switch for this).
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
        self.heads = nn.ModuleDict({
            str(level): LevelHeads(config, self._pooled_width(level), self.siamese.stage_widths[level - 1])
            for level in self.levels
        })
        self.target_encoder = SiameseModel(config) if config.uses_momentum_target else None
        if config.asym_bn:
            _use_asym_bn(config, self.heads.values())
        # Every other BatchNorm tells apart the views sharing a forward pass (batch_views).
        replace_batch_norms(self, make_per_view, kinds=(nn.BatchNorm1d, nn.BatchNorm2d))
        for target in self.target_modules():  # after AsymBN's swap, whose new layers start trainable
            target.requires_grad_(False)
        self.layout = ViewLayout.from_config(config)
        self.objective = SiameseObjective(config, dict(zip(self.levels, config.ladder_weights or [1.0] * len(self.levels))))
        self.view_norms = ViewNorms(self)
        self.loaded_legacy_layout = False
        self.register_load_state_dict_pre_hook(_rename_legacy_keys)
        self.post_init()

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        """As transformers' ``from_pretrained``; also reads checkpoints written with one attribute per head kind
        (``projector``, ``ladder_projectors.2``, ``queue_level2``, ...) through the public ``key_mapping``."""
        config = kwargs.get("config")
        if not isinstance(config, SiameseConfig):
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            config = SiameseConfig.from_pretrained(pretrained_model_name_or_path, **hub_kwargs)
        kwargs.setdefault("key_mapping", legacy_key_mapping(unnumbered_level(config)))
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def save_pretrained(self, save_directory, *args, save_original_format: bool = False, **kwargs):
        """Always in this code's per-level layout: transformers' default writes back the layout the weights were
        read from."""
        return super().save_pretrained(save_directory, *args, save_original_format=save_original_format, **kwargs)

    @property
    def criterion(self) -> nn.Module:
        """The framework's loss between one prediction and one target."""
        return self.objective.criterion

    @property
    def batches_views(self) -> bool:
        """`batch_views`, unless a BatchNorm cannot tell views apart or activation checkpointing recomputes the
        pass outside the per-view context: then one pass per view."""
        checkpointing = getattr(self.siamese.backbone, "grad_checkpointing", False)
        return self.config.batch_views and self.view_norms.all_per_view and not checkpointing

    def convert_sync_batchnorm(self, process_group=None) -> "SiameseForPreTraining":
        """``--sync_bn``: every plain BatchNorm as a SyncBatchNorm (per view where it was); AsymBN's kept."""
        convert_sync_batchnorm(self, process_group)
        self.view_norms = ViewNorms(self)
        return self

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
                The source views `[B, C, H, W]`: the global views first (2 with a symmetric loss, else 1), then any
                local crops. Each view has its own BatchNorm statistics, in a pass of its own or not (`batch_views`).
            target_pixel_values (`list[torch.Tensor]`, *optional*):
                The target groups' views, group after group (several views per group = MeanEnc). Omitted: each
                global source view is its own target group, as in BYOL and SimSiam (SimSiam reuses its projection).
            source_geometry, target_geometry (`list[torch.Tensor]`, *optional*):
                Each view's crop geometry `[B, 5]` (top, left, height, width, flipped), as the transform gives it;
                required by the Ladder's dense term (`ladder_dense_weight > 0`).

        The pairing of views and groups is :mod:`hf_siamese.view_layout`'s.
        """
        return_dict = return_dict if return_dict is not None else self.config.return_dict
        views = self.layout.read(source_pixel_values, target_pixel_values, source_geometry, target_geometry)
        sources = encode_sources(self, views)
        targets = encode_targets(self, views, sources)
        losses = self.objective(sources, targets, {level: self.level_heads(level).negatives() for level in self.levels},
                                views)
        if self.config.queue_size and self.training:
            for level in self.levels:
                self.level_heads(level).enqueue(torch.cat([target.embedding for target in targets[level]]))
        output = SiamesePreTrainingOutput(
            loss=losses.loss, global_loss=losses.global_loss, local_loss=losses.local_loss,
            level_losses=losses.level_losses, dense_loss=losses.dense_loss,
            source_predictions=tuple(source.prediction for source in sources[self.levels[-1]]),
            target_embeddings=tuple(target.embedding for target in targets[self.levels[-1]]),
        )
        return output if return_dict else output.to_tuple()

    def target_mean_projection(self, views: list[torch.Tensor]) -> torch.Tensor:
        """MeanEnc (Wang et al. 2022, Sec. 4.5): the mean of the target's un-normalised projections of ``views``.

        The views are encoded in one batch. With a single view this is just its target projection.
        """
        return target_projections(self, [views])[self.levels[-1]][0].embedding


def _use_asym_bn(config: SiameseConfig, level_heads) -> None:
    """AsymBN: target projector BN over a larger (synchronised) batch than the source's ghost batches."""
    group = asym_bn_process_group(config.asym_bn_group_size)
    for heads in level_heads:
        replace_batch_norms(heads.projector, make_ghost(config.asym_bn_source_batch))
        replace_batch_norms(heads.target_projector, make_target_sync(group))


_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "subfolder", "token")


def _rename_legacy_keys(model: "SiameseForPreTraining", state_dict: dict, prefix: str, *args) -> None:
    """``load_state_dict`` pre-hook (training checkpoints): old-layout keys renamed in place, and whether there
    were any recorded (a ladder's older checkpoint cannot resume: its optimizer state orders the heads otherwise)."""
    renamed_any = False
    for key in [key for key in state_dict if key.startswith(prefix)]:
        renamed = legacy_key(key[len(prefix):], model.levels[-1])
        if renamed != key[len(prefix):]:
            state_dict[prefix + renamed] = state_dict.pop(key)
            renamed_any = True
    model.loaded_legacy_layout = renamed_any


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
