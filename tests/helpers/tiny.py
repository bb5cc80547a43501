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
    """Matrices scaled up from the 0.02 init so greedy outputs vary (not one repeated token)."""
    graphdef, state = nnx.split(LlamaModel(TINY.replace(**changes), rngs=nnx.Rngs(seed)))
    state = jax.tree_util.tree_map(lambda x: x * 10.0 if x.ndim == 2 else x, state)
    return nnx.merge(graphdef, state)
