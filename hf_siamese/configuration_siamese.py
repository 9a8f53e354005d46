"""Configuration of Siamese self-supervised encoders (MoCo, MoCo v3, BYOL, SimSiam over timm backbones).

The config is the only place hyperparameters live. Fields a framework defines are left ``None`` by the caller
and filled from the framework's entry in :data:`hf_siamese.frameworks.FRAMEWORKS` (the papers' official ResNet-50
recipes); an explicit value always wins.
It is also a transformers *backbone* config (``BackboneConfigMixin``: ``stage_names``, ``out_features``,
``out_indices``), so that any hf_siamese checkpoint's config can be the ``backbone_config`` of a dense head; the
stage names are read from the timm model itself, which depends only on fields saved in every config, so configs
written before these fields existed load unchanged.
At import this file loads only torch-free libraries (timm and torch wait until a config is built) and
same-directory modules, so that it can be copied next to a checkpoint and loaded with ``trust_remote_code=True``.
"""

import difflib
from collections.abc import Mapping
from types import MappingProxyType, SimpleNamespace
from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig
from transformers.backbone_utils import BackboneConfigMixin

from .frameworks import FRAMEWORKS, frameworks_using, get_framework
from .recipes import AUGMENTATIONS

# The table's defaults under their former name, read-only; hf_siamese exports it.
FRAMEWORK_DEFAULTS: Mapping[str, Mapping[str, Any]] = MappingProxyType(
    {name: framework.defaults for name, framework in FRAMEWORKS.items()}
)


