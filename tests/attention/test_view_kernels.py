"""The Pallas TPU adapters for paged and KIVI views (interpret mode) against the float32
oracle, through the dispatcher, on views built by the real caches (ragged rows,
shared/forked pages, a residual window, a tree mask over logical slots)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import efficient.attention.backends  # noqa: F401  (registers the pallas adapters)
from efficient.attention import AttentionSpec, attention, unsupported
from efficient.cache import KIVICache, PagedKVCache

L, B, K, H, N = 1, 2, 2, 64, 4
LENGTHS = (37, 21)


def _filled(cache):  # noqa: ANN001, ANN202
    """Write random k/v for LENGTHS[b] tokens per row (the shorter row's tail as padding, cut)."""
    rng = np.random.default_rng(0)
    t = max(LENGTHS)
    positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (B, t))
    cache, slots = cache.reserve(positions)
    k, v = (jnp.asarray(rng.standard_normal((B, t, K, H)), jnp.float32) for _ in range(2))
    cache = cache.update(0, k, v, slots)
    return cache.truncate(jnp.asarray(LENGTHS, jnp.int32))


def _query(t: int) -> tuple[jax.Array, jax.Array]:
    q = jnp.asarray(np.random.default_rng(1).standard_normal((B, t, N, H)), jnp.float32)
    positions = jnp.asarray(LENGTHS, jnp.int32)[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None]
    return q, positions


@pytest.mark.parametrize("name, make", [
    ("pallas_tpu_paged", lambda: PagedKVCache.init(num_layers=L, batch_size=B, capacity=64, num_kv_heads=K,
                                                   head_dim=H, page_size=8)),
    ("pallas_tpu_quantized", lambda: KIVICache.init(num_layers=L, batch_size=B, capacity=64, num_kv_heads=K,
                                                    head_dim=H, bits=4, group_size=16, residual_length=8)),
])
@pytest.mark.parametrize("t, spec, masked", [(1, AttentionSpec(), False),
                                             (3, AttentionSpec(window=12, softcap=5.0), True)])
def test_view_kernel_adapters_match_the_oracle(name: str, make, t: int, spec: AttentionSpec, masked: bool) -> None:  # noqa: ANN001
    view = _filled(make()).view(0)
    q, q_positions = _query(t)
    mask = None
    if masked:  # a tree-like mask over the view's slots
        mask = jnp.asarray(np.random.default_rng(2).random((B, t, view.num_slots)) < 0.7)
    assert unsupported(name, q, view, spec, q_positions=q_positions, mask=mask, return_lse=True) is None
    got, lse = attention(q, view, spec=spec, q_positions=q_positions, mask=mask, return_lse=True,
                         implementation=name)
    want, want_lse = attention(q, view, spec=spec, q_positions=q_positions, mask=mask, return_lse=True,
                               implementation="reference")
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


def test_prefill_on_paged_and_quantized_views_goes_to_xla() -> None:
    cache = _filled(PagedKVCache.init(num_layers=L, batch_size=B, capacity=64, num_kv_heads=K, head_dim=H,
                                      page_size=8))
    q, _ = _query(17)
    reason = unsupported("pallas_tpu_paged", q, cache.view(0), AttentionSpec())
    assert reason == "serves T <= 16 queries, got T=17"
