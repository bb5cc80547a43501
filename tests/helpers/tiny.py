"""A tiny random model shared by decoding tests."""

from __future__ import annotations

import functools

import jax
from flax import nnx

from efficient.models import LlamaModel, ModelConfig

TINY = ModelConfig(vocab_size=61, hidden_size=32, intermediate_size=48, num_layers=2, num_heads=4,
                   num_kv_heads=2, head_dim=8, pad_token_id=0)


@functools.cache
def tiny_model(seed: int = 0, **changes: object) -> LlamaModel:
    """Matrices scaled up from the 0.02 init so greedy outputs vary (not one repeated token).
    Layer parameters are stacked on a leading L axis: a layer matrix has ndim 3."""
    graphdef, state = nnx.split(LlamaModel(TINY.replace(**changes), rngs=nnx.Rngs(seed)))

    def scale(path: tuple, x: jax.Array) -> jax.Array:
        stacked = any(getattr(key, "key", None) == "layers" for key in path)
        return x * 10.0 if x.ndim - stacked == 2 else x

    state = jax.tree_util.tree_map_with_path(scale, state)
    return nnx.merge(graphdef, state)


def run_in_chunks(model: LlamaModel, cache: object, tokens: jax.Array, chunks: list[int]) -> tuple[object, object]:
    """Feed `tokens` [B, T] through `cache` in forwards of `chunks` tokens (jitted); returns the
    concatenated logits (a numpy array [B, sum(chunks), V]) and the cache."""
    import numpy as np

    from efficient.models import jit_forward

    step, out, at = jit_forward(model), [], 0
    for size in chunks:
        logits, cache = step(tokens[:, at:at + size], cache=cache)
        out.append(np.asarray(logits))
        at += size
    return np.concatenate(out, axis=1), cache
