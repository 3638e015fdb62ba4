"""calmrl_hf: CalMRL (calibrated multimodal representation learning with missing modalities) for transformers."""

from transformers import AutoConfig, AutoModel, AutoModelForZeroShotImageClassification

from .configuration_calmrl import CalMRLConfig
from .feature_encoder import FeatureEncoderConfig, FeatureEncoderModel
from .imputer import PPCAImputer, PPCAStatistics
from .modeling_calmrl import CalMRLEncoding, CalMRLModel, CalMRLOutput, CalMRLPreTrainedModel
from .processing_calmrl import CalMRLProcessor, register_auto_processor


__version__ = "0.1.0"

# `import calmrl_hf` makes AutoConfig / AutoModel resolve model_type "calmrl" to the installed classes;
# register_for_auto_class makes save_pretrained copy the code, so `trust_remote_code=True` works without it.
AutoConfig.register(CalMRLConfig.model_type, CalMRLConfig, exist_ok=True)
AutoModel.register(CalMRLConfig, CalMRLModel, exist_ok=True)
AutoModelForZeroShotImageClassification.register(CalMRLConfig, CalMRLModel, exist_ok=True)  # transformers' pipeline
register_auto_processor(CalMRLConfig)
CalMRLConfig.register_for_auto_class()
CalMRLModel.register_for_auto_class("AutoModel")

__all__ = ["CalMRLEncoding", "FeatureEncoderConfig", "FeatureEncoderModel", "CalMRLConfig", "CalMRLModel", "CalMRLOutput", "CalMRLPreTrainedModel", "CalMRLProcessor", "PPCAImputer",
           "PPCAStatistics"]
