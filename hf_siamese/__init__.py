"""hf_siamese: asymmetric and ladder Siamese self-supervised image encoders, the Hugging Face way.

Importing the package registers the config and the three model classes with transformers' Auto classes.
"""

from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageClassification,
    AutoModelForPreTraining,
)

from .configuration_siamese import FRAMEWORK_DEFAULTS, FRAMEWORKS, SiameseConfig
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

__all__ = [
    "FRAMEWORKS",
    "FRAMEWORK_DEFAULTS",
    "SiameseConfig",
    "SiameseForImageClassification",
    "SiameseForPreTraining",
    "SiameseModel",
    "SiamesePreTrainedModel",
    "SiamesePreTrainingOutput",
]
