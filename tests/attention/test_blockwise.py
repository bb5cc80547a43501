"""`attention_blockwise` against the oracle `attention_reference`.

Tiny shapes (B=2, H=8) with block sizes 4 x 8 so that T and S fall just off
block multiples; both layouts (grouped for T > 16, flat decode for T <= 16); GQA ratios 1 and 3; causal, window, softcap/scale, segment
ids, arbitrary masks, padding (-1) positions, fully masked rows, `lengths`
with NaN in the empty slots, float32 and bfloat16 (tolerances.py).
"""

from __future__ import annotations

import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close, assert_lse_close, packed_segments, random_inputs  # noqa: E402

from efficient.attention.blockwise import attention_blockwise, prefers_blockwise  # noqa: E402
from efficient.attention.reference import attention_reference  # noqa: E402
from efficient.attention.spec import AttentionSpec  # noqa: E402

BLOCKS = dict(block_q=4, block_k=8)
BLOCKWISE = jax.jit(attention_blockwise, static_argnames=("spec", "return_lse", "block_q", "block_k", "kv_layout"))
REF = jax.jit(attention_reference, static_argnames=("spec", "return_lse"))


def _case(name: str) -> tuple[int, int, int, AttentionSpec, dict]:
    """(T, S, G, spec, numpy extras) of one named case; B=2, K=2 (G=1: N=2, G=3: N=6).
    Each case combines several features to keep the number of compiled shapes small."""
    rng = np.random.default_rng(len(name))
    if name == "prefill_padded_segments":  # causal; left padding in row 1, a padded query in row 0
        pos = np.broadcast_to(np.arange(21, dtype=np.int32), (2, 21)).copy()
        pos[1] = np.maximum(np.arange(21) - 5, -1)
        q_pos = pos.copy()
        q_pos[0, 7] = -1
        q_seg, kv_seg = packed_segments(3, 2, 21, 21)
        return 21, 21, 3, AttentionSpec(), dict(q_positions=q_pos, kv_positions=pos,
                                               q_segment_ids=np.asarray(q_seg), kv_segment_ids=np.asarray(kv_seg))
    if name == "window_softcap_shuffled":  # positions not increasing along slots, empty slots between
        kv_pos = np.stack([rng.permutation(17) for _ in range(2)]).astype(np.int32)
        kv_pos[kv_pos >= 14] = -1
        q_pos = np.stack([np.arange(18) - 4, np.arange(18)]).astype(np.int32)
        spec = AttentionSpec(window=6, softcap=1.5, scale=1.0)  # |logits| ~ 3: the cap matters
        return 18, 17, 1, spec, dict(q_positions=q_pos, kv_positions=kv_pos)
    if name == "mask_bidirectional":  # arbitrary mask with fully masked rows (0, 2) and (1, 5)
        m = rng.random((2, 6, 17)) < 0.5
        m[0, 2], m[1, 5] = False, False
        return 6, 17, 3, AttentionSpec(causal=False, softcap=2.0), dict(mask=m)
    if name == "t_gt_s_bidirectional":
        return 19, 5, 1, AttentionSpec(causal=False), {}
    raise AssertionError(name)


CASES = ["prefill_padded_segments", "window_softcap_shuffled", "mask_bidirectional", "t_gt_s_bidirectional"]
BF16_CASES = ["prefill_padded_segments", "mask_bidirectional"]


def _inputs(name: str, dtype) -> tuple:  # noqa: ANN001
    t, s, g, spec, extra = _case(name)
    q, k, v = random_inputs(CASES.index(name), 2, t, s, 2 * g, 2, 8, dtype)
    return q, k, v, spec, {key: jnp.asarray(val) for key, val in extra.items()}


def _check(q, k, v, spec, kw, dtype, *, clean=None, what="", kv_layout="BSKH") -> None:  # noqa: ANN001
    kk, vv = (k, v) if kv_layout == "BSKH" else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2))
    out, lse = BLOCKWISE(q, kk, vv, spec=spec, return_lse=True, kv_layout=kv_layout, **BLOCKS, **kw)
    kw = {key: val for key, val in kw.items() if key != "lengths"}
    qr, kr, vr = (x.astype(jnp.float32) for x in (clean or (q, k, v)))
    ref, ref_lse = REF(qr, kr, vr, spec=spec, return_lse=True, **kw)
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert not np.isnan(np.asarray(out, np.float32)).any()
    assert_close(out, ref, dtype, what=what)
    assert_lse_close(lse, ref_lse, what=what)


@pytest.mark.parametrize(
    "name, dtype",
    [(n, jnp.float32) for n in CASES] + [(n, jnp.bfloat16) for n in BF16_CASES],
    ids=[f"{n}-f32" for n in CASES] + [f"{n}-bf16" for n in BF16_CASES],
)
def test_matches_reference(name: str, dtype) -> None:  # noqa: ANN001
    q, k, v, spec, kw = _inputs(name, dtype)
    _check(q, k, v, spec, kw, dtype, what=name)


