"""NanoChat for transformers: config, model and cache.

This folder is also the custom code a saved model folder carries to the Hub: its modules import only
torch, transformers, tokenizers and safetensors, and each other relatively. Importing the package
registers the classes with transformers' Auto classes under `model_type="nanochat_hf"`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

from .cache_nanochat import NanoChatCache
from .configuration_nanochat import NanoChatConfig
from .modeling_nanochat import (
    NanoChatForCausalLM,
    NanoChatModel,
    NanoChatPreTrainedModel,
    count_flops_and_params,
)

AutoConfig.register(NanoChatConfig.model_type, NanoChatConfig, exist_ok=True)
AutoModel.register(NanoChatConfig, NanoChatModel, exist_ok=True)
AutoModelForCausalLM.register(NanoChatConfig, NanoChatForCausalLM, exist_ok=True)

__all__ = [
    "NanoChatCache",
    "NanoChatConfig",
    "NanoChatForCausalLM",
    "NanoChatModel",
    "NanoChatPreTrainedModel",
    "count_flops_and_params",
]
