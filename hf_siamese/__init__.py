"""hf_siamese: asymmetric and ladder Siamese self-supervised image encoders, the Hugging Face way.

Importing the package registers the config and the three model classes with transformers' Auto classes, and
`SiameseBackbone` with `AutoBackbone` (so that transformers' dense heads build it from a `backbone_config`).
"""

from transformers import (
    AutoBackbone,
    AutoConfig,
    AutoImageProcessor,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from . import metrics  # `hf_siamese.metrics.load_metric` after a plain `import hf_siamese`, as documented
from .configuration_siamese import FRAMEWORK_DEFAULTS, FRAMEWORKS, SiameseConfig
from .hub import image_processor_for, save_image_processor
from .image_processing_siamese import SiameseImageProcessor
from .modeling_backbone import SiameseBackbone, load_backbone_weights
from .modeling_siamese import (
    SiameseForImageClassification,
    SiameseForPreTraining,
    SiameseModel,
    SiamesePreTrainedModel,
    SiamesePreTrainingOutput,
)

__version__ = "0.1.0"

AutoConfig.register(SiameseConfig.model_type, SiameseConfig, exist_ok=True)
AutoModel.register(SiameseConfig, SiameseModel, exist_ok=True)
AutoModelForPreTraining.register(SiameseConfig, SiameseForPreTraining, exist_ok=True)
AutoModelForImageClassification.register(SiameseConfig, SiameseForImageClassification, exist_ok=True)
AutoBackbone.register(SiameseConfig, SiameseBackbone, exist_ok=True)
AutoImageProcessor.register(SiameseConfig, slow_image_processor_class=SiameseImageProcessor, exist_ok=True)
# Saved processors carry an auto_map and their code, for `trust_remote_code` where hf_siamese is not installed.
SiameseImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "FRAMEWORKS",
    "FRAMEWORK_DEFAULTS",
    "SiameseBackbone",
    "SiameseConfig",
    "SiameseForImageClassification",
    "SiameseForPreTraining",
    "SiameseImageProcessor",
    "SiameseModel",
    "SiamesePreTrainedModel",
    "SiamesePreTrainingOutput",
    "image_processor_for",
    "load_backbone_weights",
    "save_image_processor",
]