def test_fully_masked_rows_are_zeros_with_lse_neg_inf() -> None:
    q, k, v, spec, kw = _inputs("mask_bidirectional", jnp.float32)
    out, lse = BLOCKWISE(q, k, v, spec=spec, return_lse=True, **BLOCKS, **kw)
    for b, t in ((0, 2), (1, 5)):
        assert np.all(np.asarray(out[b, t]) == 0.0)
        assert np.all(np.isneginf(np.asarray(lse[b, t])))


@pytest.mark.parametrize("t, dtype, kv_layout",
                         [(1, jnp.float32, "BSKH"), (1, jnp.bfloat16, "BSKH"), (3, jnp.float32, "BSKH"),
                          (1, jnp.float32, "BKSH"), (3, jnp.bfloat16, "BKSH")],
                         ids=["decode-f32", "decode-bf16", "chunk-f32", "decode-f32-BKSH", "chunk-bf16-BKSH"])
def test_lengths_never_read_past(t: int, dtype, kv_layout: str) -> None:  # noqa: ANN001
    """Decode (T=1) and a chunk (T=3) into a cache of capacity 37 holding 9 and 20
    tokens (GQA 3); NaN in every slot past lengths; keys [B, S, K, H] or, as the dense
    cache stores them, [B, K, S, H]."""
    s, lengths = 37, np.array([9, 20], np.int32)
    q, k, v = random_inputs(21, 2, t, s, 6, 2, 8, dtype)
    empty = np.arange(s)[None, :] >= lengths[:, None]  # B S
    kv_pos = np.where(empty, -1, np.arange(s)[None, :]).astype(np.int32)
    q_pos = (lengths[:, None] - t + np.arange(t)[None, :]).astype(np.int32)
    nan_k, nan_v = (jnp.where(jnp.asarray(empty)[:, :, None, None], jnp.nan, x).astype(dtype) for x in (k, v))
    kw = dict(q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos), lengths=jnp.asarray(lengths))
    _check(q, nan_k, nan_v, AttentionSpec(), kw, dtype, clean=(q, k, v), what=f"lengths T={t} {kv_layout}",
           kv_layout=kv_layout)


@pytest.mark.parametrize("kv_layout", ["BSKH", "BKSH"])
def test_skipped_key_blocks_are_never_read(kv_layout: str) -> None:
    """Causal and window: key blocks no query can see hold NaN; a loop that read them
    would put NaN into the output (0 * NaN in P.V), so a clean output proves the skip."""
    q, k, v = random_inputs(5, 1, 4, 32, 6, 2, 8, jnp.float32)
    q_pos = jnp.array([[20, 21, 22, 23]], jnp.int32)
    kv_pos = jnp.arange(32, dtype=jnp.int32)[None]
    poison = (kv_pos[0] >= 24) | (kv_pos[0] < 8)  # future blocks; blocks outside the window
    nan_v = jnp.where(poison[None, :, None, None], jnp.nan, v)
    spec = AttentionSpec(window=10)
    kk, vv = (k, nan_v) if kv_layout == "BSKH" else (jnp.swapaxes(k, 1, 2), jnp.swapaxes(nan_v, 1, 2))
    out = BLOCKWISE(q, kk, vv, spec=spec, q_positions=q_pos, kv_positions=kv_pos, kv_layout=kv_layout, **BLOCKS)
    ref = REF(q, k, v, spec=spec, q_positions=q_pos, kv_positions=kv_pos)
    assert_close(out, ref, jnp.float32)


