"""Backward-compatible names: `LlamaModel` is the shared `DecoderModel` (every family).

The Llama-family layer lives in `efficient.models.families.llama`, the shared
building blocks in `efficient.models.modules`.
"""

from efficient.models.families.llama import LlamaLayer as DecoderLayer
from efficient.models.model import DecoderModel
from efficient.models.modules import MLP, Attention, RMSNorm

LlamaModel = DecoderModel

__all__ = ["MLP", "Attention", "DecoderLayer", "DecoderModel", "LlamaModel", "RMSNorm"]
