"""timm backbones: build one from the config and read its pooled and per-stage features.

We ask timm for what it knows (``feature_info``, ``forward_intermediates``, ``forward_head``) rather than
hard-coding widths per architecture.
"""

import timm
import torch
from torch import nn

# feature_info entries that are a stem rather than a stage (ResNet lists its stem ReLU first).
_STEM_MODULES = ("act1", "stem", "conv1", "bn1")


def create_backbone(config, any_image_size: bool = False) -> nn.Module:
    """A randomly initialised timm model without classifier, at ``config.image_size`` where the model takes a size.

    With MultiCrop or ``any_image_size``, ViT-like models also get ``dynamic_img_size`` so that they take the smaller
    local crops, or a dense head's inputs (the position embedding interpolated, the weights unchanged). The
    keyword arguments the model was built with are kept as ``model.timm_model_args`` (timm's ``model_args``), so
    that a timm-format export rebuilds the same architecture.
    """
    user_kwargs = {key: value for key, value in (config.backbone_kwargs or {}).items() if key != "num_classes"}
    kwargs = {"in_chans": config.num_channels, **user_kwargs}
    # Only ViT-like models take these; convolutional nets take any size and reject them.
    optional = {"img_size": config.image_size}
    if any_image_size or getattr(config, "multicrop", False):
        optional["dynamic_img_size"] = True
    optional = {key: value for key, value in optional.items() if key not in user_kwargs}
    try:
        model = timm.create_model(config.backbone, pretrained=False, num_classes=0, **kwargs, **optional)
        kwargs.update(optional)
    except TypeError as error:
        if not any(key in str(error) for key in optional):
            raise
        model = timm.create_model(config.backbone, pretrained=False, num_classes=0, **kwargs)
    model.timm_model_args = kwargs
    if getattr(config, "small_image_stem", False):
        use_small_image_stem(model, config)
    return model


def use_small_image_stem(model: nn.Module, config) -> None:
    """Replace a timm ResNet's stem (7x7 stride-2 convolution, max-pool) with one 3x3 stride-1 convolution.

    The stem of the CIFAR ResNets (He et al. 2016, Sec. 4.2), as in SimSiam's and MoCo's CIFAR experiments: a
    28-32 px image keeps its resolution into the first stage instead of shrinking to 7-8 px.
    """
    if not all(isinstance(getattr(model, part, None), nn.Module) for part in ("conv1", "bn1", "maxpool")):
        raise ValueError(
            f"`small_image_stem` replaces a timm ResNet's stem (conv1, bn1, maxpool); backbone {config.backbone!r} "
            "has none. Use a ResNet (resnet18, resnet50, ...) or leave it off."
        )
    model.conv1 = nn.Conv2d(config.num_channels, model.bn1.num_features, kernel_size=3, stride=1, padding=1,
                            bias=False)
    nn.init.kaiming_normal_(model.conv1.weight, mode="fan_out", nonlinearity="relu")  # as timm's ResNet init
    model.maxpool = nn.Identity()
    for info in model.feature_info:  # no stride-2 convolution and max-pool before the stages any more
        info["reduction"] = max(info["reduction"] // 4, 1)


def stage_indices(backbone: nn.Module) -> list[int]:
    """``forward_intermediates`` indices of the backbone's stages: ResNet stages 1-4, every ViT block."""
    return [
        index
        for index, info in enumerate(backbone.feature_info)
        if not info["module"].startswith(_STEM_MODULES)
    ]


def is_token_model(backbone: nn.Module) -> bool:
    """Whether the backbone works on token sequences (ViT-like) rather than feature maps."""
    return hasattr(backbone, "num_prefix_tokens")


def forward_stages(
    backbone: nn.Module, pixel_values: torch.Tensor, indices: list[int]
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """Final features and the features after each stage in ``indices``.

    ResNet stages come as ``[B, C, H, W]`` maps; ViT blocks as ``[B, prefix + L, D]`` token sequences, class token
    first, like transformers' ViT hidden states.
    """
    if not is_token_model(backbone):
        return backbone.forward_intermediates(pixel_values, indices=indices, output_fmt="NCHW")
    final, stages = backbone.forward_intermediates(
        pixel_values, indices=indices, output_fmt="NLC", return_prefix_tokens=True
    )
    return final, [torch.cat([prefix, tokens], dim=1) for tokens, prefix in stages]


def pool_stage(features: torch.Tensor, backbone: nn.Module, vit_pooling: str = "cls") -> torch.Tensor:
    """A stage's features pooled to ``[B, C]``: global average of a map, or a ViT's class token / patch mean."""
    if features.dim() == 4:
        return features.mean(dim=(2, 3))
    if vit_pooling == "cls" and backbone.num_prefix_tokens:
        return features[:, 0]
    return features[:, backbone.num_prefix_tokens :].mean(dim=1)


def stage_cells(features: torch.Tensor, backbone: nn.Module) -> torch.Tensor:
    """A stage's features as ``[B, cells, C]``: the map's positions, or a ViT's patch tokens (prefix dropped)."""
    if features.dim() == 4:
        return features.flatten(2).transpose(1, 2)
    return features[:, backbone.num_prefix_tokens :]
