"""Split-K / stream-K decode kernel (interpret mode) against its plain-jnp reference."""

from __future__ import annotations

import math
import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "attention"))
from tolerances import INTERPRET, assert_close, assert_lse_close, random_inputs  # noqa: E402

from kernels_pallas.decode_attention import BlockSizes, decode_attention, decode_attention_reference  # noqa: E402
from kernels_pallas.decode_attention.tpu import needed_blocks, stream_k_schedule  # noqa: E402

BLOCK = 128
# (B, T, S, N:K, H, lengths, features, dtype, workers, kv_layout): S just off block multiples,
# GQA ratios 1/4/8, ragged and empty rows, windows that start past the first blocks.
CASES = (
    (1, 1, 1, 1, 64, None, dict(), "float32", 2, "BSKH"),
    (3, 1, 513, 8, 128, (513, 0, 7), dict(), "float32", 3, "BKSH"),
    (2, 4, 300, 4, 64, (129, 300), dict(window=64, softcap=4.0), "float32", 5, "BKSH"),
    (3, 7, 129, 1, 64, (128, 1, 64), dict(causal=False), "bfloat16", 4, "BSKH"),
    (2, 16, 513, 4, 128, (513, 200), dict(tree=True), "bfloat16", 3, "BKSH"),
    (2, 2, 700, 4, 64, (700, 389), dict(window=100), "float32", 2, "BKSH"),
)


def _tree_mask(seed: int, b: int, t: int, s: int, lengths: jax.Array) -> jax.Array:
    """Each new token sees the whole cache prefix and a random set of ancestors among the new tokens."""
    rng = np.random.default_rng(seed)
    among = np.tril(rng.random((b, t, t)) < 0.5) | np.eye(t, dtype=bool)
    slot = np.arange(s)[None, None, :]
    start = np.asarray(lengths)[:, None, None] - t
    idx = np.clip(slot - start, 0, t - 1)
    new = np.take_along_axis(among, np.broadcast_to(idx, (b, t, s)), axis=2)
    return jnp.asarray(np.where(slot < start, True, new))


def unread_slots(lengths: np.ndarray, t: int, s: int, window: int | None) -> np.ndarray:
    """[B, S] slots the kernel must never read: past the row's length, and the whole key
    blocks that end before the earliest query's window (default positions)."""
    slot = np.arange(s)[None, :]
    unread = slot >= lengths[:, None]
    if window is not None:
        first_visible = lengths - t - window + 1  # earliest query lengths - t, window start
        unread |= slot < (np.maximum(first_visible, 0) // BLOCK * BLOCK)[:, None]
    return unread


@pytest.mark.parametrize("b,t,s,ratio,h,lengths,features,dtype,workers,layout", CASES)
def test_decode_matches_reference(b, t, s, ratio, h, lengths, features, dtype, workers, layout) -> None:  # noqa: ANN001
    """NaN in every slot the kernel must skip (past each row's length, blocks before the
    window) changes nothing: those blocks are never fetched, the partial one is masked."""
    kv_heads = 2 if ratio < 8 else 1
    q, k, v = random_inputs(s + t, b, t, s, ratio * kv_heads, kv_heads, h, dtype)
    n = np.full((b,), s) if lengths is None else np.asarray(lengths)
    lengths = None if lengths is None else jnp.asarray(lengths, jnp.int32)
    features = dict(features)
    if features.pop("tree", False):
        features["mask"] = _tree_mask(0, b, t, s, lengths)
    unread = jnp.asarray(unread_slots(n, t, s, features.get("window")))[:, :, None, None]
    k_nan, v_nan = (jnp.where(unread, jnp.nan, x).astype(x.dtype) for x in (k, v))
    if layout == "BKSH":
        k_nan, v_nan = jnp.swapaxes(k_nan, 1, 2), jnp.swapaxes(v_nan, 1, 2)
    blocks = BlockSizes(block_kv=BLOCK, num_workers=workers)
    out, lse = decode_attention(
        q, k_nan, v_nan, lengths=lengths, return_lse=True, block_sizes=blocks, kv_layout=layout,
        interpret=INTERPRET, **features,
    )
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_lse = decode_attention_reference(*f32, lengths=lengths, return_lse=True, **features)
    assert out.dtype == q.dtype
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse)


def test_needed_blocks_skip_past_length_and_before_window() -> None:
    lengths = jnp.array([700, 389, 0, 130], jnp.int32)
    qp = lengths[:, None] - 2 + jnp.arange(2)[None]
    kp = jnp.broadcast_to(jnp.arange(700), (4, 700))
    start, count = needed_blocks(lengths, qp, kp, causal=True, window=100, block_kv=128, num_blocks=6)
    # row 0: positions 599..699 -> blocks 4, 5; row 1: 288..388 -> blocks 2, 3; row 2: none;
    # row 3: queries 128, 129, keys 29..129 -> blocks 0, 1
    assert np.asarray(start).tolist()[:2] + np.asarray(start).tolist()[3:] == [4, 2, 0]
    assert np.asarray(count).tolist() == [2, 2, 0, 2]


