"""Block-sparse attention kernel (interpret mode) against its plain-jnp reference: random
lists at several densities, GQA, window, soft-cap, empty lists; unlisted key blocks and
padded keys poisoned with NaN change nothing; bad layouts refused."""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "attention"))
from tolerances import INTERPRET  # noqa: E402

from efficient.attention.block_sparse import BlockSparseLayout  # noqa: E402
from kernels_pallas.block_sparse_attention import block_sparse_attention as kernel  # noqa: E402
from kernels_pallas.block_sparse_attention import block_sparse_reference  # noqa: E402

B, N, K, H = 1, 4, 2, 64


def block_sparse_attention(*args, **kwargs):  # noqa: ANN002, ANN003, ANN201
    """The kernel, waited for: an interpret-mode call still running its host callbacks while the
    next jax op is dispatched deadlocked here (2 runs in 6)."""
    return jax.block_until_ready(kernel(*args, **kwargs))


def _case(t: int, s: int, density: float, bq: int, bk: int, seed: int) -> tuple:
    rng = np.random.default_rng(seed)
    q, k, v = (jnp.asarray(rng.normal(size=shape), jnp.float32) for shape in ((B, t, N, H), (B, s, K, H),
                                                                              (B, s, K, H)))
    mask = rng.random((B, N, t // bq, s // bk)) < density
    mask[:, :, 0] = False  # query block 0 lists nothing
    layout = BlockSparseLayout.from_block_mask(jnp.asarray(mask), bq, bk)
    return q, k, v, layout, mask


@pytest.mark.parametrize("density, features", [
    (1.0, dict()), (0.4, dict()), (0.4, dict(window=40)), (0.6, dict(softcap=4.0, causal=False)),
])
def test_kernel_equals_the_reference_and_never_reads_unlisted_blocks(density: float, features: dict) -> None:
    t, s, bq, bk = 64, 96, 16, 16  # the queries are the last 64 of 96 keys
    q, k, v, layout, mask = _case(t, s, density, bq, bk, seed=int(density * 10))
    # Poison every key block that no head of any query block lists (at these densities often
    # none: the test below poisons a list's left-out blocks for certain).
    unlisted = ~mask.any(axis=(0, 1, 2))
    poison = np.repeat(unlisted, bk)[None, :, None, None]
    k_bad, v_bad = (jnp.where(poison, jnp.nan, x) for x in (k, v))
    out, lse = block_sparse_attention(q, k_bad, v_bad, layout.index, layout.count, block_q=bq, block_k=bk,
                                      return_lse=True, interpret=INTERPRET, **features)
    want, want_lse = block_sparse_reference(q, k, v, layout.index, layout.count, block_q=bq, block_k=bk, **features)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(lse, want_lse, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[:, :bq], 0.0)  # nothing listed: zeros and lse -inf
    assert np.all(np.isneginf(np.asarray(lse[:, :bq])))


def test_blocks_a_list_leaves_out_are_not_read_even_past_its_end() -> None:
    """The same list for every head and query block (3 of 6 key blocks): the other 3 hold NaN."""
    t, s, bq, bk = 32, 96, 16, 16
    q, k, v, _, _ = _case(t, s, 1.0, bq, bk, seed=7)
    keep = np.zeros(s // bk, bool)
    keep[[1, 3, 5]] = True
    mask = np.broadcast_to(keep, (B, N, t // bq, s // bk))
    layout = BlockSparseLayout.from_block_mask(jnp.asarray(mask), bq, bk)  # M = 6: 3 entries of padding
    poison = np.repeat(~keep, bk)[None, :, None, None]
    out = block_sparse_attention(q, jnp.where(poison, jnp.nan, k), jnp.where(poison, jnp.nan, v), layout.index,
                                 layout.count, block_q=bq, block_k=bk, interpret=INTERPRET)
    want, _ = block_sparse_reference(q, k, v, layout.index, layout.count, block_q=bq, block_k=bk)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)


def test_kernel_equals_the_xla_block_sparse_path_with_padded_keys() -> None:
    from efficient.attention import AttentionSpec
    from efficient.attention.block_sparse import block_sparse_attention as xla_block_sparse

    t = s = 64
    q, k, v, layout, _ = _case(t, s, 0.7, 16, 32, seed=5)
    kv_positions = jnp.asarray([np.r_[np.arange(50), -np.ones(14)]], jnp.int32)  # 14 padded keys
    v = v.at[:, 50:].set(jnp.nan)
    out = block_sparse_attention(q, k, v, layout.index, layout.count, block_q=16, block_k=32,
                                 kv_positions=kv_positions, interpret=INTERPRET)
    want = xla_block_sparse(q, k, v, layout, spec=AttentionSpec(), kv_positions=kv_positions)
    np.testing.assert_allclose(out, want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(np.asarray(out)))
    through = jax.block_until_ready(xla_block_sparse(  # the library entry point
        q, k, v, layout, spec=AttentionSpec(), kv_positions=kv_positions, implementation="pallas_tpu",
        interpret=INTERPRET))
    np.testing.assert_array_equal(through, out)
    with pytest.raises(ValueError, match="does not serve segment ids"):
        xla_block_sparse(q, k, v, layout, q_segment_ids=kv_positions, kv_segment_ids=kv_positions,
                         implementation="pallas_tpu")


@pytest.mark.parametrize("kwargs, match", [
    (dict(block_q=24), r"block_q=24 must be a positive int dividing T=64"),
    (dict(block_k=0), r"block_k=0 must be a positive int dividing S=64"),
    (dict(count=jnp.zeros((B, N, 3), jnp.int32)), r"count \(1, 4, 4\)"),
])
def test_bad_layouts_are_refused_with_the_argument_named(kwargs: dict, match: str) -> None:
    q, k, v, layout, _ = _case(64, 64, 0.5, 16, 16, seed=0)
    args = dict(index=layout.index, count=layout.count, block_q=16, block_k=16) | kwargs
    with pytest.raises(ValueError, match=match):
        block_sparse_attention(q, k, v, args.pop("index"), args.pop("count"), interpret=INTERPRET, **args)
