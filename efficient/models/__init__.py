"""Decoder models (Llama 2/3, Mistral, Qwen2/3, Gemma 3 text): config, families, NNX
modules (parameters only, layers stacked), HF and GGUF loading, the shared forward."""

from efficient.models.config import ModelConfig, RopeConfig
from efficient.models.families import get_family, supported_model_types
from efficient.models.forward import forward, jit_forward, validate_tokens
from efficient.models.gguf import GGUFError, config_from_gguf, from_gguf
from efficient.models.llama import LlamaModel
from efficient.models.model import (
    LAYER_LOOPS,
    DecoderModel,
    check_layer_loop,
    fit_cache_to_layers,
    set_layer_loop,
    unstack_layers,
)
from efficient.models.packaged import PACKAGED_MODELS, packaged_model_available, packaged_model_path, resolve_model_path
from efficient.models.loading import (
    CheckpointError,
    from_pretrained,
    load_config,
    save_pretrained,
    to_hf_config,
)

__all__ = [
    "CheckpointError",
    "DecoderModel",
    "LlamaModel",
    "PACKAGED_MODELS",
    "packaged_model_available",
    "packaged_model_path",
    "resolve_model_path",
    "ModelConfig",
    "RopeConfig",
    "forward",
    "GGUFError",
    "config_from_gguf",
    "from_gguf",
    "jit_forward",
    "from_pretrained",
    "load_config",
    "save_pretrained",
    "to_hf_config",
    "get_family",
    "supported_model_types",
    "unstack_layers",
    "set_layer_loop",
    "fit_cache_to_layers",
    "check_layer_loop",
    "LAYER_LOOPS",
    "validate_tokens",
]
