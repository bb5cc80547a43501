"""KIVI-quantized decode kernel (interpret mode) against its dequantize-then-attend reference."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parents[1] / "attention"))
from tolerances import FORWARD, INTERPRET, assert_close, assert_lse_close  # noqa: E402

from efficient.attention import views  # noqa: E402
from kernels_pallas.decode_attention import decode_attention_reference  # noqa: E402
from kernels_pallas.quantized_attention import (  # noqa: E402
    dequantize_keys,
    dequantize_values,
    quantized_decode_attention,
    quantized_decode_attention_reference,
    unpack_codes,
)
from kernels_pallas.quantized_attention.tpu import kv_block_index  # noqa: E402

CACHE = ("k_codes", "k_scale", "k_zero", "v_codes", "v_scale", "v_zero")
QUANT = ("bits", "group_size")
# Jitted: one compile per shape instead of one per eager op (most of these tests' time).
reference = jax.jit(
    quantized_decode_attention_reference, static_argnames=(*QUANT, "causal", "window", "softcap", "kv_layout")
)


def kivi_quantize(x: np.ndarray, bits: int, g: int, axis: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Asymmetric min/max quantization of x [B, S, K, H] (KIVI): "channel": one (scale, zero)
    per channel and group of g slots ([B, S/g, K, H]); "token": per slot and group of g
    channels ([B, S, K, H/g]). Returns integer codes [B, S, K, H], scale, zero."""
    b, s, k, h = x.shape
    xg = x.reshape(b, s // g, g, k, h) if axis == "channel" else x.reshape(b, s, k, h // g, g)
    red = 2 if axis == "channel" else 4
    lo, hi = xg.min(red, keepdims=True), xg.max(red, keepdims=True)
    scale = np.maximum(hi - lo, 1e-6) / (2**bits - 1)
    codes = np.clip(np.round((xg - lo) / scale), 0, 2**bits - 1).astype(np.int32)
    return codes.reshape(x.shape), scale.squeeze(red), lo.squeeze(red)


def quantized_cache(
    seed: int, b: int, s: int, k: int, h: int, bits: int, g: int
) -> tuple[dict, np.ndarray, np.ndarray]:
    """Float keys/values [B, S, K, H] ~ N(0, 1) and their packed KIVI cache (BSKH arrays)."""
    rng = np.random.default_rng(seed)
    kf, vf = (rng.standard_normal((b, s, k, h)).astype(np.float32) for _ in range(2))
    kc, ks, kz = kivi_quantize(kf, bits, g, "channel")
    vc, vs, vz = kivi_quantize(vf, bits, g, "token")
    pack = lambda c: views.pack_codes(jnp.asarray(c), bits)  # noqa: E731
    cache = dict(k_codes=pack(kc), k_scale=ks, k_zero=kz, v_codes=pack(vc), v_scale=vs, v_zero=vz)
    return cache, kf, vf


def with_nan_past_lengths(cache: dict, lengths: np.ndarray, g: int, scale_dtype: str) -> dict:
    """Scales and zeros NaN in every empty slot (and key group starting past the length),
    random codes there: the kernel must not let any of it reach the output."""
    rng = np.random.default_rng(1)
    out = dict(cache)
    n = lengths[:, None, None, None]
    key_group_empty = np.arange(cache["k_scale"].shape[1])[None, :, None, None] * g >= n
    slot_empty = np.arange(cache["v_scale"].shape[1])[None, :, None, None] >= n
    for name, empty in (("k_scale", key_group_empty), ("k_zero", key_group_empty),
                        ("v_scale", slot_empty), ("v_zero", slot_empty)):
        out[name] = jnp.asarray(np.where(empty, np.nan, cache[name]), scale_dtype)
    for name in ("k_codes", "v_codes"):
        noise = rng.integers(0, 256, cache[name].shape, dtype=np.uint8)
        out[name] = jnp.asarray(np.where(slot_empty, noise, np.asarray(cache[name])))
    return out


# (B, T, S, G, K, H, bits, g, lengths, block_kv, features, q dtype, scale dtype, layout):
# every case has NaN scales past its lengths; lengths off block multiples, empty rows.
CASES = (
    (3, 1, 192, 1, 2, 128, 2, 32, (192, 0, 97), 64, dict(), "float32", "float32", "BSKH"),
    (2, 4, 160, 3, 2, 64, 4, 16, (160, 45), 64, dict(mask=True, residual=5), "float32", "float32", "BSKH"),
    (2, 1, 192, 3, 1, 64, 8, 32, (192, 130), 64, dict(window=48, softcap=5.0), "bfloat16", "bfloat16", "BSKH"),
    (2, 4, 128, 3, 2, 128, 4, 32, (128, 33), None, dict(mask=True, window=20, shift=7), "float32", "bfloat16", "BKSH"),
    (2, 4, 96, 1, 2, 64, 2, 16, (0, 95), 32, dict(causal=False), "float32", "float32", "BKSH"),
)


@pytest.mark.parametrize("b,t,s,groups,k,h,bits,g,lengths,block_kv,features,dtype,scale_dtype,layout", CASES)
def test_kernel_matches_reference(  # noqa: ANN001
    b, t, s, groups, k, h, bits, g, lengths, block_kv, features, dtype, scale_dtype, layout
) -> None:
    rng = np.random.default_rng(s + t)
    n = np.asarray(lengths)
    cache, _, _ = quantized_cache(s, b, s, k, h, bits, g)
    cache = with_nan_past_lengths(cache, n, g, scale_dtype)
    q = jnp.asarray(rng.standard_normal((b, t, groups * k, h)), dtype)
    lengths = jnp.asarray(n, jnp.int32)
    kw = dict(bits=bits, group_size=g)
    features = dict(features)
    if features.pop("mask", False):
        mask = rng.random((b, t, s)) < 0.7
        mask[0, t // 2] = False  # a query that sees nothing: out 0, lse -inf
        kw["mask"] = jnp.asarray(mask)
    if "residual" in features:  # KIVI: the queries follow the quantized slots and a residual window
        kw["q_positions"] = lengths[:, None] + features.pop("residual") + jnp.arange(t, dtype=jnp.int32)
    if "shift" in features:  # slot s holds position s + shift
        kw["kv_positions"] = jnp.broadcast_to(jnp.arange(s, dtype=jnp.int32) + features.pop("shift"), (b, s))
    kw.update(features)
    ref, ref_lse = reference(q, *(cache[x] for x in CACHE), lengths, **kw)
    arrays = [cache[x] for x in CACHE]
    if layout == "BKSH":
        arrays = [jnp.swapaxes(x, 1, 2) for x in arrays]
        bksh = reference(q, *arrays, lengths, kv_layout="BKSH", **kw)
        np.testing.assert_array_equal(bksh[0], ref)
    out, lse = quantized_decode_attention(
        q, *arrays, lengths, block_kv=block_kv, kv_layout=layout, interpret=INTERPRET, **kw
    )
    assert out.dtype == q.dtype and lse.dtype == jnp.float32
    assert np.isfinite(np.asarray(out, np.float32)).all()
    assert_close(out, ref, dtype)
    assert_lse_close(lse, ref_lse)
    empty = ~np.isfinite(np.asarray(ref_lse))
    assert empty.any() == (0 in lengths.tolist() or "mask" in kw)
    np.testing.assert_array_equal(np.asarray(out, np.float32)[empty], 0.0)


def test_reference_is_lossy_within_the_kivi_bound() -> None:
    """2-bit dequantized keys/values differ from the float ones by at most scale/2 per element,
    and by enough that the attention output moves: a kernel that saw float keys (or
    dropped the scales) could not match the reference."""
    b, s, k, h, g, bits = 2, 128, 2, 64, 32, 2
    cache, kf, vf = quantized_cache(3, b, s, k, h, bits, g)
    quant = dict(bits=bits, group_size=g)
    kd = np.asarray(jax.jit(dequantize_keys, static_argnames=QUANT)(*(cache[x] for x in CACHE[:3]), **quant))
    vd = np.asarray(jax.jit(dequantize_values, static_argnames=QUANT)(*(cache[x] for x in CACHE[3:]), **quant))
    k_bound = np.repeat(cache["k_scale"], g, axis=1) / 2
    v_bound = np.repeat(cache["v_scale"], g, axis=3) / 2
    for deq, x, bound in ((kd, kf, k_bound), (vd, vf, v_bound)):
        err = np.abs(deq - x)
        assert (err <= bound * (1 + 1e-5) + 1e-6).all()
        assert err.mean() > 0.25 * bound.mean()  # rounding error, not a float copy
    q = jnp.asarray(np.random.default_rng(0).standard_normal((b, 1, 2 * k, h)), jnp.float32)
    lengths = jnp.array([s, 77], jnp.int32)
    ref, _ = reference(q, *(cache[x] for x in CACHE), lengths, **quant)
    exact = jax.jit(decode_attention_reference)(q, jnp.asarray(kf), jnp.asarray(vf), lengths=lengths)
    assert np.abs(np.asarray(ref) - np.asarray(exact)).max() > 100 * FORWARD[jnp.dtype(jnp.float32)]


def test_unpacking_matches_the_cache_views() -> None:
    """The local unpack/dequantize equal `efficient.attention.views` (kernels_pallas imports jax only)."""

    @functools.partial(jax.jit, static_argnums=0)
    def both(bits: int, codes: jax.Array, ks: jax.Array, kz: jax.Array, vs: jax.Array, vz: jax.Array) -> tuple:
        packed = views.pack_codes(codes, bits)
        quant = dict(bits=bits, group_size=16)
        return (
            (unpack_codes(packed, bits), views.unpack_codes(packed, bits)),
            (dequantize_keys(packed, ks, kz, **quant), views.dequantize(packed, ks, kz, axis="channel", **quant)),
            (dequantize_values(packed, vs, vz, **quant), views.dequantize(packed, vs, vz, axis="token", **quant)),
        )

    rng = np.random.default_rng(0)
    for bits in (2, 4, 8):
        codes = rng.integers(0, 2**bits, (2, 64, 2, 32))
        ks, kz = (rng.standard_normal((2, 4, 2, 32)).astype(np.float32) for _ in range(2))
        vs, vz = (rng.standard_normal((2, 64, 2, 2)).astype(np.float32) for _ in range(2))
        pairs = both(bits, codes, ks, kz, vs, vz)
        np.testing.assert_array_equal(pairs[0][0], codes)
        for ours, theirs in pairs:
            np.testing.assert_array_equal(ours, theirs)


def test_blocks_past_the_length_repeat_the_last_index() -> None:
    """Steps past a row's last non-empty block fetch the same block again: no new copy."""
    steps = jnp.arange(4)
    got = {n: np.asarray(kv_block_index(steps, jnp.int32(n), 64)).tolist() for n in (0, 1, 64, 65, 200, 256)}
    assert got == {
        0: [0, 0, 0, 0], 1: [0, 0, 0, 0], 64: [0, 0, 0, 0], 65: [0, 1, 1, 1], 200: [0, 1, 2, 3], 256: [0, 1, 2, 3],
    }


def test_no_float_copy_of_the_cache() -> None:
    """Outside the kernel nothing float is as large as a dequantized cache [B, S, K, H]."""
    b, s, k, h, g, bits = 2, 1024, 2, 128, 32, 4
    q = jnp.zeros((b, 4, 4 * k, h), jnp.bfloat16)
    codes = jnp.zeros((b, k, s, h * bits // 8), jnp.uint8)
    ks, vs = jnp.zeros((b, k, s // g, h), jnp.float32), jnp.zeros((b, k, s, h // g), jnp.float32)
    fn = lambda q, c, ks, vs, n: quantized_decode_attention(  # noqa: E731
        q, c, ks, ks, c, vs, vs, n, bits=bits, group_size=g, kv_layout="BKSH"
    )
    jaxpr = jax.make_jaxpr(fn)(q, codes, ks, vs, jnp.array([s, 3], jnp.int32))

    def big_floats(jx) -> list[str]:  # noqa: ANN001
        found = []
        for eqn in jx.eqns:
            if eqn.primitive.name == "pallas_call":
                continue
            for var in eqn.outvars:
                aval = var.aval
                if jnp.issubdtype(aval.dtype, jnp.floating) and np.prod(aval.shape) >= b * s * k * h:
                    found.append(f"{eqn.primitive.name} -> {aval}")
            for value in eqn.params.values():
                for sub in value if isinstance(value, (tuple, list)) else (value,):
                    sub = getattr(sub, "jaxpr", sub)  # ClosedJaxpr -> Jaxpr
                    if hasattr(sub, "eqns"):
                        found += big_floats(sub)
        return found

    assert big_floats(jaxpr.jaxpr) == []
    assert "pallas_call" in str(jaxpr)


def test_lowers_to_mosaic_tpu() -> None:
    """Head-major arrays lower for any K; the [B, S, K, ...] layout for K == 1."""
    b, s, h, g = 2, 1024, 128, 32
    q = jnp.zeros((b, 4, 8, h), jnp.bfloat16)
    mask = jnp.ones((b, 4, s), bool)
    for bits, k, layout in ((4, 2, "BKSH"), (2, 1, "BSKH")):
        shape = lambda s_, last: (b, k, s_, last) if layout == "BKSH" else (b, s_, k, last)  # noqa: B023, E731
        codes = jnp.zeros(shape(s, h * bits // 8), jnp.uint8)
        ks, vs = jnp.zeros(shape(s // g, h), jnp.bfloat16), jnp.zeros(shape(s, h // g), jnp.bfloat16)
        fn = lambda q, c, ks, vs, n: quantized_decode_attention(  # noqa: B023, E731
            q, c, ks, ks, c, vs, vs, n, bits=bits, group_size=g, mask=mask, window=500, softcap=30.0,
            kv_layout=layout,
        )
        text = jax.jit(fn).trace(q, codes, ks, vs, jnp.array([s, 3])).lower(lowering_platforms=("tpu",)).as_text()
        assert text.count("tpu_custom_call") == 1


def _inputs(b=1, t=1, s=64, k=2, h=64, bits=4, g=16):  # noqa: ANN001, ANN202
    return [
        jnp.zeros((b, t, 2 * k, h), jnp.float32),
        jnp.zeros((b, s, k, h * bits // 8), jnp.uint8),
        jnp.zeros((b, s // g, k, h), jnp.float32),
        jnp.zeros((b, s // g, k, h), jnp.float32),
        jnp.zeros((b, s, k, h * bits // 8), jnp.uint8),
        jnp.zeros((b, s, k, h // g), jnp.float32),
        jnp.zeros((b, s, k, h // g), jnp.float32),
        jnp.zeros((b,), jnp.int32),
    ]


def _replace(i: int, x: jax.Array) -> list:
    args = _inputs()
    args[i] = x
    return args


@pytest.mark.parametrize(
    "args,kw,error,match",
    [
        (_inputs(), dict(bits=3), ValueError, "bits must be one of .* got 3"),
        (_inputs(), dict(group_size=24), ValueError, "group_size=24 must divide the head dim H=64"),
        (_inputs(), dict(bits=2, group_size=2), ValueError, "group_size=2 must be a multiple of 8 // bits = 4"),
        (_replace(1, jnp.zeros((1, 64, 2, 32), jnp.int8)), {}, TypeError, "k_codes must be uint8, got int8"),
        (_replace(4, jnp.zeros((1, 64, 2, 16), jnp.uint8)), {}, ValueError, r"v_codes .* shape .*\(1, 64, 2, 32\)"),
        (_replace(2, jnp.zeros((1, 8, 2, 64), jnp.float32)), {}, ValueError, "k_scale must have shape"),
        (_replace(6, jnp.zeros((1, 64, 2, 4), jnp.float16)), {}, TypeError, "v_zero must be float32 or bfloat16"),
        (_replace(7, jnp.zeros((1,), jnp.float32)), {}, TypeError, "lengths must be int"),
        (_replace(0, jnp.zeros((1, 17, 4, 64), jnp.float32)), {}, ValueError, "T=17"),
        (_inputs(), dict(block_kv=40), ValueError, "block_kv=40 must be a multiple of group_size=16"),
        (_inputs(), dict(mask=jnp.ones((1, 1, 64), jnp.int32)), TypeError, "mask must be bool"),
        (_inputs(), dict(kv_layout="SBKH"), ValueError, "kv_layout must be one of"),
        (_inputs(), dict(interpret=False), NotImplementedError, "kv_layout='BSKH' with K=2"),
    ],
)
def test_bad_inputs_raise(args, kw, error, match) -> None:  # noqa: ANN001
    kw = dict(bits=4, group_size=16, interpret=INTERPRET) | kw
    with pytest.raises(error, match=match):
        quantized_decode_attention(*args, **kw)
