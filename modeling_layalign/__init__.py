"""LayAlign for transformers: `LayAlignConfig` and `LayAlignForCausalLM`, registered with the auto classes."""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoProcessor

from .configuration_layalign import LayAlignConfig
from .modeling_layalign import LayAlignEncoderOutput, LayAlignForCausalLM, LayAlignPreTrainedModel
from .processing_layalign import LayAlignProcessor


AutoConfig.register(LayAlignConfig.model_type, LayAlignConfig, exist_ok=True)
AutoModel.register(LayAlignConfig, LayAlignForCausalLM, exist_ok=True)
AutoModelForCausalLM.register(LayAlignConfig, LayAlignForCausalLM, exist_ok=True)
AutoProcessor.register(LayAlignConfig, LayAlignProcessor, exist_ok=True)

__all__ = [
    "LayAlignConfig",
    "LayAlignEncoderOutput",
    "LayAlignForCausalLM",
    "LayAlignPreTrainedModel",
    "LayAlignProcessor",
]
