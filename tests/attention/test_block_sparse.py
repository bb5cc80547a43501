"""Block-sparse attention: every block listed equals dense attention; any listing equals the
float32 oracle with the listed blocks as its mask (per head, GQA, causal, window, soft-cap,
segment ids, bfloat16); nothing listed gives zeros and lse -inf; bad layouts refused."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from efficient.attention import AttentionSpec, attention_reference
from efficient.attention.block_sparse import BlockSparseLayout, block_sparse_attention

B, N, K, H = 2, 4, 2, 16


def _qkv(t: int, s: int, seed: int = 0, dtype: jnp.dtype = jnp.float32) -> tuple[jax.Array, ...]:
    rng = np.random.default_rng(seed)
    make = lambda *shape: jnp.asarray(rng.normal(size=shape), jnp.float32).astype(dtype)  # noqa: E731
    return make(B, t, N, H), make(B, s, K, H), make(B, s, K, H)


def _oracle_per_head(q, k, v, block_mask, block_q, block_k, **kwargs):  # noqa: ANN001, ANN003, ANN202
    """The oracle head by head, its mask the listed blocks expanded to tokens."""
    outs, lses = [], []
    for n in range(N):
        mask = np.repeat(np.repeat(np.asarray(block_mask[:, n]), block_q, axis=1), block_k, axis=2)
        out, lse = attention_reference(q[:, :, n:n + 1], k[:, :, n // (N // K):n // (N // K) + 1],
                                       v[:, :, n // (N // K):n // (N // K) + 1], mask=jnp.asarray(mask),
                                       return_lse=True, **kwargs)
        outs.append(out)
        lses.append(lse)
    return jnp.concatenate(outs, axis=2), jnp.concatenate(lses, axis=2)


SPECS = [AttentionSpec(), AttentionSpec(window=20), AttentionSpec(softcap=5.0), AttentionSpec(causal=False)]


@pytest.mark.parametrize("spec", SPECS, ids=["causal", "window", "softcap", "bidirectional"])
def test_every_block_listed_equals_dense_attention(spec: AttentionSpec) -> None:
    q, k, v = _qkv(64, 64)
    layout = BlockSparseLayout.dense(B, N, 64, 64, block_q=16, block_k=16)
    got, lse = block_sparse_attention(q, k, v, layout, spec=spec, return_lse=True)
    want, want_lse = attention_reference(q, k, v, spec=spec, return_lse=True)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("density", [0.15, 0.5])
@pytest.mark.parametrize("spec", SPECS[:2], ids=["causal", "window"])
def test_any_listing_equals_the_oracle_with_those_blocks_as_its_mask(density: float, spec: AttentionSpec) -> None:
    t, s, bq, bk = 32, 96, 8, 16  # the queries are the last 32 of 96 keys
    q, k, v = _qkv(t, s, seed=1)
    block_mask = jnp.asarray(np.random.default_rng(2).random((B, N, t // bq, s // bk)) < density)
    layout = BlockSparseLayout.from_block_mask(block_mask, bq, bk)
    np.testing.assert_array_equal(layout.block_mask(s // bk), block_mask)
    got, lse = block_sparse_attention(q, k, v, layout, spec=spec, return_lse=True)
    want, want_lse = _oracle_per_head(q, k, v, block_mask, bq, bk, spec=spec)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-5, atol=2e-5)
    assert np.all(np.isfinite(np.asarray(got)))


def test_segments_positions_and_bfloat16() -> None:
    t = s = 64
    q, k, v = _qkv(t, s, seed=3, dtype=jnp.bfloat16)
    seg = jnp.asarray(np.repeat([[0] * 24 + [1] * 40], B, axis=0), jnp.int32)
    pos = jnp.asarray(np.repeat([np.r_[np.arange(24), np.arange(40)]], B, axis=0), jnp.int32)
    block_mask = jnp.asarray(np.random.default_rng(4).random((B, N, 4, 4)) < 0.6) | jnp.eye(4, dtype=bool)
    layout = BlockSparseLayout.from_block_mask(block_mask, 16, 16, max_blocks=4)
    kwargs = dict(spec=AttentionSpec(), q_positions=pos, kv_positions=pos, q_segment_ids=seg, kv_segment_ids=seg)
    got, lse = block_sparse_attention(q, k, v, layout, return_lse=True, **kwargs)
    want, want_lse = _oracle_per_head(q, k, v, block_mask, 16, 16, **kwargs)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(got, np.float32), want, rtol=3e-2, atol=3e-2)
    np.testing.assert_allclose(lse, want_lse, rtol=2e-2, atol=2e-2)


def test_nothing_listed_gives_zeros_and_minus_infinity_not_nan() -> None:
    q, k, v = _qkv(32, 32)
    block_mask = jnp.zeros((B, N, 2, 2), bool).at[:, :, 1, 0].set(True)  # query block 0 lists nothing
    layout = BlockSparseLayout.from_block_mask(block_mask, 16, 16, max_blocks=1)
    k = k.at[:, 16:].set(jnp.nan)  # never listed: must never be read into the output
    out, lse = block_sparse_attention(q, k, v.at[:, 16:].set(jnp.nan), layout, return_lse=True)
    np.testing.assert_array_equal(out[:, :16], 0.0)
    assert np.all(np.isneginf(np.asarray(lse[:, :16])))
    assert np.all(np.isfinite(np.asarray(out[:, 16:]))) and np.all(np.isfinite(np.asarray(lse[:, 16:])))


def test_entries_past_a_lists_end_are_never_read_into_the_output() -> None:
    """Every query block lists key block 0 only (M = 2): block 1, gathered with the step as the
    padding entry, holds NaN and must not reach the output."""
    q, k, v = _qkv(32, 32)
    block_mask = jnp.zeros((B, N, 2, 2), bool).at[..., 0].set(True)
    layout = BlockSparseLayout.from_block_mask(block_mask, 16, 16)  # M = 2: the second entry is padding
    assert layout.index.shape[-1] == 2
    got = block_sparse_attention(q, k.at[:, 16:].set(jnp.nan), v.at[:, 16:].set(jnp.nan), layout)
    want, _ = _oracle_per_head(q, k, v, block_mask, 16, 16, spec=AttentionSpec())
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_the_layout_can_be_built_inside_jit() -> None:
    q, k, v = _qkv(32, 32)

    @jax.jit
    def run(q: jax.Array, k: jax.Array, v: jax.Array, block_mask: jax.Array) -> jax.Array:
        return block_sparse_attention(q, k, v, BlockSparseLayout.from_block_mask(block_mask, 16, 16))

    block_mask = jnp.ones((B, N, 2, 2), bool)
    np.testing.assert_allclose(run(q, k, v, block_mask), attention_reference(q, k, v), rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("make, match", [
    (lambda q, k, v: block_sparse_attention(
        q, k, v, dataclasses.replace(BlockSparseLayout.dense(B, N, 32, 32, 16, 16), block_q=12)),
     "block_q=12 does not divide T=32"),
    (lambda q, k, v: BlockSparseLayout.dense(B, N, 32, 32, 16, 24), "block_k=24 does not divide S=32"),
    (lambda q, k, v: block_sparse_attention(q, k, v, BlockSparseLayout.dense(B, 2, 32, 32, 16, 16)),
     r"layout.index must be \[B, N, T/block_q, M\]"),
    (lambda q, k, v: BlockSparseLayout.from_block_mask(jnp.ones((B, N, 2, 2), bool), 16, 16, max_blocks=1),
     "max_blocks=1 is below the 2 blocks"),
    (lambda q, k, v: BlockSparseLayout.from_block_mask(jnp.ones((B, N, 2, 2), bool), 0, 16),
     "block_q must be a positive int, got 0"),
    (lambda q, k, v: block_sparse_attention(q, k, v, dataclasses.replace(
        BlockSparseLayout.dense(B, N, 32, 32, 16, 16), count=jnp.full((B, N, 2), 3, jnp.int32))),
     "layout.count=3 exceeds the M=2 entries"),
])
def test_bad_layouts_are_refused_with_the_argument_named(make, match: str) -> None:  # noqa: ANN001
    q, k, v = _qkv(32, 32)
    with pytest.raises(ValueError, match=match):
        make(q, k, v)
