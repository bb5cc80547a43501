"""A check shared by the tests of caches with their own view types."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from efficient.attention import AttentionSpec, attention


def assert_xla_matches_the_oracle(view: object, num_heads: int, head_dim: int, last_position: int,
                                  window: int | None = 20) -> None:
    """Three queries ending at `last_position` (causal, `window`), with and without a random
    mask over the view's slots: the xla path (block by block over the view) equals the
    reference (materialised dequantized keys) in output and log-sum-exp."""
    b = view.batch_size
    q = jnp.asarray(np.random.default_rng(2).normal(size=(b, 3, num_heads, head_dim)), jnp.float32)
    q_positions = jnp.asarray([[last_position - 2, last_position - 1, last_position]] * b, jnp.int32)
    mask = jnp.asarray(np.random.default_rng(3).random((b, 3, view.num_slots)) < 0.8)
    spec = AttentionSpec(causal=True, window=window)
    for m in (None, mask):
        got, lse = attention(q, view, spec=spec, q_positions=q_positions, mask=m, return_lse=True,
                             implementation="xla")
        want, want_lse = attention(q, view, spec=spec, q_positions=q_positions, mask=m, return_lse=True,
                                   implementation="reference")
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
