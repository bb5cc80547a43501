"""Llama-family models: config, NNX modules (parameters only), HF loading, forward."""

from efficient.models.config import ModelConfig, RopeConfig
from efficient.models.forward import forward, jit_forward, validate_tokens
from efficient.models.llama import LlamaModel
from efficient.models.loading import (
    CheckpointError,
    from_pretrained,
    load_config,
    save_pretrained,
    to_hf_config,
)

__all__ = [
    "CheckpointError",
    "LlamaModel",
    "ModelConfig",
    "RopeConfig",
    "forward",
    "jit_forward",
    "from_pretrained",
    "load_config",
    "save_pretrained",
    "to_hf_config",
    "validate_tokens",
]
