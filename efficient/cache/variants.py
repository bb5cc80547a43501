"""The built-in caches of the variant registry (`efficient.registry`)."""

from __future__ import annotations

import functools

from efficient.cache.dense import DenseKVCache
from efficient.cache.kivi import KIVICache
from efficient.cache.paged import PagedKVCache
from efficient.registry import register_cache

register_cache("dense", DenseKVCache.for_model, lossless=True,
               description="Dense KV buffer in the model dtype (the baseline)")
register_cache("dense_bf16", functools.partial(DenseKVCache.for_model, dtype="bfloat16"), lossless=False,
               description="Dense KV buffer stored in bfloat16 (half the memory of a float32 model's)")
register_cache("paged", PagedKVCache.for_model, lossless=True,
               description="Paged KV pool (16-slot pages, per-row page tables; PagedAttention)",
               paper="Kwon et al. 2023, Efficient Memory Management for LLM Serving with PagedAttention")
def kivi_factory(bits: int, group_size: int = 32, residual_length: int = 32, **gear: object):  # noqa: ANN201
    """A KIVI (or, with `rank` / `outlier_fraction`, GEAR) cache factory; the group shrinks
    to head_dim for models with smaller heads and the residual to the capacity for shorter rows."""
    def factory(config, batch_size: int, capacity: int, dtype=None) -> KIVICache:  # noqa: ANN001
        return KIVICache.for_model(config, batch_size, capacity, dtype, bits=bits,
                                   group_size=min(group_size, config.head_dim),
                                   residual_length=min(residual_length, capacity), **gear)

    return factory


for _bits in (4, 2):
    register_cache(f"kivi{_bits}", kivi_factory(_bits), lossless=False,
                   description=f"KIVI {_bits}-bit: keys per channel, values per token, groups of 32, "
                               "32+ recent tokens in full precision",
                   paper="Liu et al. 2024, KIVI: A Tuning-Free Asymmetric 2bit Quantization for KV Cache")
register_cache("gear2", kivi_factory(2, rank=2, outlier_fraction=0.02), lossless=False,
               description="GEAR on KIVI-2: a rank-2 approximation of each group's quantization error and "
                           "2% of its entries kept exactly",
               paper="Kang et al. 2024, GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless "
                     "Generative Inference of LLM")