def test_bksh_layout_is_read_in_place() -> None:
    """No transpose or pad of the [B, K, S, H] cache before the kernel (only q-sized ones)."""
    q = jnp.zeros((2, 1, 8, 128), jnp.float32)
    k = jnp.zeros((2, 2, 1000, 128), jnp.float32)
    fn = lambda q, k, v, n: decode_attention(q, k, v, lengths=n, kv_layout="BKSH", interpret=INTERPRET)  # noqa: E731
    text = str(jax.make_jaxpr(fn)(q, k, k, jnp.array([1000, 3])))
    big = []
    for line in text.splitlines():
        hit = re.search(r"(\w+)\[([\d,]*)\] = (transpose|pad|concatenate|gather)\[", line)
        if hit and hit.group(2) and math.prod(int(d) for d in hit.group(2).split(",")) >= k.size:
            big.append(line.strip())
    assert "transpose[" in text  # the check sees the (small) q/output transposes
    assert big == [], big


def test_empty_rows_are_zero_and_gradient_matches_reference() -> None:
    q, k, v = random_inputs(2, 2, 2, 200, 4, 2, 64, jnp.float32)
    lengths = jnp.array([0, 150], jnp.int32)
    kw = dict(lengths=lengths, window=40)
    out = decode_attention(q, k, v, interpret=INTERPRET, **kw)
    np.testing.assert_array_equal(np.asarray(out)[0], 0.0)
    loss = lambda fn, *a, **x: jnp.sum(fn(*a, **kw, **x) ** 2)  # noqa: E731
    got = jax.grad(loss, (1, 2, 3))(decode_attention, q, k, v, interpret=INTERPRET)
    want = jax.grad(loss, (1, 2, 3))(decode_attention_reference, q, k, v)
    for g, w in zip(got, want):
        assert_close(g, w, jnp.float32, kind="gradient")


def test_stream_k_schedule_balances_ragged_rows() -> None:
    """Units of all tiles are split evenly; each tile's pieces cover its blocks exactly once."""
    lengths = jnp.array([1000, 10, 0, 390], jnp.int32)
    counts = -(-lengths // 128)
    (rows, heads, blocks, pieces, flags), piece_tile = stream_k_schedule(0 * counts, counts, 2, 8, 3)
    valid = (np.asarray(flags) & 1).reshape(3, -1).astype(bool)
    assert valid.sum(1).tolist() == [9, 9, 8]  # 2 * (8 + 1 + 0 + 4) = 26 units over 3 workers
    seen = {(int(r), int(k), int(j)) for r, k, j, ok in zip(rows, heads, blocks, valid.reshape(-1)) if ok}
    expected = {(r, kh, j) for r, n in enumerate((8, 1, 0, 4)) for kh in range(2) for j in range(n)}
    assert seen == expected and len(seen) == 26
    used = np.asarray(piece_tile)[np.asarray(piece_tile) < 8]
    assert sorted(set(used.tolist())) == [0, 1, 2, 3, 6, 7]


@pytest.mark.parametrize(
    "kwargs,error,name",
    [(dict(block_kv=100), ValueError, "block_kv"), (dict(num_workers=0), ValueError, "num_workers")],
)
def test_bad_block_sizes_raise(kwargs, error, name) -> None:  # noqa: ANN001
    with pytest.raises(error, match=name):
        BlockSizes(**kwargs)


@pytest.mark.parametrize(
    "t,h,dtype,kw,error,match",
    [
        (17, 64, jnp.float32, {}, NotImplementedError, "T=17"),
        (1, 32, jnp.float32, {}, NotImplementedError, "head_dim=32"),
        (1, 64, jnp.float16, {}, NotImplementedError, "float16"),
        (1, 64, jnp.float32, dict(lengths=jnp.zeros((3,), jnp.int32)), ValueError, "lengths"),
        (1, 64, jnp.float32, dict(mask=jnp.ones((1, 1, 9), bool)), ValueError, "mask"),
        (1, 64, jnp.float32, dict(mask=jnp.ones((1, 1, 8), jnp.int32)), TypeError, "mask"),
    ],
)
def test_bad_inputs_raise(t, h, dtype, kw, error, match) -> None:  # noqa: ANN001
    q = jnp.zeros((1, t, 2, h), dtype)
    kv = jnp.zeros((1, 8, 1, h), dtype)
    with pytest.raises(error, match=match):
        decode_attention(q, kv, kv, interpret=INTERPRET, **kw)


def test_lowers_to_mosaic_tpu() -> None:
    q = jnp.zeros((2, 4, 8, 128), jnp.bfloat16)
    k = jnp.zeros((2, 1000, 2, 128), jnp.bfloat16)
    mask = jnp.ones((2, 4, 1000), bool)
    fn = lambda q, k, v, n: decode_attention(q, k, v, lengths=n, mask=mask, softcap=30.0, window=500)  # noqa: E731
    text = jax.jit(fn).trace(q, k, k, jnp.array([1000, 3])).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1
    kt = jnp.zeros((2, 2, 1000, 128), jnp.bfloat16)  # the dense cache's layout, read in place
    fn = lambda q, k, v, n: decode_attention(q, k, v, lengths=n, kv_layout="BKSH", window=500)  # noqa: E731
    text = jax.jit(fn).trace(q, kt, kt, jnp.array([1000, 3])).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 1
