"""The plain decoders of the variant registry (`efficient.registry`): greedy and sampling."""

from __future__ import annotations

from collections.abc import Sequence

import jax

from efficient.cache.protocol import CacheFactory
from efficient.decoding.generate import GenerateOutput, generate
from efficient.decoding.sampling import Greedy, Sample
from efficient.models import LlamaModel
from efficient.registry import register_decoder


def greedy_decoder(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   cache: CacheFactory | None = None, key: jax.Array | int | None = None,
                   stop_tokens: Sequence[int] = ()) -> GenerateOutput:
    """Plain autoregressive greedy decoding: one target forward per token."""
    return generate(model, prompts, max_new_tokens=max_new_tokens, sampling=Greedy(), cache=cache,
                    key=key, stop_tokens=stop_tokens)


def sample_decoder(model: LlamaModel, prompts: Sequence[Sequence[int]], *, max_new_tokens: int,
                   cache: CacheFactory | None = None, key: jax.Array | int | None = None,
                   stop_tokens: Sequence[int] = (), temperature: float = 1.0, top_k: int = 0,
                   top_p: float = 1.0, min_p: float = 0.0) -> GenerateOutput:
    """Plain autoregressive sampling (temperature, top-k, top-p, min-p)."""
    rule = Sample(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    return generate(model, prompts, max_new_tokens=max_new_tokens, sampling=rule, cache=cache, key=key,
                    stop_tokens=stop_tokens)


register_decoder("greedy", greedy_decoder, lossless=True,
                 description="Autoregressive greedy decoding (the baseline)")
register_decoder("sample", sample_decoder, lossless=True, sampling=True,
                 description="Autoregressive sampling from the model's distribution (temperature 1)")
