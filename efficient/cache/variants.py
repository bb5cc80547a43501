"""The built-in caches of the variant registry (`efficient.registry`)."""

from __future__ import annotations

import functools
import math

from efficient.cache.budgets import pyramid_budgets
from efficient.cache.dense import DenseKVCache
from efficient.cache.evicting import EvictingKVCache
from efficient.cache.kivi import KIVICache
from efficient.cache.paged import PagedKVCache
from efficient.cache.quest import QuestKVCache
from efficient.cache.vidkv import VidKVCache
from efficient.cache.zipcache import ZipCache
from efficient.cache.press import press_for_budget
from efficient.registry import register_cache

register_cache("dense", DenseKVCache.for_model, lossless=True,
               description="Dense KV buffer in the model dtype (the baseline)")
register_cache("dense_bf16", functools.partial(DenseKVCache.for_model, dtype="bfloat16"), lossless=False,
               description="Dense KV buffer stored in bfloat16 (half the memory of a float32 model's)")
register_cache("paged", PagedKVCache.for_model, lossless=True,
               description="Paged KV pool (16-slot pages, per-row page tables; PagedAttention)",
               paper="Kwon et al. 2023, Efficient Memory Management for LLM Serving with PagedAttention")
def quest_factory(page_fraction: float = 0.125, page_size: int = 16):  # noqa: ANN201
    """A Quest cache factory reading `page_fraction` of the pages per decode step; the first
    two layers (the paper's choice; one for a model of two layers or fewer) read all."""
    def factory(config, batch_size: int, capacity: int, dtype=None) -> QuestKVCache:  # noqa: ANN001
        dense_layers = tuple(range(min(2, config.num_layers - 1)))
        return QuestKVCache.for_model(config, batch_size, capacity, dtype, page_size=page_size,
                                      page_fraction=page_fraction, dense_layers=dense_layers)

    return factory


register_cache("quest", quest_factory(), lossless=False,
               description="Quest: the dense cache plus per-page key bounds; each decode step reads the 1/8 of "
                           "its 16-slot pages with the highest bound for its queries, the first page (sinks) and "
                           "the one before its own always among them (layers 0-1 read all)",
               paper="Tang et al. 2024, Quest: Query-Aware Sparsity for Efficient Long-Context LLM Inference")


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
register_cache("kivi2_sinks", kivi_factory(2, sinks=4), lossless=False,
               description="KIVI 2-bit as 'kivi2', with the first 4 tokens (attention sinks) kept exact",
               paper="Liu et al. 2024 (KIVI); sinks: Xiao et al. 2024, Efficient Streaming Language Models with "
                     "Attention Sinks")
register_cache("gear2", kivi_factory(2, rank=2, outlier_fraction=0.02), lossless=False,
               description="GEAR on KIVI-2: a rank-2 approximation of each group's quantization error and "
                           "2% of its entries kept exactly",
               paper="Kang et al. 2024, GEAR: An Efficient KV Cache Compression Recipe for Near-Lossless "
                     "Generative Inference of LLM")



def store_factory(cls: type, group_size: int = 32, residual_length: int = 32, **kwargs: object):  # noqa: ANN201
    """A factory of a `GroupQuantizedCache` subclass (VidKV, ZipCache); the residual shrinks to
    the capacity for shorter rows."""
    def factory(config, batch_size: int, capacity: int, dtype=None):  # noqa: ANN001, ANN202
        return cls.for_model(config, batch_size, capacity, dtype, group_size=group_size,
                             residual_length=min(residual_length, capacity), **kwargs)

    return factory


register_cache("vidkv", store_factory(VidKVCache), lossless=False,
               description="VidKV 1.x-bit: keys at 1.5 bits (each group's widest half of the channels at 2 bits, "
                           "the rest as 1-bit real-DFT coefficients), ternary values (1.6 bits), groups of 32 "
                           "tokens, 32+ recent tokens in full precision",
               paper="Tao et al. 2025, Plug-and-Play 1.x-Bit KV Cache Quantization for Video Large Language Models")
register_cache("vidkv_sinks", store_factory(VidKVCache, sinks=4), lossless=False,
               description="VidKV 1.x-bit as 'vidkv', with the first 4 tokens (attention sinks) kept exact",
               paper="Tao et al. 2025 (VidKV); sinks: Xiao et al. 2024, Efficient Streaming Language Models with "
                     "Attention Sinks")
register_cache("zipcache", store_factory(ZipCache), lossless=False,
               description="ZipCache: channel-separable tokenwise codes, each group's more salient half of the "
                           "tokens (normalised attention score) at 4 bits, the rest at 2; groups of 32 tokens, "
                           "32+ recent tokens in full precision while they are scored",
               paper="He et al. 2024, ZipCache: Accurate and Efficient KV Cache Quantization with Salient Token "
                     "Identification")


def evicting_factory(press: str, kept: float = 0.25, max_step: int = 128, pyramid: bool = False):  # noqa: ANN201
    """An evicting cache factory keeping `kept` of the capacity (at least 8 tokens) with the
    named press (`press_for_budget`); `max_step` tokens of room for one forward (a prefill
    chunk, a draft tree), so memory is budget + max_step entries per (layer, KV head).
    pyramid: PyramidKV's budgets falling with depth around that mean (`pyramid_budgets`)."""
    def factory(config, batch_size: int, capacity: int, dtype=None) -> EvictingKVCache:  # noqa: ANN001
        budget = min(capacity, max(8, math.ceil(kept * capacity)))
        return press_cache(config, batch_size, capacity, dtype, press=press, budget=budget, max_step=max_step,
                           pyramid=pyramid)

    return factory


def press_cache(config, batch_size: int, capacity: int, dtype=None, *, press: str, budget: int,  # noqa: ANN001
                max_step: int, pyramid: bool = False) -> EvictingKVCache:
    """An evicting cache keeping `budget` tokens per (layer, KV head) with the named press
    (`press_for_budget`), or on average with PyramidKV's budgets (`pyramid`)."""
    rule = press_for_budget(press, budget)
    table = (pyramid_budgets(budget, config.num_layers, config.num_kv_heads, floor=rule.sinks + rule.window)
             if pyramid else budget)
    return EvictingKVCache.for_model(config, batch_size, capacity, dtype, press=rule, budget=table, max_step=max_step)


EVICTION_PAPERS = {
    "streaming_llm": ("attention sinks (4) and the most recent tokens",
                      "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks"),
    "h2o": ("heavy hitters by accumulated attention plus the recent half of the budget",
            "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs"),
    "tova": ("the keys the newest query attends to most (head-averaged)",
             "Oren et al. 2024, Transformers are Multi-State RNNs"),
    "snapkv": ("keys voted for by the last 32 queries, pooled over 7 neighbours",
               "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation"),
}
for _press, (_what, _paper) in EVICTION_PAPERS.items():
    register_cache(_press, evicting_factory(_press), lossless=False,
                   description=f"Evicting cache keeping 25% of the capacity: {_what}; 128 entries of room "
                               "per forward", paper=_paper)
register_cache("pyramidkv", evicting_factory("snapkv", pyramid=True), lossless=False,
               description="Evicting cache keeping 25% of the capacity on average, budgets falling linearly "
                           "with depth (beta 20), SnapKV's scores; 128 entries of room per forward",
               paper="Cai et al. 2024, PyramidKV: Dynamic KV Cache Compression based on Pyramidal "
                     "Information Funneling")
