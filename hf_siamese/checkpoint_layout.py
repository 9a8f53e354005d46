"""Checkpoints of the older head layout, one attribute per head kind (``projector``, ``ladder_projectors.2``,
``queue_level2``, ...), read into today's per-level layout (``heads.{level}.*``): one key mapping, used by
``from_pretrained`` (as transformers' ``key_mapping``) and by ``load_state_dict`` (training checkpoints) alike.

Like the modeling file, this imports only same-directory modules and the standard library (it is copied next to
saved weights for ``trust_remote_code``).
"""

import re

from .configuration_siamese import stages_after_stem

_PER_LEVEL = {"ladder_projectors": "projector", "ladder_predictors": "predictor",
              "target_ladder_projectors": "target_projector", "dense_projectors": "dense_projector",
              "dense_predictors": "dense_predictor", "target_dense_projectors": "target_dense_projector"}


def unnumbered_level(config) -> int:
    """The last loss level of ``config``'s model, whose heads were the unnumbered ones: its backbone's stage count."""
    if config.ladder_levels:
        return list(config.ladder_levels)[-1]
    return len(stages_after_stem(config.stage_names))


def legacy_key_mapping(last: int) -> dict[str, str]:
    """Regular-expression renames from the older layout to ``heads.{level}.*``; the unnumbered heads are level
    ``last``'s."""
    mapping = {rf"^{old}\.(\d+)\.": rf"heads.\1.{new}." for old, new in _PER_LEVEL.items()}
    mapping.update({rf"^{name}\.": f"heads.{last}.{name}." for name in ("projector", "predictor", "target_projector")})
    mapping.update({r"^queue_level(\d+)$": r"heads.\1.queue", r"^queue_ptr_level(\d+)$": r"heads.\1.queue_ptr",
                    r"^queue$": f"heads.{last}.queue", r"^queue_ptr$": f"heads.{last}.queue_ptr"})
    return mapping


def legacy_key(name: str, last_level: int) -> str:
    """``name`` of the older layout in the per-level layout (other names unchanged)."""
    for pattern, replacement in legacy_key_mapping(last_level).items():
        if re.search(pattern, name):
            return re.sub(pattern, replacement, name)
    return name
