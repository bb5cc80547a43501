"""Flash attention kernel (interpret mode) against its plain-jnp reference."""

from __future__ import annotations

import itertools
import random
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "attention"))
from tolerances import (  # noqa: E402
    INTERPRET,
    assert_close,
    assert_lse_close,
    packed_segments,
    random_inputs,
)

from kernels_pallas.flash_attention import BlockSizes, flash_attention, flash_attention_reference  # noqa: E402

BLOCKS = BlockSizes(block_q=128, block_kv=128)  # several tiles (and padding) for T, S > 128
SMALL = BlockSizes(block_q=32, block_kv=128, block_q_bwd=32, block_kv_bwd=128)
LENGTHS = (1, 7, 64, 127, 128, 129, 300, 513)
FEATURES = (
    dict(),
    dict(causal=False),
    dict(window=37),
    dict(softcap=3.0),
    dict(segments=True),
    dict(window=100, softcap=5.0, segments=True),
)


def _grid(count: int, seed: int) -> list[tuple]:
    """A deterministic sample of (B, T, S, N:K, H, features, dtype)."""
    full = list(
        itertools.product(
            (1, 2, 3), LENGTHS, LENGTHS, (1, 4, 8), (64, 128), range(len(FEATURES)), ("float32", "bfloat16")
        )
    )
    return random.Random(seed).sample(full, count)


def _run(fn, q, k, v, features: dict, seed: int, **kw):  # noqa: ANN001, ANN202
    features = dict(features)
    if features.pop("segments", False):
        qs, ks = packed_segments(seed, q.shape[0], q.shape[1], k.shape[1])
        features.update(q_segment_ids=qs, kv_segment_ids=ks)
    return fn(q, k, v, return_lse=True, **features, **kw)


@pytest.mark.parametrize("b,t,s,ratio,h,feature,dtype", _grid(6, seed=0))
def test_forward_matches_reference(b, t, s, ratio, h, feature, dtype) -> None:  # noqa: ANN001
    kv_heads = 2 if ratio == 1 else 1
    q, k, v = random_inputs(t * s, b, t, s, ratio * kv_heads, kv_heads, h, dtype)
    out, lse = _run(flash_attention, q, k, v, FEATURES[feature], t + s, block_sizes=BLOCKS, interpret=INTERPRET)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    ref, ref_lse = _run(flash_attention_reference, *f32, FEATURES[feature], t + s)
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse)


GRAD_CASES = (
    (2, 64, 300, 1, 64, dict(window=100, softcap=5.0, segments=True), "float32"),
    (1, 129, 129, 8, 128, dict(causal=False, softcap=2.0), "bfloat16"),  # small query tiles: 5 per row
)


@pytest.mark.parametrize("b,t,s,ratio,h,features,dtype", GRAD_CASES)
def test_gradients_match_reference(b, t, s, ratio, h, features, dtype) -> None:  # noqa: ANN001
    """dq, dk, dv of a loss using both the output and the log-sum-exp, vs jax.grad of the reference."""
    q, k, v = random_inputs(7, b, t, s, ratio, 1, h, dtype)
    cot = jnp.asarray(np.random.default_rng(1).standard_normal(q.shape, np.float32))

    def loss(fn, q, k, v, **kw):  # noqa: ANN001, ANN202
        out, lse = _run(fn, q, k, v, features, 3, **kw)
        return jnp.sum(out.astype(jnp.float32) * cot) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.grad(loss, argnums=(1, 2, 3))(flash_attention, q, k, v, block_sizes=SMALL, interpret=INTERPRET)
    f32 = [x.astype(jnp.float32) for x in (q, k, v)]
    want = jax.grad(loss, argnums=(1, 2, 3))(flash_attention_reference, *f32)
    for name, got, ref in zip("qkv", grads, want):
        assert got.dtype == q.dtype
        assert_close(got, ref, dtype, kind="gradient", what=f"d{name}")


