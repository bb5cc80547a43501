"""Attention: the float32 oracle, the masking rule, the views, the capability table and the dispatcher."""

import efficient.attention.backends  # noqa: F401  (registers "pallas_tpu", "cudnn")
from efficient.attention.capabilities import CAPABILITIES, Capabilities, unsupported
from efficient.attention.dispatcher import (
    DEFAULT_ORDER,
    attention,
    register_implementation,
    registered_implementations,
    resolve_order,
    unregister_implementation,
)
from efficient.attention.reference import attention_reference
from efficient.attention.spec import AttentionSpec, KeyStats, default_positions, visibility_mask
from efficient.attention.views import (
    DenseView,
    KVView,
    LowBitView,
    MixedPrecisionView,
    PagedView,
    QuantizedView,
    pack_codes,
)

__all__ = [
    "CAPABILITIES",
    "DEFAULT_ORDER",
    "AttentionSpec",
    "Capabilities",
    "DenseView",
    "KVView",
    "KeyStats",
    "LowBitView",
    "MixedPrecisionView",
    "PagedView",
    "QuantizedView",
    "attention",
    "attention_reference",
    "default_positions",
    "pack_codes",
    "register_implementation",
    "registered_implementations",
    "resolve_order",
    "unregister_implementation",
    "unsupported",
    "visibility_mask",
]
