"""Hugging Face integration: MARConfig / MARForCausalLM, registered with the Auto classes."""
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .configuration_mar import SITE_KINDS, MARConfig
from .modeling_mar import MARCache, MARForCausalLM, MARModel, MARPreTrainedModel

AutoConfig.register(MARConfig.model_type, MARConfig, exist_ok=True)
AutoModel.register(MARConfig, MARModel, exist_ok=True)
AutoModelForCausalLM.register(MARConfig, MARForCausalLM, exist_ok=True)

__all__ = ["MARConfig", "MARForCausalLM", "MARModel", "MARPreTrainedModel", "MARCache", "SITE_KINDS"]
