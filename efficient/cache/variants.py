"""The built-in caches of the variant registry (`efficient.registry`)."""

from __future__ import annotations

import functools

from efficient.cache.dense import DenseKVCache
from efficient.registry import register_cache

register_cache("dense", DenseKVCache.for_model, lossless=True,
               description="Dense KV buffer in the model dtype (the baseline)")
register_cache("dense_bf16", functools.partial(DenseKVCache.for_model, dtype="bfloat16"), lossless=False,
               description="Dense KV buffer stored in bfloat16 (half the memory of a float32 model's)")