def test_fully_masked_rows_are_zero_with_finite_gradients() -> None:
    q, k, v = random_inputs(3, 1, 40, 40, 2, 1, 64, jnp.float32)
    q_pos = jnp.arange(40)[None].at[0, :5].set(-1)  # five padded queries
    q_seg = jnp.zeros((1, 40), jnp.int32).at[0, 30:].set(9)  # segment 9 has no keys
    kw = dict(q_positions=q_pos, q_segment_ids=q_seg, kv_segment_ids=jnp.zeros((1, 40), jnp.int32))
    out, lse = flash_attention(q, k, v, return_lse=True, interpret=INTERPRET, **kw)
    empty = np.zeros(40, bool)
    empty[:5] = empty[30:] = True
    np.testing.assert_array_equal(np.asarray(out)[0, empty], 0.0)
    assert np.isneginf(np.asarray(lse)[0, empty]).all() and np.isfinite(np.asarray(lse)[0, ~empty]).all()
    grads = jax.grad(lambda q, k, v: flash_attention(q, k, v, interpret=INTERPRET, **kw).sum(), (0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    np.testing.assert_array_equal(np.asarray(grads[0])[0, empty], 0.0)


def test_left_padding_does_not_change_outputs() -> None:
    """A row left-padded by 9 slots (position -1) equals the unpadded row."""
    q, k, v = random_inputs(5, 1, 120, 120, 4, 2, 64, jnp.float32)
    pad = lambda x: jnp.pad(x, ((0, 0), (9, 0), (0, 0), (0, 0)))  # noqa: E731
    pos = jnp.concatenate([jnp.full((1, 9), -1), jnp.arange(120)[None]], axis=1)
    plain = flash_attention(q, k, v, window=30, block_sizes=SMALL, interpret=INTERPRET)
    padded = flash_attention(
        pad(q), pad(k), pad(v), q_positions=pos, kv_positions=pos, window=30,
        block_sizes=SMALL, interpret=INTERPRET,
    )
    assert_close(padded[:, 9:], plain, jnp.float32)


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(block_q=12), ValueError, "block_q"),
        (dict(block_kv=100), ValueError, "block_kv"),
        (dict(block_q_bwd=0), ValueError, "block_q_bwd"),
        (dict(block_kv_bwd=-128), ValueError, "block_kv_bwd"),
    ],
)
def test_bad_block_sizes_raise(kwargs, error, name) -> None:  # noqa: ANN001
    with pytest.raises(error, match=name):
        BlockSizes(**kwargs)


@pytest.mark.parametrize(
    "shape,dtype,kw,error,match",
    [
        ((1, 8, 2, 96), jnp.float32, {}, NotImplementedError, "head_dim=96"),
        ((1, 8, 2, 64), jnp.float16, {}, NotImplementedError, "float16"),
        ((1, 8, 3, 64), jnp.float32, {}, ValueError, "N=3"),
        ((1, 8, 2, 64), jnp.float32, dict(window=0), ValueError, "window"),
        ((1, 8, 2, 64), jnp.float32, dict(softcap=-1.0), ValueError, "softcap"),
        ((1, 8, 2, 64), jnp.float32, dict(q_positions=jnp.zeros((1, 5), jnp.int32)), ValueError, "q_positions"),
        ((1, 8, 2, 64), jnp.float32, dict(q_segment_ids=jnp.zeros((1, 8), jnp.int32)), ValueError, "segment"),
        ((1, 8, 2, 64), jnp.float32, dict(block_sizes=(128, 128)), TypeError, "block_sizes"),
    ],
)
def test_bad_inputs_raise(shape, dtype, kw, error, match) -> None:  # noqa: ANN001
    q = jnp.zeros(shape, dtype)
    kv = jnp.zeros(shape[:2] + (2 if shape[2] != 3 else 2,) + shape[3:], dtype)
    with pytest.raises(error, match=match):
        flash_attention(q, kv, kv, interpret=INTERPRET, **kw)


def test_lowers_to_mosaic_tpu() -> None:
    """Forward and backward lower through Pallas to Mosaic TPU (catches layout and op errors early)."""
    q = jnp.zeros((1, 300, 8, 256), jnp.bfloat16)
    k = jnp.zeros((1, 300, 2, 256), jnp.bfloat16)
    seg = jnp.zeros((1, 300), jnp.int32)

    def loss(q, k, v):  # noqa: ANN001, ANN202
        out, lse = flash_attention(
            q, k, v, q_segment_ids=seg, kv_segment_ids=seg, window=64, softcap=30.0, return_lse=True
        )
        return out.astype(jnp.float32).sum() + lse.sum()

    text = jax.jit(jax.grad(loss, (0, 1, 2))).trace(q, k, k).lower(lowering_platforms=("tpu",)).as_text()
    assert text.count("tpu_custom_call") == 3  # forward, dq, dkv
