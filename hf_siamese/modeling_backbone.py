"""Any hf_siamese checkpoint as a transformers *backbone*, for transformers' own dense heads.

Dense heads (UperNet, the DETR family, Mask2Former, DPT hybrid, ...) build their encoder with
``load_backbone(config)``, i.e. ``AutoBackbone.from_config(config.backbone_config)``, and read
``BackboneOutput.feature_maps`` and ``backbone.channels``; they never know which backbone they hold. So
:class:`SiameseBackbone` is a thin class beside :class:`SiameseModel` with the same weight layout (``backbone.*``,
the timm model), as transformers' ``ResNetBackbone`` sits beside ``ResNetModel``: a pretraining directory loads
into it exactly as into ``AutoModel``, the ``siamese.`` prefix (the source encoder) stripped and the target encoder
and heads ignored. ``load_backbone`` always builds the backbone randomly, so :func:`load_backbone_weights` puts a
trained encoder into a head's backbone, refusing loudly when any tensor does not fit.

It lives beside the modeling file rather than in it: the pretraining model reads top to bottom without it, and
the remote-code copy of a checkpoint (``trust_remote_code``) does not need it (dense heads need ``import
hf_siamese`` anyway: transformers resolves a nested ``backbone_config`` without remote code).
"""

import os

import torch
from torch import nn
from transformers.backbone_utils import BackboneMixin, filter_output_hidden_states
from transformers.modeling_outputs import BackboneOutput
from transformers.utils.generic import can_return_tuple

from .backbones import create_backbone
from .configuration_siamese import SiameseConfig
from .modeling_siamese import SiamesePreTrainedModel