@strict(accept_kwargs=True)
class SiameseConfig(BackboneConfigMixin, PreTrainedConfig):
    r"""
    Configuration of a [`SiameseModel`] / [`SiameseForPreTraining`] / [`SiameseForImageClassification`].

    Args:
        backbone (`str`, defaults to `"resnet50"`):
            timm model name (`resnet18`, `resnet50`, `vit_small_patch16_224`, ...), built with random weights.
        backbone_kwargs (`dict`, *optional*):
            Extra keyword arguments for `timm.create_model` (e.g. `{"drop_path_rate": 0.1}`).
        small_image_stem (`bool`, defaults to `False`):
            timm ResNets only: a 3x3 stride-1 convolution without max-pool as the stem (the CIFAR ResNet's), so
            that 28-64 px images keep their resolution into the first stage. Not exportable to timm's format.
        image_size (`int`, defaults to 224):
            Training resolution; passed to timm as `img_size` where the model takes it (ViT).
        num_channels (`int`, defaults to 3):
            Input channels (1 for grayscale data).
        framework (`str`, defaults to `"moco"`):
            One of `moco`, `mocov3`, `byol`, `simsiam`. Fills every framework field left `None`.
        projector_num_layers, projector_hidden_dim, projector_dim (`int`, *optional*):
            Projector depth, hidden and output width.
        predictor_num_layers, predictor_hidden_dim (`int`, *optional*):
            Predictor depth (0 = no predictor) and hidden width; its output width equals `projector_dim`.
        queue_size (`int`, *optional*):
            MoCo's FIFO queue of negative keys (a multiple of the global batch size); 0 elsewhere.
        temperature (`float`, *optional*):
            InfoNCE temperature (moco, mocov3).
        momentum, momentum_final (`float`, *optional*):
            EMA momentum of the target at the start and the end of training (half-cosine in between).
        symmetric_loss (`bool`, *optional*):
            Each of two global views is the source for the other's target (mocov3, byol, simsiam).
        shuffle_bn (`bool`, *optional*):
            MoCo's shuffling BN on several processes: the target encodes a random permutation of the global batch.
        augmentation (`str`, *optional*):
            View recipe: `mocov2` (MoCo v2 / SimSiam), `byol` (BYOL / MoCo v3, asymmetric blur and solarize) or
            `small_gray` (28-32 px one-channel images: brightness/contrast, a 3 px blur, no colour operations).
        crop_min_scale (`float`, *optional*):
            Lower bound of the global crops' RandomResizedCrop scale (recipe default: 0.2 mocov2, 0.08 byol, 0.2
            small_gray). Not with MultiCrop, whose global crops use `multicrop_global_scale`.
        image_mean, image_std (`list[float]`, *optional*):
            Normalisation per channel; ImageNet's when unset (their mean for one channel).
        multicrop (`bool`): MultiCrop: `multicrop_num_local` source-only crops of `multicrop_local_size` px at
            scale `multicrop_local_scale`; global crops then use `multicrop_global_scale`. Each local crop has its
            own BatchNorm statistics, as in the Asym-Siam reference; `multicrop_joint_bn` normalises the local crops
            of one size together instead (SwAV's form, one batch).
        batch_views (`bool`, defaults to `True`):
            Views of one size share one forward pass, with BatchNorm statistics still per view, so that results
            equal one forward per view (the references' loop, `False`) up to rounding. Stochastic layers
            (`drop_path_rate`, dropout) draw their masks in another order, so there only the distribution agrees.
        scalemix (`bool`): ScaleMix: each global source view, with probability `scalemix_probability`, is two
            source views mixed with a CutMix box.
        asym_aug (`bool`): AsymAug: RandAugment on the source; crop + flip only on the target.
        asym_bn (`bool`): AsymBN: the target projector's BN is synchronised over groups of `asym_bn_group_size`
            processes (all when unset); the source projector's BN uses ghost batches of `asym_bn_source_batch`.
        mean_encoding (`bool`): MeanEnc: the target is the mean of `mean_encoding_views` encoded views.
        ladder_levels (`list[int]`, *optional*):
            Ladder Siamese Network (Yoshihashi et al. 2022): the backbone levels that carry a Siamese loss, as
            1-based positions in `hidden_states` (ResNet stages 1-4, ViT blocks 1..depth). Must include the last
            level, whose heads are the ordinary ones. Unset: the last level only (the plain framework).
        ladder_weights (`list[float]`, *optional*):
            One weight per ladder level (default 1.0 each); the loss is the weighted sum of the level losses.
        ladder_vit_pooling (`str`, defaults to `"cls"`):
            How an intermediate ViT level is pooled: its class token (`cls`) or the mean of its patch tokens.
        ladder_dense_weight (`float`, defaults to 0.0):
            Weight of the dense (local) term at each ladder level; 0 turns it off.
        freeze_encoder (`bool`, defaults to `False`):
            [`SiameseForImageClassification`] only: freeze the encoder and keep it in eval mode (linear probe).
        out_features (`list[str]`, *optional*):
            [`SiameseBackbone`] only: the stages whose maps it returns, among `stage_names` (ResNet `stem`,
            `stage1`..`stage4`; ViT `block1`..`blockN`, read from the timm model). Defaults to the last stage.
        out_indices (`list[int]`, *optional*):
            The same stages as positions in `stage_names`; either one may be given, the other follows.
    """

    model_type = "siamese"

    backbone: str = "resnet50"
    backbone_kwargs: dict[str, Any] | None = None
    small_image_stem: bool = False
    image_size: int = 224
    num_channels: int = 3
    framework: str = "moco"
    projector_num_layers: int | None = None
    projector_hidden_dim: int | None = None
    projector_dim: int | None = None
    predictor_num_layers: int | None = None
    predictor_hidden_dim: int | None = None
    queue_size: int | None = None
    temperature: float | None = None
    momentum: float | None = None
    momentum_final: float | None = None
    symmetric_loss: bool | None = None
    shuffle_bn: bool | None = None
    augmentation: str | None = None
    crop_min_scale: float | None = None
    image_mean: list[float] | tuple[float, ...] | None = None
    image_std: list[float] | tuple[float, ...] | None = None
    # The asymmetric designs of Wang et al. (CVPR 2022); defaults are the paper's values when switched on.
    multicrop: bool = False
    multicrop_num_local: int = 6
    multicrop_local_size: int = 96
    multicrop_local_scale: list[float] | tuple[float, ...] = (0.05, 0.14)
    multicrop_global_scale: list[float] | tuple[float, ...] = (0.14, 1.0)
    multicrop_joint_bn: bool = False
    scalemix: bool = False
    scalemix_probability: float = 1.0
    asym_aug: bool = False
    asym_bn: bool = False
    asym_bn_group_size: int | None = None
    asym_bn_source_batch: int = 32
    mean_encoding: bool = False
    mean_encoding_views: int = 2
    # Ladder Siamese Network (Yoshihashi et al. 2022). Its per-level weights and dense loss are not published
    # in enough detail; these defaults are our choices (README, "Ladder Siamese").
    ladder_levels: list[int] | tuple[int, ...] | None = None
    ladder_weights: list[float] | tuple[float, ...] | None = None
    ladder_vit_pooling: str = "cls"
    ladder_dense_weight: float = 0.0
    freeze_encoder: bool = False
    batch_views: bool = True

    def __post_init__(self, **kwargs):
        out_features, out_indices = kwargs.pop("out_features", None), kwargs.pop("out_indices", None)
        kwargs.pop("stage_names", None)  # saved by to_dict; always read again from the backbone
        _refuse_misspelt_fields(kwargs)
        self._fill_framework_fields()
        if self.predictor_num_layers and self.predictor_hidden_dim is None:
            self.predictor_hidden_dim = self.projector_hidden_dim
        if kwargs.get("auto_map") is None:
            # `save_pretrained` only records the class being saved; name all three so that any Auto class
            # loads a checkpoint with trust_remote_code where hf_siamese is not installed.
            kwargs["auto_map"] = {
                "AutoConfig": "configuration_siamese.SiameseConfig",
                "AutoModel": "modeling_siamese.SiameseModel",
                "AutoModelForPreTraining": "modeling_siamese.SiameseForPreTraining",
                "AutoModelForImageClassification": "modeling_siamese.SiameseForImageClassification",
                "AutoImageProcessor": "image_processing_siamese.SiameseImageProcessor",
            }
        self._check_values()
        self.stage_names = backbone_stage_names(self)
        self.set_output_features_output_indices(out_features=out_features, out_indices=out_indices)
        super().__post_init__(**kwargs)

    def _fill_framework_fields(self):
        """Refuse framework-only fields the framework has no use for, then fill the unset ones from its table entry."""
        framework = get_framework(self.framework)
        for name in framework.unused_fields:
            if getattr(self, name) not in (None, 0):
                raise ValueError(
                    f"`{name}` does not apply to framework {self.framework!r} "
                    f"(only to {', '.join(frameworks_using(name))}); leave it unset."
                )
        for name, value in framework.defaults.items():
            if getattr(self, name) is None:
                setattr(self, name, value)

    def _check_values(self):
        _require_backbone(self.backbone)
        for name in ("image_size", "num_channels", "projector_num_layers", "projector_hidden_dim", "projector_dim"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.predictor_num_layers < 0:
            raise ValueError(f"`predictor_num_layers` must be >= 0, got {self.predictor_num_layers}.")
        if self.predictor_num_layers and self.predictor_hidden_dim <= 0:
            raise ValueError(f"`predictor_hidden_dim` must be positive, got {self.predictor_hidden_dim}.")
        if self.queue_size < 0:
            raise ValueError(f"`queue_size` must be >= 0, got {self.queue_size}.")
        if self.temperature is not None and self.temperature <= 0:
            raise ValueError(f"`temperature` must be positive, got {self.temperature}.")
        if self.momentum is not None:
            if not 0.0 <= self.momentum <= 1.0:
                raise ValueError(f"`momentum` must be in [0, 1], got {self.momentum}.")
            if not self.momentum <= self.momentum_final <= 1.0:
                raise ValueError(
                    f"`momentum_final` must be in [momentum, 1] = [{self.momentum}, 1], got {self.momentum_final}."
                )
        if self.framework == "moco" and self.queue_size == 0:
            raise ValueError("`queue_size` must be positive for framework 'moco' (its negatives come from the queue).")
        self._check_designs()

    def _check_designs(self):
        if self.augmentation not in AUGMENTATIONS:
            raise ValueError(f"`augmentation` must be one of {AUGMENTATIONS}, got {self.augmentation!r}.")
        if self.crop_min_scale is not None and not 0 < self.crop_min_scale <= 1:
            raise ValueError(f"`crop_min_scale` must be in (0, 1], got {self.crop_min_scale}.")
        for name in ("image_mean", "image_std"):
            values = getattr(self, name)
            if values is not None and len(values) != self.num_channels:
                raise ValueError(f"`{name}` needs one value per channel ({self.num_channels}), got {list(values)}.")
        for name in ("multicrop_local_scale", "multicrop_global_scale"):
            low, high = _pair(self, name)
            if not 0 < low <= high <= 1:
                raise ValueError(f"`{name}` must be (low, high) with 0 < low <= high <= 1, got {list(getattr(self, name))}.")
        for name in ("multicrop_num_local", "multicrop_local_size", "asym_bn_source_batch"):
            if getattr(self, name) <= 0:
                raise ValueError(f"`{name}` must be positive, got {getattr(self, name)}.")
        if self.asym_bn_group_size is not None and self.asym_bn_group_size <= 0:
            raise ValueError(f"`asym_bn_group_size` must be positive, got {self.asym_bn_group_size}.")
        if not 0 <= self.scalemix_probability <= 1:
            raise ValueError(f"`scalemix_probability` must be in [0, 1], got {self.scalemix_probability}.")
        if self.mean_encoding_views < 1:
            raise ValueError(f"`mean_encoding_views` must be >= 1, got {self.mean_encoding_views}.")
        self._check_ladder()
        if self.shuffle_bn and not self.uses_momentum_target:
            raise ValueError("`shuffle_bn` shuffles a separate target encoder's batch; SimSiam has none.")
        if self.asym_bn and not self.uses_momentum_target:
            raise ValueError(
                f"`asym_bn` needs a separate target projector; framework {self.framework!r} has none "
                "(SimSiam's target is the source itself)."
            )

    def _check_ladder(self):
        levels = self.ladder_levels
        if levels is not None:
            if not levels or any(not isinstance(level, int) or level < 1 for level in levels):
                raise ValueError(f"`ladder_levels` must be positive level numbers (1 = first stage), got {list(levels)}.")
            if list(levels) != sorted(set(levels)):
                raise ValueError(f"`ladder_levels` must be increasing without repeats, got {list(levels)}.")
        if self.ladder_weights is not None:
            expected = len(levels) if levels is not None else 1
            if len(self.ladder_weights) != expected:
                raise ValueError(
                    f"`ladder_weights` needs one weight per ladder level ({expected}), got {list(self.ladder_weights)}."
                )
            if any(weight < 0 for weight in self.ladder_weights):
                raise ValueError(f"`ladder_weights` must be >= 0, got {list(self.ladder_weights)}.")
        if self.ladder_vit_pooling not in ("cls", "mean"):
            raise ValueError(f"`ladder_vit_pooling` must be 'cls' or 'mean', got {self.ladder_vit_pooling!r}.")
        if self.ladder_dense_weight < 0:
            raise ValueError(f"`ladder_dense_weight` must be >= 0, got {self.ladder_dense_weight}.")
        if self.ladder_dense_weight and self.scalemix:
            raise ValueError(
                "`ladder_dense_weight` > 0 needs each source view to be one crop; ScaleMix (`scalemix`) mixes two."
            )

    @property
    def uses_momentum_target(self) -> bool:
        """Whether the target branch is a separate EMA copy (all frameworks but SimSiam)."""
        return self.momentum is not None

    @property
    def num_target_groups(self) -> int:
        """How many global views act as targets: 2 for a symmetric loss, else 1."""
        return 2 if self.symmetric_loss else 1


def _refuse_misspelt_fields(extra: dict) -> None:
    """Like every ``PreTrainedConfig``, unknown keyword arguments become attributes (saved configs may carry keys
    of other versions); one that is a near miss of a field of ours is a typo that would silently change nothing."""
    fields = [name for name in SiameseConfig.__annotations__ if not name.startswith("_")]
    for name in extra:
        close = difflib.get_close_matches(name, fields, n=1, cutoff=0.85)
        if close and name not in fields:
            raise ValueError(f"Unknown field `{name}`; did you mean `{close[0]}`?")


def _pair(config, name: str) -> tuple[float, float]:
    values = getattr(config, name)
    if len(values) != 2:
        raise ValueError(f"`{name}` must hold two numbers (low, high), got {list(values)}.")
    return float(values[0]), float(values[1])


_STAGE_NAMES: dict[str, list[str]] = {}
_STAGE_SHAPING_FIELDS = ("backbone", "backbone_kwargs", "num_channels", "image_size")


def backbone_stage_names(config) -> list[str]:
    """The backbone's stages in ``BackboneMixin``'s words: a ResNet's ``stem``, ``stage1``..``stage4``; a ViT's
    ``block1``..``blockN``: one per timm ``feature_info`` entry, the entries ``forward_intermediates`` returns.

    Read from a meta-device copy of the timm model (nothing allocated), once per architecture: configs are built
    often. Only the fields that shape the stages count (the small-image stem changes strides, not stages).
    """
    architecture = SimpleNamespace(**{name: getattr(config, name) for name in _STAGE_SHAPING_FIELDS})
    key = repr(vars(architecture))
    if key not in _STAGE_NAMES:
        _STAGE_NAMES[key] = _read_stage_names(architecture)
    return list(_STAGE_NAMES[key])


def stages_after_stem(stage_names: list[str]) -> list[str]:
    """The stages past the stem(s) (``stem`` or ``stem1``, ``stem2``...): the levels a loss or a probe can use."""
    return [name for name in stage_names if not name.startswith("stem")]


def _read_stage_names(architecture: SimpleNamespace) -> list[str]:
    import torch  # deferred, as timm in _require_backbone

    from .backbones import create_backbone, is_token_model, stage_indices

    try:
        with torch.device("meta"):
            model = create_backbone(architecture)
    except TypeError as error:  # timm's message for a keyword argument the model does not take
        raise ValueError(f"`backbone_kwargs` {architecture.backbone_kwargs} do not build {architecture.backbone!r}: "
                         f"{error}") from error
    num_stages = len(stage_indices(model))
    num_stems = len(model.feature_info) - num_stages
    stems = ["stem"] if num_stems == 1 else [f"stem{number}" for number in range(1, num_stems + 1)]
    stage = "block" if is_token_model(model) else "stage"
    return stems + [f"{stage}{number}" for number in range(1, num_stages + 1)]


def _require_backbone(name: str) -> None:
    import timm  # deferred: importing timm is slow, and configs are read in many places

    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(
            f"`backbone` must be a timm model name (e.g. 'resnet50', 'vit_small_patch16_224'), got {name!r}."
        )


__all__ = ["FRAMEWORKS", "FRAMEWORK_DEFAULTS", "SiameseConfig", "backbone_stage_names", "stages_after_stem"]
