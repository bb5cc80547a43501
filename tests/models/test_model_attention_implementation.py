"""Model layers go through the dispatcher: a config naming an implementation uses it."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
from helpers.tiny import tiny_model

from efficient.cache import DenseKVCache
from efficient.models import forward


def test_pallas_tpu_implementation_matches_xla_in_prefill_and_decode() -> None:
    xla = tiny_model(head_dim=64)
    pallas = tiny_model(head_dim=64, attention_implementation=("pallas_tpu",))
    tokens = jnp.asarray(np.random.RandomState(0).randint(3, 61, size=(2, 20)))
    full_xla, _ = forward(xla, tokens)
    full_pallas, _ = forward(pallas, tokens)  # flash kernel, interpreted on CPU
    np.testing.assert_allclose(np.asarray(full_pallas), np.asarray(full_xla), atol=1e-4)
    cache = DenseKVCache.for_model(pallas.config, batch_size=2, capacity=24)
    _, cache = forward(xla, tokens[:, :19], cache=cache)  # same weights; the prefill kernel ran above
    step, _ = forward(pallas, tokens[:, 19:], cache=cache)  # decode kernel (T=1)
    np.testing.assert_allclose(np.asarray(step[:, 0]), np.asarray(full_xla[:, 19]), atol=1e-4)