class SiameseBackbone(BackboneMixin, SiamesePreTrainedModel):
    """The encoder's per-stage maps (NCHW) for dense heads: ResNet `stem`, `stage1`..`stage4`; ViT `block1`..
    `blockN`, whose patch tokens are laid out on the patch grid (timm's ``forward_intermediates``, prefix tokens
    dropped, no final norm). `out_features` / `out_indices` of the config choose the stages returned.

    ``SiameseBackbone.from_pretrained(directory, out_features=[...])`` loads the trained source encoder of any
    hf_siamese directory (pretraining, encoder or classifier save).
    """

    has_attentions = False
    _no_split_modules = ["SiameseBackbone"]
    _keys_to_ignore_on_load_unexpected = [*SiamesePreTrainedModel._keys_to_ignore_on_load_unexpected, r"^classifier\."]

    def __init__(self, config: SiameseConfig):
        super().__init__(config)
        # SiameseModel's attribute (the checkpoints' keys, unchanged); dense heads feed images of any size
        self.backbone = create_backbone(config, any_image_size=True)
        self.num_features = [info["num_chs"] for info in self.backbone.feature_info]
        if len(self.num_features) != len(self.stage_names):
            raise ValueError(f"The config's `stage_names` {self.stage_names} do not fit {config.backbone!r}, which "
                             f"has {len(self.num_features)} stages; rebuild the config from its fields.")
        self.post_init()

    def _set_gradient_checkpointing(self, enable: bool = True, *args, **kwargs) -> None:
        self.backbone.set_grad_checkpointing(enable)

    @can_return_tuple
    @filter_output_hidden_states
    def forward(
        self,
        pixel_values: torch.Tensor,
        output_hidden_states: bool | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> BackboneOutput:
        r"""
        Returns:
            [`BackboneOutput`]: `feature_maps`, one `[B, C, H, W]` map per stage of `out_features`, widths
            `self.channels`; `hidden_states`, when requested, the map of every stage in `stage_names`.
        """
        maps = self.backbone.forward_intermediates(
            pixel_values.to(self.dtype), indices=list(range(len(self.stage_names))), output_fmt="NCHW",
            intermediates_only=True,
        )
        feature_maps = tuple(stage_map for name, stage_map in zip(self.stage_names, maps) if name in self.out_features)
        return BackboneOutput(feature_maps=feature_maps, hidden_states=tuple(maps))


def load_backbone_weights(head_model: nn.Module, model_dir: str | os.PathLike, **from_pretrained_kwargs) -> int:
    """Put the trained source encoder of ``model_dir`` into the :class:`SiameseBackbone` of ``head_model``.

    transformers' dense heads build their backbone randomly (``load_backbone``); this is the step that makes it
    the pretrained one. ``model_dir`` is any hf_siamese directory (a pretraining output, whose target encoder and
    heads are left out, or an encoder save), read with the key mapping ``AutoModel`` uses. Nothing is loaded, and a
    ``ValueError`` names the tensors, when any tensor is missing, unexpected or of another shape.

    Returns:
        `int`: the number of tensors loaded.

    Example:
        >>> head = UperNetForSemanticSegmentation(UperNetConfig(  # doctest: +SKIP
        ...     backbone_config=AutoConfig.from_pretrained("outputs/demo", out_features=["stage1", "stage2",
        ...                                                "stage3", "stage4"]), num_labels=3))
        >>> num_loaded = load_backbone_weights(head, "outputs/demo")  # doctest: +SKIP
    """
    backbone = _the_siamese_backbone(head_model)
    weights = load_pretrained_backbone(model_dir, **from_pretrained_kwargs).state_dict()
    _refuse_if_any(model_dir, "the head's backbone", " Build the head's `backbone_config` from that directory.",
                   **_unfitting_keys(backbone, weights))
    backbone.load_state_dict(weights, strict=False)  # strict in effect: _unfitting_keys found nothing
    return len(weights.keys() & backbone.state_dict().keys())


def load_pretrained_backbone(model_dir: str | os.PathLike, **from_pretrained_kwargs) -> SiameseBackbone:
    """``SiameseBackbone.from_pretrained``, refusing (``ValueError`` naming the tensors) a directory whose weights
    leave any tensor missing, unexpected or of another shape, where ``from_pretrained`` only warns."""
    backbone, info = SiameseBackbone.from_pretrained(model_dir, output_loading_info=True, **from_pretrained_kwargs)
    _refuse_if_any(model_dir, "its own config", missing=info["missing_keys"], unexpected=info["unexpected_keys"],
                   shape_mismatch=info["mismatched_keys"])
    return backbone


def _the_siamese_backbone(head_model: nn.Module) -> SiameseBackbone:
    found = [module for module in head_model.modules() if isinstance(module, SiameseBackbone)]
    if len(found) != 1:
        raise ValueError(
            f"{type(head_model).__name__} holds {len(found)} SiameseBackbone modules, expected one: build the head "
            "with `backbone_config=AutoConfig.from_pretrained(model_dir, out_features=[...])` after "
            "`import hf_siamese`."
        )
    return found[0]


def _unfitting_keys(backbone: SiameseBackbone, weights: dict[str, torch.Tensor]) -> dict[str, list[str]]:
    """The head backbone's tensors that ``weights`` would leave unloaded, and the weights it has no place for.

    A step counter of BatchNorm (``num_batches_tracked``) is not a weight: a head may freeze its BatchNorms into
    modules without one (DETR's frozen BatchNorm drops it on load).
    """
    own = backbone.state_dict()
    return {
        "missing": sorted(own.keys() - weights.keys()),
        "unexpected": sorted(key for key in weights.keys() - own.keys() if not key.endswith(".num_batches_tracked")),
        "shape_mismatch": sorted(f"{key} {tuple(weights[key].shape)} vs {tuple(own[key].shape)}"
                                 for key in own.keys() & weights.keys() if own[key].shape != weights[key].shape),
    }


def _refuse_if_any(model_dir, does_not_fit: str, advice: str = "", **problems) -> None:
    described = [f"{kind.replace('_', ' ')}: {', '.join(sorted(map(str, keys)))}"
                 for kind, keys in problems.items() if keys]
    if described:
        raise ValueError(f"The encoder of {os.fspath(model_dir)!r} does not fit {does_not_fit} ("
                         + "; ".join(described) + ")." + advice)


__all__ = ["SiameseBackbone", "load_backbone_weights", "load_pretrained_backbone"]