@pytest.mark.slow  # ~5 s of compilation for the backward loops
def test_gradient_matches_reference() -> None:
    """Static trip counts (fori_loop + cond) keep the loops reverse-differentiable."""
    q, k, v = random_inputs(8, 1, 17, 17, 6, 2, 8, jnp.float32)
    spec = AttentionSpec(window=9)

    def loss(fn, **kw):  # noqa: ANN001, ANN003, ANN202
        return lambda q, k, v: jnp.sum(fn(q, k, v, spec=spec, **kw) ** 2)

    got = jax.jit(jax.grad(loss(attention_blockwise, **BLOCKS), argnums=(0, 1, 2)))(q, k, v)
    want = jax.jit(jax.grad(loss(attention_reference), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", got, want):
        assert_close(a, b, jnp.float32, kind="gradient", what=f"d{name}")


@pytest.mark.parametrize("kv_layout", ["BSKH", "BKSH"])
def test_interior_blocks_skip_the_mask_and_still_match(kv_layout: str) -> None:
    """Causal prefill with a window: key blocks every query of a block sees whole take the
    unmasked branch (`_full_pairs` is true for some pairs, false on the diagonal and past
    the window), and the result is the oracle's."""
    from efficient.attention.blockwise import _blocked, _full_pairs, _starts

    q, k, v = random_inputs(11, 2, 37, 37, 6, 2, 8, jnp.float32)
    spec = AttentionSpec(window=20, softcap=2.0)
    pos = jnp.broadcast_to(jnp.arange(37, dtype=jnp.int32), (2, 37))
    full = _full_pairs(spec, _blocked(pos, _starts(10, 4, 37), 4), _blocked(pos, _starts(5, 8, 37), 8))
    assert full.any() and not full.all() and not full[0].any()  # block 0's queries see no whole key block
    _check(q, k, v, spec, {}, jnp.float32, what="interior blocks", kv_layout=kv_layout)


def test_block_plan_sorts_full_masked_and_half_blocks() -> None:
    """Causal T = S = 64, query blocks of 16, key blocks of 32 (window 10 for the second
    spec): diagonal blocks whose second half is in the future, and blocks whose first half
    fell out of the window, are computed at half width from the right offset."""
    from efficient.attention.blockwise import _block_plan, _blocked, _needed_pairs, _starts

    pos = jnp.arange(64, dtype=jnp.int32)[None]
    qpos, kpos = _blocked(pos, _starts(4, 16, 64), 16), _blocked(pos, _starts(2, 32, 64), 32)

    def plan(spec: AttentionSpec) -> list[list[tuple[int, str, int]]]:
        order, offset, ends = _block_plan(spec, qpos, kpos, _needed_pairs(spec, qpos, kpos), unmasked=True, half=16)
        kinds = ("full", "masked", "half")
        return [[(int(order[qi, i]), kinds[int((i >= ends[qi]).sum())], int(offset[qi, i]))
                 for i in range(int(ends[qi, 2]))] for qi in range(4)]

    assert plan(AttentionSpec()) == [
        [(0, "half", 0)],  # queries 0-15: keys 16-31 all in the future
        [(0, "masked", 0)],
        [(0, "full", 0), (1, "half", 0)],
        [(0, "full", 0), (1, "masked", 0)],
    ]
    assert plan(AttentionSpec(window=10)) == [
        [(0, "half", 0)],
        [(0, "masked", 0)],  # queries 16-31 see keys 7-31: both halves
        [(0, "half", 16), (1, "half", 0)],  # queries 32-47 see keys 23-47
        [(1, "masked", 0)],  # queries 48-63 see keys 39-63
    ]


@pytest.mark.parametrize("kv_layout", ["BSKH", "BKSH"])
def test_half_width_blocks_match_with_lengths_and_window(kv_layout: str) -> None:
    """Half-width blocks at both offsets (causal diagonal, window edge) with ragged lengths."""
    q, k, v = random_inputs(12, 2, 40, 40, 6, 2, 8, jnp.float32)
    lengths = jnp.asarray([40, 27], jnp.int32)
    slots = jnp.arange(40, dtype=jnp.int32)
    kw = dict(lengths=lengths, q_positions=jnp.broadcast_to(slots, (2, 40)),
              kv_positions=jnp.where(slots < lengths[:, None], slots, -1))  # the oracle sees lengths as -1
    for spec in (AttentionSpec(), AttentionSpec(window=6)):
        _check(q, k, v, spec, kw, jnp.float32, what=f"half blocks {spec}", kv_layout=kv_layout)


def test_default_block_sizes() -> None:
    q, k, v = random_inputs(6, 1, 40, 40, 6, 2, 8, jnp.float32)
    assert_close(jax.jit(attention_blockwise)(q, k, v), REF(q, k, v), jnp.float32)


@pytest.mark.parametrize(
    "kwargs, pattern",
    [
        (dict(block_q=0), "block_q"),
        (dict(block_k=2.5), "block_k"),
        (dict(lengths=jnp.zeros((3,), jnp.int32)), "lengths"),
        (dict(lengths=jnp.zeros((2,), jnp.float32)), "lengths"),
        (dict(q_segment_ids=jnp.zeros((2, 3), jnp.int32)), "segment_ids"),
        (dict(kv_layout="SBKH"), "kv_layout"),
    ],
)
def test_bad_input_raises_naming_argument(kwargs: dict, pattern: str) -> None:
    q, k, v = random_inputs(7, 2, 3, 5, 4, 2, 8, jnp.float32)
    with pytest.raises((ValueError, TypeError), match=pattern):
        attention_blockwise(q, k, v, **kwargs)


def test_prefers_blockwise_threshold() -> None:
    assert not prefers_blockwise(64, 64) and prefers_blockwise(4096, 4096)
    assert not prefers_blockwise(1, 1024) and prefers_blockwise(1, 8192)
    # [B, K, S, H] decode: chosen at run time by how full the cache is, from 2048 slots.
    assert prefers_blockwise(1, 1024, "BKSH") is False and prefers_blockwise(1, 4096, "BKSH") == "sparse"
    assert prefers_blockwise(64, 4096, "BKSH") is True
