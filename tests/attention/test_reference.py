"""`attention_reference` and the dispatcher against an independent float64 oracle.

The naive oracle below loops over (b, n, t) and applies the masking rule of
`efficient.attention.spec` literally: key s is visible to query t iff both
positions are >= 0, (causal) kv_pos <= q_pos, (window) q_pos - kv_pos < W,
segment ids match and mask[b, t, s]. A query head n reads kv head n // G.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path
import zlib
from collections.abc import Iterator

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import logging

from efficient.attention import (
    CAPABILITIES,
    AttentionSpec,
    Capabilities,
    DenseView,
    attention,
    attention_reference,
    register_implementation,
)
from efficient.attention import dispatcher as dispatcher_module
sys.path.insert(0, str(Path(__file__).parent))
from tolerances import attention_arrays  # noqa: E402

# float32 compute against a float64 oracle on O(1) values with S <= 16 terms:
# accumulated rounding is a few ulps of 1 (~1e-6); 1e-5 leaves a 10x margin.
F32_TOL = dict(rtol=1e-5, atol=1e-5)

# Jitted entry points (one compile per case instead of one per eager op); the
# validation tests below call the plain functions.
REF = jax.jit(attention_reference, static_argnames=("spec", "return_lse"))
DISPATCH = jax.jit(attention_arrays, static_argnames=("spec", "return_lse", "implementation"))


def naive_attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    q_positions: np.ndarray | None = None,
    kv_positions: np.ndarray | None = None,
    q_segment_ids: np.ndarray | None = None,
    kv_segment_ids: np.ndarray | None = None,
    mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Float64 loops: returns (out [B, T, N, H], lse [B, T, N])."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b_, t_, n_, h_ = q.shape
    s_, kv_heads = k.shape[1], k.shape[2]
    g = n_ // kv_heads
    if q_positions is None:
        q_positions = np.broadcast_to(np.arange(s_ - t_, s_), (b_, t_))
    if kv_positions is None:
        kv_positions = np.broadcast_to(np.arange(s_), (b_, s_))
    scale = h_**-0.5 if scale is None else scale
    out = np.zeros((b_, t_, n_, h_))
    lse = np.full((b_, t_, n_), -np.inf)
    for b in range(b_):
        for n in range(n_):
            kh = n // g
            for t in range(t_):
                qp = int(q_positions[b, t])
                visible = []
                for s in range(s_):
                    kp = int(kv_positions[b, s])
                    ok = qp >= 0 and kp >= 0
                    ok = ok and (not causal or kp <= qp)
                    ok = ok and (window is None or qp - kp < window)
                    if q_segment_ids is not None:
                        ok = ok and q_segment_ids[b, t] == kv_segment_ids[b, s]
                    if mask is not None:
                        ok = ok and bool(mask[b, t, s])
                    if ok:
                        visible.append(s)
                if not visible:
                    continue
                logits = np.array([scale * np.dot(q[b, t, n], k[b, s, kh]) for s in visible])
                if softcap is not None:
                    logits = softcap * np.tanh(logits / softcap)
                m = logits.max()
                w = np.exp(logits - m)
                out[b, t, n] = sum(wi * v[b, s, kh] for wi, s in zip(w, visible)) / w.sum()
                lse[b, t, n] = m + math.log(w.sum())
    return out, lse


def _qkv(seed: int, b: int, t: int, s: int, n: int, kh: int, h: int, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)).astype(np.float32)
    k = rng.normal(size=(b, s, kh, h)).astype(np.float32)
    v = rng.normal(size=(b, s, kh, h)).astype(np.float32)
    return jnp.asarray(q, dtype), jnp.asarray(k, dtype), jnp.asarray(v, dtype)


def _case(name: str) -> dict:
    """Shapes, spec and extra inputs of one named case (numpy extras)."""
    rng = np.random.default_rng(zlib.crc32(name.encode()))
    base = dict(b=2, t=5, s=5, n=4, kh=2, h=8, spec={}, extra={})
    if name == "causal":
        pass
    elif name == "not_causal":
        base["spec"] = dict(causal=False)
    elif name == "window":
        base.update(t=7, s=7, spec=dict(window=3))
    elif name == "window_not_causal":
        base.update(t=6, s=6, spec=dict(causal=False, window=2))
    elif name == "softcap":
        # scale 1.0 makes |logits| ~ 3, so a cap of 1.5 changes them substantially
        base["spec"] = dict(softcap=1.5, scale=1.0)
    elif name == "scale":
        base["spec"] = dict(scale=0.3)
    elif name == "segments":
        base.update(t=6, s=6)
        seg = np.array([[0, 0, 0, 1, 1, 1], [0, 1, 1, 1, 2, 2]], np.int32)
        base["extra"] = dict(q_segment_ids=seg, kv_segment_ids=seg)
    elif name == "explicit_mask":
        base.update(t=4, s=6, spec=dict(causal=False))
        m = rng.random((2, 4, 6)) < 0.6
        m[:, :, 0] = True  # no empty rows here; those are tested separately
        base["extra"] = dict(mask=m)
    elif name == "custom_positions":
        # decode-like: 3 queries at positions 4..6 (row 1 has a padded query),
        # keys scattered over slots with empty (-1) slots in between
        base.update(t=3, s=8)
        qp = np.array([[4, 5, 6], [-1, 2, 3]], np.int32)
        kp = np.array([[0, 1, -1, 2, 3, 4, 5, 6], [2, -1, 0, 1, 3, -1, -1, -1]], np.int32)
        base["extra"] = dict(q_positions=qp, kv_positions=kp)
    elif name == "left_padding":
        base.update(t=5, s=5)
        pos = np.array([[0, 1, 2, 3, 4], [-1, -1, 0, 1, 2]], np.int32)
        base["extra"] = dict(q_positions=pos, kv_positions=pos)
    elif name.startswith("group"):
        groups = int(name.removeprefix("group"))
        base.update(n=8, kh=8 // groups)  # 1: MHA, 2/4: GQA, 8: MQA (K = 1)
    elif name == "t_lt_s":
        base.update(t=3, s=9)
    elif name == "t_eq_1":
        base.update(t=1, s=11, n=4, kh=1)
    elif name == "t_gt_s_not_causal":
        base.update(t=6, s=3, spec=dict(causal=False))
    else:
        raise AssertionError(name)
    return base


CASES = [
    "causal", "not_causal", "window", "window_not_causal", "softcap", "scale", "segments",
    "explicit_mask", "custom_positions", "left_padding", "group1", "group2", "group4", "group8",
    "t_lt_s", "t_eq_1", "t_gt_s_not_causal",
]


def _run_case(name: str, *, dtype=jnp.float32, fn=REF, **kwargs):
    c = _case(name)
    q, k, v = _qkv(CASES.index(name), c["b"], c["t"], c["s"], c["n"], c["kh"], c["h"], dtype)
    extra_j = {key: jnp.asarray(val) for key, val in c["extra"].items()}
    result = fn(q, k, v, spec=AttentionSpec(**c["spec"]), **extra_j, **kwargs)
    naive = naive_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
                            **c["spec"], **c["extra"])
    return (q, k, v), result, naive


@pytest.mark.parametrize("name", CASES)
def test_reference_matches_naive(name: str) -> None:
    _, (out, lse), (want_out, want_lse) = _run_case(name, return_lse=True)
    assert out.dtype == jnp.float32 and lse.dtype == jnp.float32
    assert out.shape == want_out.shape and lse.shape == want_lse.shape
    np.testing.assert_allclose(np.asarray(out), want_out, **F32_TOL)
    # lse: -inf exactly where the oracle has no visible key, natural-log values elsewhere
    np.testing.assert_array_equal(np.isneginf(np.asarray(lse)), np.isneginf(want_lse))
    finite = np.isfinite(want_lse)
    np.testing.assert_allclose(np.asarray(lse)[finite], want_lse[finite], **F32_TOL)


def test_softcap_and_scale_cases_are_not_trivial() -> None:
    """The softcap/scale cases must differ from the default spec (else they test nothing)."""
    for name in ("softcap", "scale"):
        c = _case(name)
        q, k, v = _qkv(CASES.index(name), c["b"], c["t"], c["s"], c["n"], c["kh"], c["h"])
        plain = REF(q, k, v)
        special = REF(q, k, v, spec=AttentionSpec(**c["spec"]))
        assert float(jnp.max(jnp.abs(plain - special))) > 1e-2


def test_lse_is_natural_log_sum_exp_of_scaled_logits() -> None:
    """Non-causal, no mask: lse equals logsumexp(q.k * scale) over all keys."""
    q, k, v = _qkv(7, 1, 2, 4, 2, 2, 4)
    _, lse = REF(q, k, v, spec=AttentionSpec(causal=False, scale=0.7), return_lse=True)
    logits = np.einsum("btnh,bsnh->btns", np.float64(q), np.float64(k)) * 0.7
    want = np.log(np.exp(logits).sum(-1))
    np.testing.assert_allclose(np.asarray(lse), want, **F32_TOL)


def _fully_masked_inputs():
    """Row 0, query 1 is padding (position -1); row 1, query 0 sees nothing through the mask."""
    q, k, v = _qkv(11, 2, 3, 4, 4, 2, 8)
    q_pos = jnp.array([[1, -1, 3], [1, 2, 3]], jnp.int32)
    kv_pos = jnp.broadcast_to(jnp.arange(4, dtype=jnp.int32), (2, 4))
    mask = np.ones((2, 3, 4), bool)
    mask[1, 0, :] = False
    return q, k, v, q_pos, kv_pos, jnp.asarray(mask)


def test_fully_masked_rows_are_exact_zeros_with_lse_neg_inf() -> None:
    q, k, v, q_pos, kv_pos, mask = _fully_masked_inputs()
    out, lse = REF(q, k, v, q_positions=q_pos, kv_positions=kv_pos, mask=mask, return_lse=True)
    out, lse = np.asarray(out), np.asarray(lse)
    assert not np.isnan(out).any() and not np.isnan(lse).any()
    for b, t in ((0, 1), (1, 0)):
        assert np.all(out[b, t] == 0.0)
        assert np.all(np.isneginf(lse[b, t]))
    # every other row is a real softmax average: finite lse
    assert np.isfinite(lse[0, 0]).all() and np.isfinite(lse[1, 1:]).all()
    want, _ = naive_attention(q, k, v, q_positions=np.asarray(q_pos), kv_positions=np.asarray(kv_pos),
                              mask=np.asarray(mask))
    np.testing.assert_allclose(out, want, **F32_TOL)


def test_all_keys_empty_gives_zeros() -> None:
    """An entirely empty cache (every kv position -1) gives zeros, not NaN."""
    q, k, v = _qkv(12, 1, 2, 3, 2, 1, 4)
    kv_pos = jnp.full((1, 3), -1, jnp.int32)
    out, lse = REF(q, k, v, kv_positions=kv_pos, return_lse=True)
    assert np.all(np.asarray(out) == 0.0)
    assert np.all(np.isneginf(np.asarray(lse)))


def test_gradient_through_fully_masked_row_is_finite() -> None:
    q, k, v, q_pos, kv_pos, mask = _fully_masked_inputs()

    def loss(q, k, v):
        out, lse = attention_reference(q, k, v, q_positions=q_pos, kv_positions=kv_pos, mask=mask,
                                       return_lse=True)
        return jnp.sum(out**2) + jnp.sum(jnp.where(jnp.isfinite(lse), lse, 0.0))

    grads = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)
    for g in grads:
        assert np.isfinite(np.asarray(g)).all()
    dq = np.asarray(grads[0])
    # the masked queries do not influence anything: their gradient is exactly zero
    assert np.all(dq[0, 1] == 0.0) and np.all(dq[1, 0] == 0.0)
    assert np.abs(dq[0, 0]).max() > 0  # while a visible query does get a gradient


def test_bfloat16_input_returns_bfloat16_close_to_float32() -> None:
    """The oracle computes in float32 and rounds once: bf16 output == f32 result rounded."""
    (q, k, v), out, (want, _) = _run_case("custom_positions", dtype=jnp.bfloat16)
    assert out.dtype == jnp.bfloat16
    f32 = REF(
        q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32),
        spec=AttentionSpec(**_case("custom_positions")["spec"]),
        **{key: jnp.asarray(val) for key, val in _case("custom_positions")["extra"].items()},
    )
    out32 = np.asarray(out.astype(jnp.float32))
    np.testing.assert_array_equal(out32, np.asarray(f32.astype(jnp.bfloat16).astype(jnp.float32)))
    # one bf16 rounding: relative error <= 2**-9 (8 stored mantissa bits, round to nearest)
    np.testing.assert_allclose(out32, want, rtol=2**-8, atol=1e-6)


# ------------------------------------------------------------------ dispatcher


@pytest.mark.parametrize("name", ["custom_positions", "group4", "softcap"])
def test_dispatcher_xla_equals_reference(name: str) -> None:
    _, (ref_out, ref_lse), _ = _run_case(name, return_lse=True)
    _, (out, lse), _ = _run_case(name, fn=DISPATCH, implementation="xla", return_lse=True)
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref_out))
    np.testing.assert_array_equal(np.asarray(lse), np.asarray(ref_lse))
    _, default_out, _ = _run_case(name, fn=DISPATCH)  # default order on this backend
    np.testing.assert_array_equal(np.asarray(default_out), np.asarray(ref_out))


@pytest.fixture
def fake_impls() -> Iterator[dict[str, list]]:
    """Registers temporary implementations with their capabilities; removes them afterwards."""
    calls: dict[str, list] = {"small_heads": [], "no_window": [], "raises": []}

    def record(name):  # noqa: ANN001, ANN202
        def impl(q, view, **kwargs):  # noqa: ANN001, ANN003, ANN202
            calls[name].append(kwargs)
            if name == "raises":
                raise NotImplementedError("a bug inside the implementation")
            return jnp.zeros_like(q)

        return impl

    names = {
        "_test_small_heads": ("small_heads", Capabilities(head_dims=(64,))),
        "_test_no_window": ("no_window", Capabilities(window=False)),
        "_test_raises": ("raises", Capabilities()),
    }
    assert not set(names) & set(dispatcher_module._REGISTRY)
    for n, (key, caps) in names.items():
        register_implementation(n, record(key), caps)
    try:
        yield calls
    finally:
        for n in names:
            dispatcher_module._REGISTRY.pop(n, None)
            CAPABILITIES.pop(n, None)
    assert not set(names) & set(dispatcher_module._REGISTRY)


def test_refused_candidate_is_never_called(fake_impls, caplog) -> None:
    q, k, v = _qkv(3, 1, 4, 4, 2, 1, 8)
    spec = AttentionSpec(window=2)
    with caplog.at_level(logging.DEBUG, logger="efficient.attention"):
        out = attention_arrays(q, k, v, spec=spec, implementation=("_test_small_heads", "xla"))
    np.testing.assert_array_equal(np.asarray(out), np.asarray(REF(q, k, v, spec=spec)))
    assert fake_impls["small_heads"] == []
    chosen = [r.getMessage() for r in caplog.records if r.name == "efficient.attention"]
    assert chosen and "xla" in chosen[-1] and "head_dim=8" in chosen[-1]


def test_first_serving_candidate_is_called_with_the_view() -> None:
    q, k, v = _qkv(3, 1, 4, 4, 2, 1, 8)
    seen = []
    register_implementation("_test_spy", lambda q, view, **kw: seen.append((view, kw)) or q, Capabilities())
    try:
        view = DenseView(k, v)
        attention(q, view, spec=AttentionSpec(window=2), implementation=("_test_spy", "xla"))
    finally:
        dispatcher_module._REGISTRY.pop("_test_spy")
        CAPABILITIES.pop("_test_spy")
    (got_view, kw), = seen
    assert got_view is view and kw["spec"] == AttentionSpec(window=2)


def test_error_inside_an_implementation_propagates(fake_impls) -> None:
    q, k, v = _qkv(3, 1, 4, 4, 2, 1, 8)
    with pytest.raises(NotImplementedError, match="a bug inside"):
        attention_arrays(q, k, v, implementation=("_test_raises", "xla"))
    assert len(fake_impls["raises"]) == 1


def test_no_serving_candidate_lists_each_reason(fake_impls) -> None:
    q, k, v = _qkv(3, 1, 4, 4, 2, 1, 8)
    with pytest.raises(NotImplementedError) as err:
        attention_arrays(q, k, v, spec=AttentionSpec(window=3),
                         implementation=["_test_small_heads", "_test_no_window"])
    msg = str(err.value)
    for part in ("_test_small_heads: head_dim=8 is not served", "_test_no_window: window is not served"):
        assert part in msg
    assert fake_impls["small_heads"] == [] and fake_impls["no_window"] == []


def test_registering_without_capabilities_raises() -> None:
    with pytest.raises(ValueError, match="_test_undeclared"):
        register_implementation("_test_undeclared", lambda q, view, **kw: q)


def test_unknown_implementation_raises_value_error_naming_it() -> None:
    q, k, v = _qkv(3, 1, 2, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="no_such_kernel"):
        attention_arrays(q, k, v, implementation="no_such_kernel")
    with pytest.raises(ValueError, match="no_such_kernel"):
        attention_arrays(q, k, v, implementation=("xla", "no_such_kernel"))


@pytest.mark.parametrize("empty", [(), []])
def test_empty_implementation_sequence_raises(empty) -> None:
    q, k, v = _qkv(3, 1, 2, 2, 2, 1, 4)
    with pytest.raises(ValueError, match="implementation"):
        attention_arrays(q, k, v, implementation=empty)


# ------------------------------------------------------------------ bad input


def _bad_inputs():
    q, k, v = _qkv(5, 2, 3, 4, 4, 2, 8)
    pos_t = jnp.zeros((2, 3), jnp.int32)
    cases = {
        "q_rank3": (dict(q=q[:, :, 0]), ValueError, r"\bq\b"),
        "q_int": (dict(q=q.astype(jnp.int32)), TypeError, r"\bq\b"),
        "k_int": (dict(k=k.astype(jnp.int32)), TypeError, r"\bk\b"),
        "kv_len_mismatch": (dict(v=v[:, :3]), ValueError, r"\bv\b"),
        "kv_heads_mismatch": (dict(v=v[:, :, :1]), ValueError, r"\bv\b"),
        "v_head_dim_mismatch": (dict(v=jnp.concatenate([v, v], -1)), ValueError, r"\bv\b"),
        "k_head_dim_mismatch": (dict(k=k[..., :4], v=v[..., :4]), ValueError, r"\bk\b"),
        "n_not_multiple_of_k": (dict(q=jnp.concatenate([q, q[:, :, :1]], 2)), ValueError, "kv heads"),
        "q_positions_shape": (dict(q_positions=jnp.zeros((2, 4), jnp.int32)), ValueError, "q_positions"),
        "kv_positions_shape": (dict(kv_positions=pos_t), ValueError, "kv_positions"),
        "q_positions_float": (dict(q_positions=pos_t.astype(jnp.float32)), TypeError, "q_positions"),
        "mask_not_bool": (dict(mask=jnp.ones((2, 3, 4), jnp.int32)), TypeError, "mask"),
        "mask_shape": (dict(mask=jnp.ones((2, 3, 3), bool)), ValueError, "mask"),
        "segment_ids_alone": (dict(q_segment_ids=pos_t), ValueError, "segment_ids"),
    }
    return (q, k, v), cases


BAD_NAMES = list(_bad_inputs()[1])


@pytest.mark.parametrize("fn", [attention_reference, attention_arrays], ids=["reference", "dispatcher"])
@pytest.mark.parametrize("case", BAD_NAMES)
def test_bad_input_raises_naming_argument(case: str, fn) -> None:
    (q, k, v), cases = _bad_inputs()
    changes, exc, pattern = cases[case]
    args = dict(q=q, k=k, v=v)
    kwargs = {key: val for key, val in changes.items() if key not in args}
    args.update({key: val for key, val in changes.items() if key in args})
    with pytest.raises(exc, match=pattern):
        fn(args["q"], args["k"], args["v"], **kwargs)


@pytest.mark.parametrize(
    "kwargs, name",
    [
        (dict(window=0), "window"),
        (dict(window=-3), "window"),
        (dict(window=2.5), "window"),
        (dict(softcap=0.0), "softcap"),
        (dict(softcap=-1.0), "softcap"),
        (dict(scale=0.0), "scale"),
    ],
)
def test_bad_spec_raises_naming_field(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name):
        AttentionSpec(**kwargs)
