"""Attention: the float32 oracle, the masking rule and the dispatcher."""

import efficient.attention.backends  # noqa: F401  (registers "pallas_tpu", "cudnn")
from efficient.attention.dispatcher import (
    DEFAULT_ORDER,
    attention,
    register_implementation,
    registered_implementations,
    resolve_order,
)
from efficient.attention.reference import attention_reference
from efficient.attention.spec import AttentionSpec, default_positions, visibility_mask
from efficient.attention.views import DenseView, KVView

__all__ = [
    "DEFAULT_ORDER",
    "AttentionSpec",
    "DenseView",
    "KVView",
    "attention",
    "attention_reference",
    "default_positions",
    "register_implementation",
    "registered_implementations",
    "resolve_order",
    "visibility_mask",
]
