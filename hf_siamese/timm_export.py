"""The source encoder as a plain timm checkpoint, or a clear refusal when timm would build another model."""

import json
from pathlib import Path

import torch
from safetensors.torch import save_file
from transformers import AutoModel

from .modeling_siamese import SiameseForPreTraining
from .views import EVAL_CROP_PCT, channel_stats


def check_timm_exportable(config) -> None:
    """Raise ``ValueError`` when timm cannot rebuild the encoder's architecture from its own model arguments."""
    if getattr(config, "small_image_stem", False):
        raise ValueError(
            "export_timm: `small_image_stem` (a 3x3 stride-1 stem without max-pool) is not an architecture timm's "
            f"{config.backbone!r} builds, so plain timm would load these weights into a different model (its 7x7 "
            "stride-2 stem and max-pool). Share the hf_siamese checkpoint instead: it loads without hf_siamese "
            "with AutoModel.from_pretrained(..., trust_remote_code=True)."
        )


def export_timm(model_or_path, output_dir: str | Path, crop_pct: float = EVAL_CROP_PCT) -> Path:
    """Write the source encoder in timm's Hub format: loads without hf_siamese, as timm or transformers models.

    ``timm.create_model("local-dir:" + output_dir, pretrained=True)`` (``hf-hub:ID`` once pushed) and
    ``AutoModel.from_pretrained(output_dir)`` (transformers' ``TimmWrapperModel``) both rebuild the backbone with the
    trained weights and give the encoder's ``pooler_output``. ``num_classes`` is written at the root and in
    ``pretrained_cfg``, never in ``model_args``: ``TimmWrapperModel`` passes ``num_classes`` itself and rejects a
    second one (as written by timm's own ``save_for_hf``).
    """
    model = model_or_path if isinstance(model_or_path, torch.nn.Module) else AutoModel.from_pretrained(model_or_path)
    encoder = model.siamese if isinstance(model, SiameseForPreTraining) else model
    check_timm_exportable(encoder.config)
    config, backbone = encoder.config, encoder.backbone
    mean, std = channel_stats(config.num_channels, config.image_mean, config.image_std)
    timm_config = {
        "architecture": config.backbone,
        "num_classes": 0,
        "num_features": backbone.num_features,
        "pretrained_cfg": {
            "input_size": [config.num_channels, config.image_size, config.image_size],
            "mean": list(mean), "std": list(std), "crop_pct": crop_pct, "crop_mode": "center",
            "interpolation": "bilinear", "num_classes": 0,
            **{key: backbone.pretrained_cfg[key] for key in ("first_conv", "classifier") if key in backbone.pretrained_cfg},
        },
        "model_args": dict(backbone.timm_model_args),
    }
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "config.json").write_text(json.dumps(timm_config, indent=2))
    state = {name: tensor.detach().cpu().contiguous() for name, tensor in backbone.state_dict().items()}
    save_file(state, output_dir / "model.safetensors", metadata={"format": "pt"})
    return output_dir
