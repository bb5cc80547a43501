"""Paged decode kernel (interpret mode) against its plain-jnp reference (PagedAttention,
Kwon et al. 2023): pages read in place through a shuffled page table, NaN everywhere the
kernel must not read.

Page sizes: interpret mode takes any P. On a real TPU the (P, H) page slab is a legal
block for any P (it spans the pool's whole page axis), but the Mosaic layouts want
P % 8 == 0 (float32) / P % 16 == 0 (bfloat16) sublanes, and H % 128 == 0 lanes for
the per-head path (H = 64 with K > 1 takes the whole-page, block-diagonal path);
`test_lowers_to_mosaic_tpu` checks the lowering of both paths without a TPU.
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "attention"))
from tolerances import INTERPRET, assert_close, assert_lse_close  # noqa: E402

from kernels_pallas.paged_attention import paged_decode_attention, paged_decode_attention_reference  # noqa: E402
from kernels_pallas.paged_attention.tpu import operand_page, page_range  # noqa: E402

STATIC = ("causal", "window", "softcap", "scale", "return_lse")
REFERENCE = jax.jit(paged_decode_attention_reference, static_argnames=STATIC)  # one compile, not op by op

# (P, pages_per_block, R, lengths, K, G, H, T, dtype, features). Lengths off page multiples;
# R not always a multiple of pages_per_block (padded blocks); GQA ratios 1 and 3.
CASES = (
    # ratio 1, T=1, a ragged batch with an empty row, 3 key blocks of 4 pages.
    (8, 4, 12, (75, 0, 13), 2, 1, 128, 1, "float32", dict()),
    # ratio 3, H=64 with K=2 (whole-page path), T=4 tree mask, rows 0 and 1 share their
    # first 2 pages, positions per pool slot with evicted (-1) slots.
    (16, 3, 8, (77, 100), 2, 3, 64, 4, "float32", dict(tree=True, share=2, positions=True)),
    # bfloat16, window + softcap: page 0 of row 0 lies wholly before its window (skipped).
    (64, 2, 3, (150, 70), 1, 3, 128, 1, "bfloat16", dict(window=40, softcap=5.0)),
)


def paged_pool(seed: int, b: int, r: int, p: int, lengths: np.ndarray, share: int) -> np.ndarray:
    """A shuffled page table [B, R] over a pool with spare pages: rows > 0 share row 0's
    first `share` pages; entries past a row's last page point at random (garbage) pages."""
    rng = np.random.default_rng(seed)
    m = b * r + 3
    fresh = iter(rng.permutation(m).tolist())
    table = np.array([[next(fresh) for _ in range(r)] for _ in range(b)])
    table[1:, :share] = table[0, :share]
    for row, n in enumerate(lengths):
        used = -(-int(n) // p)
        table[row, used:] = rng.integers(0, m, r - used)
    return table


def tree_mask(seed: int, b: int, t: int, s: int, lengths: np.ndarray) -> np.ndarray:
    """Each new token sees the cache prefix, itself and random earlier new tokens."""
    rng = np.random.default_rng(seed)
    among = np.tril(rng.random((b, t, t)) < 0.5) | np.eye(t, dtype=bool)
    slot = np.arange(s)[None, None, :]
    start = lengths[:, None, None] - t
    new = np.take_along_axis(among, np.broadcast_to(np.clip(slot - start, 0, t - 1), (b, t, s)), axis=2)
    return np.where(slot < start, True, new)


@pytest.mark.parametrize("p,ppb,r,lengths,kh,g,h,t,dtype,features", CASES)
def test_paged_matches_reference(p, ppb, r, lengths, kh, g, h, t, dtype, features) -> None:  # noqa: ANN001
    """Every pool slot the kernel must not read is NaN: slots past each row's length, spare
    pages, garbage table entries, pages wholly before the window. The reference reads the
    same pool without NaN."""
    b, features = len(lengths), dict(features)
    n = np.asarray(lengths)
    table = paged_pool(0, b, r, p, n, features.pop("share", 0))
    m = b * r + 3
    rng = np.random.default_rng(1)
    make = lambda *shape: rng.standard_normal(shape).astype(np.float32)  # noqa: E731
    q, k, v = make(b, t, kh * g, h), make(m, p, kh, h), make(m, p, kh, h)
    window = features.get("window")
    needed = np.zeros((m, p), bool)
    positions = np.full((m, p), -1, np.int32)
    for row in range(b):
        for s in range(n[row]):
            page, slot = table[row, s // p], s % p
            positions[page, slot] = s
            before_window = window is not None and (s // p + 1) * p <= n[row] - t - window + 1
            needed[page, slot] |= not before_window
    kw: dict = dict(features)
    if kw.pop("positions", False):
        positions[rng.random((m, p)) < 0.1] = -1  # evicted slots stay in place, masked by position
        kw["page_positions"] = jnp.asarray(positions)
    if kw.pop("tree", False):
        kw["mask"] = jnp.asarray(tree_mask(2, b, t, r * p, n))
    cast = lambda x: jnp.asarray(x).astype(dtype)  # noqa: E731
    poison = lambda x: cast(np.where(needed[:, :, None, None], x, np.nan))  # noqa: E731
    args = (jnp.asarray(table, jnp.int32), jnp.asarray(n, jnp.int32))
    out, lse = paged_decode_attention(
        cast(q), poison(k), poison(v), *args, return_lse=True, pages_per_block=ppb, interpret=INTERPRET, **kw
    )
    f32 = [cast(x).astype(jnp.float32) for x in (q, k, v)]
    ref, ref_lse = REFERENCE(*f32, *args, return_lse=True, **kw)
    assert out.dtype == jnp.dtype(dtype)
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse)
    empty = n == 0
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)
    assert np.isneginf(np.asarray(lse)[empty]).all()


def test_clamped_index_maps_fetch_only_needed_pages() -> None:
    """Stepping through the key blocks, each K/V operand changes its page only to fetch a
    needed one (past the length and before the window: the index repeats, no copy)."""
    ppb, nb, p = 3, 4, 8
    lengths = jnp.array([96, 17, 0, 60, 1], jnp.int32)  # 12, 3, 0, 8, 1 pages
    qp = lengths[:, None] - 1
    kp = jnp.broadcast_to(jnp.arange(nb * ppb * p), (5, nb * ppb * p))
    first, last = page_range(lengths, qp, kp, causal=True, window=30, page_size=p, num_pages=nb * ppb)
    first, last = np.asarray(first).tolist(), np.asarray(last).tolist()
    # row 0: positions 66..95, row 1: 0..16, row 2: empty (last < first), row 3: 30..59, row 4: 0
    assert [first[i] for i in (0, 1, 3, 4)] == [8, 0, 3, 0] and [last[i] for i in (0, 1, 3, 4)] == [11, 2, 7, 0]
    assert last[2] < first[2]
    rows, blocks, ops = np.meshgrid(np.arange(5), np.arange(nb), np.arange(ppb), indexing="ij")
    page = jax.jit(jax.vmap(lambda i, j, f, l_: operand_page(i, j, f, l_, ppb, nb * ppb)))
    steps = page(*(jnp.asarray(x.ravel()) for x in (blocks, ops, np.take(first, rows), np.take(last, rows))))
    steps = np.asarray(steps).reshape(5, nb, ppb)  # [row, block i, operand j]: logical page read
    for row, (f, l_) in enumerate(zip(first, last)):
        for j in range(ppb):
            pages = steps[row, :, j].tolist()
            fetched = [x for i, x in enumerate(pages) if i == 0 or x != pages[i - 1]]
            wanted = [x for x in range(j, nb * ppb, ppb) if f <= x <= l_]
            assert fetched == (wanted or fetched[:1]), (f, l_, j, pages)


def test_lowers_to_mosaic_tpu() -> None:
    """Mosaic lowering (block shapes, SMEM tables) without a TPU: the per-head path
    (H=128) and the whole-page path (H=64, K=3: SmolLM2's kv heads)."""
    for kh, h, p in ((2, 128, 16), (3, 64, 16)):
        q = jnp.zeros((2, 4, 3 * kh, h), jnp.bfloat16)
        pool = jnp.zeros((20, p, kh, h), jnp.bfloat16)
        kw = dict(mask=jnp.ones((2, 4, 8 * p), bool), window=50, softcap=30.0)
        fn = lambda q, k, v, pt, n: paged_decode_attention(q, k, v, pt, n, **kw)  # noqa: E731,B023
        text = jax.jit(fn).trace(q, pool, pool, jnp.zeros((2, 8), jnp.int32), jnp.array([100, 3])).lower(
            lowering_platforms=("tpu",)
        ).as_text()
        assert text.count("tpu_custom_call") == 1


_Q, _POOL, _TABLE, _LENGTHS = (1, 1, 2, 64), (4, 8, 1, 64), (1, 3), (1,)


@pytest.mark.parametrize(
    "change,error,match",
    [
        (dict(page_table=jnp.zeros(_TABLE, jnp.float32)), TypeError, "page_table"),
        (dict(page_table=jnp.zeros((2, 3), jnp.int32)), ValueError, "page_table"),
        (dict(page_table=jnp.zeros((3,), jnp.int32)), ValueError, "page_table"),
        (dict(mask=jnp.ones((1, 1, 23), bool)), ValueError, "mask"),
        (dict(mask=jnp.ones((1, 1, 24), jnp.int32)), TypeError, "mask"),
        (dict(q=jnp.zeros((1, 17, 2, 64), jnp.float32)), NotImplementedError, "T=17"),
        (dict(v_pages=jnp.zeros((4, 16, 1, 64), jnp.float32)), ValueError, "v_pages"),
        (dict(lengths=jnp.zeros((2,), jnp.int32)), ValueError, "lengths"),
        (dict(page_positions=jnp.zeros((4, 9), jnp.int32)), ValueError, "page_positions"),
        (dict(pages_per_block=0), ValueError, "pages_per_block"),
    ],
)
def test_bad_inputs_raise(change, error, match) -> None:  # noqa: ANN001
    kw = dict(
        q=jnp.zeros(_Q, jnp.float32), k_pages=jnp.zeros(_POOL, jnp.float32), v_pages=jnp.zeros(_POOL, jnp.float32),
        page_table=jnp.zeros(_TABLE, jnp.int32), lengths=jnp.ones(_LENGTHS, jnp.int32),
    )
    kw.update(change)
    args = [kw.pop(name) for name in ("q", "k_pages", "v_pages", "page_table", "lengths")]
    with pytest.raises(error, match=match):
        paged_decode_attention(*args, interpret=INTERPRET, **kw)
