"""Every view type through the dispatcher against the oracle on the equivalent dense arrays.

Views are built by hand here (no cache class): a dense view in both layouts, a
paged view whose unused pages and past-length slots hold NaN (and whose page
table points past each row's pages into other rows' pages), a KIVI-quantized
view whose past-length scales are NaN. Also the per-slot attention mass
(`key_stats`) against float64 softmax probabilities.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).parent))
from tolerances import assert_close, assert_lse_close  # noqa: E402

from efficient.attention import (  # noqa: E402
    AttentionSpec,
    DenseView,
    KeyStats,
    PagedView,
    QuantizedView,
    attention,
    attention_reference,
    pack_codes,
    unsupported,
    visibility_mask,
)
from efficient.attention.views import unpack_codes  # noqa: E402

B, N, K, H = 3, 4, 2, 16
SPECS = (AttentionSpec(), AttentionSpec(window=5, softcap=3.0), AttentionSpec(causal=False))


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _decode_positions(lengths: np.ndarray, t: int, s: int) -> tuple[np.ndarray, np.ndarray]:
    q_pos = lengths[:, None] - t + np.arange(t)[None]
    kv_pos = np.where(np.arange(s)[None] < lengths[:, None], np.arange(s)[None], -1)
    return q_pos.astype(np.int32), kv_pos.astype(np.int32)


def _oracle(q, k, v, q_pos, kv_pos, spec, **kw):  # noqa: ANN001, ANN003, ANN202
    """The float32 oracle on dense arrays (NaN-free: empty slots zeroed)."""
    live = (kv_pos >= 0)[:, :, None, None]
    k, v = np.where(live, k, 0.0), np.where(live, v, 0.0)
    return attention_reference(jnp.asarray(q), jnp.asarray(k, jnp.float32), jnp.asarray(v, jnp.float32),
                               spec=spec, q_positions=jnp.asarray(q_pos), kv_positions=jnp.asarray(kv_pos),
                               return_lse=True, **kw)


def _oracle_mass(q, k, q_pos, kv_pos, spec, request: KeyStats) -> np.ndarray:  # noqa: ANN001
    """Softmax probabilities in float64, summed over the requested heads and queries: [B, S]."""
    q, k = np.asarray(q, np.float64), np.where((kv_pos >= 0)[:, :, None, None], np.asarray(k, np.float64), 0.0)
    g = q.shape[2] // k.shape[2]
    logits = np.einsum("btnh,bsnh->bnts", q, np.repeat(k, g, axis=2)) * spec.logit_scale(q.shape[-1])
    if spec.softcap is not None:
        logits = spec.softcap * np.tanh(logits / spec.softcap)
    vis = np.asarray(visibility_mask(spec, jnp.asarray(q_pos), jnp.asarray(kv_pos)))[:, None]
    logits = np.where(vis, logits, -np.inf)
    top = np.max(logits, axis=-1, keepdims=True)
    p = np.where(vis, np.exp(logits - np.where(np.isfinite(top), top, 0.0)), 0.0)
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-300)
    weights = np.zeros(p.shape[1]) if request.heads is not None else np.ones(p.shape[1])
    if request.heads is not None:
        weights[list(request.heads)] = 1.0
    queries = list(request.queries) if request.queries is not None else slice(None)
    p = (p * weights[None, :, None, None])[:, :, queries]  # B N T S
    p = p.reshape(p.shape[0], k.shape[2], g, *p.shape[2:]).sum(axis=2)  # B K T S
    p = p if request.per_query else p.sum(axis=2)
    return p if request.per_kv_head else p.sum(axis=1)


def _check(view, q, k, v, q_pos, kv_pos, spec, dtype="float32") -> None:  # noqa: ANN001
    ref, ref_lse = _oracle(q, k, v, q_pos, kv_pos, spec)
    for name in ("xla", "reference"):
        out, lse = attention(q, view, spec=spec, q_positions=jnp.asarray(q_pos), return_lse=True,
                             implementation=name)
        assert out.shape == q.shape and out.dtype == q.dtype
        assert_close(out, ref, dtype, what=f"{name} {type(view).__name__} {spec}")
        assert_lse_close(lse, ref_lse, what=f"{name} {type(view).__name__} {spec}")


# ------------------------------------------------------------------ dense, both layouts


@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_dense_view_layouts_with_nan_past_lengths(spec: AttentionSpec) -> None:
    t, s = 3, 21
    rng = _rng(0)
    q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    k, v = rng.standard_normal((2, B, s, K, H)).astype(np.float32)
    lengths = np.array([21, 9, 3])
    q_pos, kv_pos = _decode_positions(lengths, t, s)
    past = (np.arange(s)[None] >= lengths[:, None])[:, :, None, None]
    kn, vn = np.where(past, np.nan, k), np.where(past, np.nan, v)
    for layout in ("BSKH", "BKSH"):
        kk, vv = (jnp.asarray(x if layout == "BSKH" else np.swapaxes(x, 1, 2)) for x in (kn, vn))
        view = DenseView(kk, vv, jnp.asarray(np.arange(s)[None].repeat(B, 0), jnp.int32),
                         jnp.asarray(lengths, jnp.int32), layout=layout)
        assert view.num_slots == s and view.num_kv_heads == K
        _check(view, q, k, v, q_pos, kv_pos, spec)


def test_dense_view_layout_is_validated() -> None:
    with pytest.raises(ValueError, match="layout"):
        DenseView(jnp.zeros((1, 2, 1, 4)), jnp.zeros((1, 2, 1, 4)), layout="SBKH")


# ------------------------------------------------------------------ paged


def _paged(seed: int, t: int, lengths: np.ndarray, page: int, pages_per_row: int, pool: int):  # noqa: ANN202
    """A paged view of random dense k/v [B, S, K, H]: pages in a shuffled pool, NaN elsewhere."""
    rng = _rng(seed)
    s = page * pages_per_row
    q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    k, v = rng.standard_normal((2, B, s, K, H)).astype(np.float32)
    k_pool = np.full((pool, page, K, H), np.nan, np.float32)
    v_pool = np.full((pool, page, K, H), np.nan, np.float32)
    pos_pool = np.full((pool, page), -1, np.int32)
    order = rng.permutation(pool)
    table = np.zeros((B, pages_per_row), np.int32)
    used = 0
    for b, n in enumerate(lengths):
        for r in range(pages_per_row):
            if r * page >= n:  # past the row's pages: point at any page (another row's, or a NaN one)
                table[b, r] = order[rng.integers(0, pool)]
                continue
            m = order[used]
            used += 1
            table[b, r] = m
            fill = min(page, n - r * page)
            k_pool[m, :fill], v_pool[m, :fill] = k[b, r * page:r * page + fill], v[b, r * page:r * page + fill]
            pos_pool[m, :fill] = np.arange(r * page, r * page + fill)
            pos_pool[m, fill:] = 10**6  # stale positions past the length: lengths must hide them
    view = PagedView(jnp.asarray(k_pool), jnp.asarray(v_pool), jnp.asarray(table), jnp.asarray(pos_pool),
                     jnp.asarray(lengths, jnp.int32))
    return view, q, k, v


@pytest.mark.parametrize("t", [1, 5])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_paged_view_matches_dense_oracle(t: int, spec: AttentionSpec) -> None:
    lengths = np.array([13, 5, 20])
    view, q, k, v = _paged(t, t, lengths, page=4, pages_per_row=5, pool=17)
    assert view.num_slots == 20 and view.page_size == 4
    q_pos, kv_pos = _decode_positions(lengths, t, 20)
    _check(view, q, k, v, q_pos, kv_pos, spec)


def test_paged_view_is_refused_by_kernels_with_the_table_reason() -> None:
    view, q, _, _ = _paged(0, 1, np.array([4, 4, 4]), page=4, pages_per_row=2, pool=6)
    reason = unsupported("pallas_tpu", q, view, AttentionSpec())
    assert reason is not None and "PagedView" in reason
    with pytest.raises(NotImplementedError, match=re.escape(reason)):
        attention(q, view, implementation="pallas_tpu")


def test_paged_view_bad_positions_shape_raises() -> None:
    view, q, _, _ = _paged(0, 1, np.array([4, 4, 4]), page=4, pages_per_row=2, pool=6)
    bad = PagedView(view.k_pages, view.v_pages, view.page_table, view.positions[:, :2], view.lengths)
    with pytest.raises(ValueError, match="positions"):
        attention(q, bad)


# ------------------------------------------------------------------ quantized (KIVI)


@pytest.mark.parametrize("bits", [2, 4, 8])
def test_pack_codes_round_trip(bits: int) -> None:
    codes = jnp.asarray(_rng(bits).integers(0, 2**bits, (3, 5, 16)), jnp.uint8)
    packed = pack_codes(codes, bits)
    assert packed.shape == (3, 5, 16 * bits // 8) and packed.dtype == jnp.uint8
    np.testing.assert_array_equal(np.asarray(unpack_codes(packed, bits)), np.asarray(codes))


def _quantized(seed: int, t: int, bits: int, lengths: np.ndarray, s: int, r: int, group: int):  # noqa: ANN202
    """KIVI view (keys per channel, values per token) and its dense dequantization in numpy."""
    rng = _rng(seed)
    q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    kc, vc = rng.integers(0, 2**bits, (2, B, s, K, H))
    ks, kz = rng.random((2, B, s // group, K, H)).astype(np.float32)
    vs, vz = rng.random((2, B, s, K, H // group)).astype(np.float32)
    past = np.arange(s)[None] >= lengths[:, None]
    vs[past] = np.nan  # a past-length token's scale: must not reach the output
    k_deq = kc * np.repeat(ks, group, axis=1) + np.repeat(kz, group, axis=1)
    v_deq = vc * np.repeat(vs, group, axis=3) + np.repeat(vz, group, axis=3)
    res_k, res_v = rng.standard_normal((2, B, r, K, H)).astype(np.float32)
    res_pos = lengths[:, None] + np.arange(r)[None]
    res_pos[1, -1] = -1  # an empty residual slot holding NaN
    res_k[1, -1] = res_v[1, -1] = np.nan
    pos = np.where(past, 7, np.arange(s)[None]).astype(np.int32)  # stale positions past the length
    view = QuantizedView(
        k_codes=pack_codes(jnp.asarray(kc), bits), k_scale=jnp.asarray(ks), k_zero=jnp.asarray(kz),
        v_codes=pack_codes(jnp.asarray(vc), bits), v_scale=jnp.asarray(vs), v_zero=jnp.asarray(vz),
        positions=jnp.asarray(pos), residual_k=jnp.asarray(res_k), residual_v=jnp.asarray(res_v),
        residual_positions=jnp.asarray(res_pos, jnp.int32), lengths=jnp.asarray(lengths, jnp.int32),
        bits=bits, group_size=group,
    )
    k = np.concatenate([k_deq, res_k], axis=1).astype(np.float32)
    v = np.concatenate([v_deq, res_v], axis=1).astype(np.float32)
    kv_pos = np.concatenate([np.where(past, -1, pos), res_pos], axis=1).astype(np.int32)
    q_pos = (lengths[:, None] + r - t + np.arange(t)[None]).astype(np.int32)
    return view, q, k, v, q_pos, kv_pos


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_quantized_view_matches_dense_oracle(bits: int, spec: AttentionSpec) -> None:
    view, q, k, v, q_pos, kv_pos = _quantized(bits, 3, bits, np.array([16, 10, 4]), s=16, r=4, group=8)
    assert view.num_slots == 20
    _check(view, q, k, v, q_pos, kv_pos, spec)


def test_quantized_view_validates_fields() -> None:
    with pytest.raises(ValueError, match="bits"):
        _quantized(0, 1, 3, np.array([8, 8, 8]), s=8, r=2, group=8)
    view, q, *_ = _quantized(0, 1, 4, np.array([8, 8, 8]), s=16, r=2, group=8)
    bad = QuantizedView(**{**{f: getattr(view, f) for f in view.__dataclass_fields__}, "k_scale": view.v_scale})
    with pytest.raises(ValueError, match="k_scale"):
        attention(q, bad)


# ------------------------------------------------------------------ key statistics


REQUESTS = (KeyStats(), KeyStats(heads=(1, 3)), KeyStats(heads=(0,), queries=(0, 2)),
            KeyStats(heads=(1, 2), per_kv_head=True, per_query=True), KeyStats(per_kv_head=True))


@pytest.mark.parametrize("request_", REQUESTS, ids=str)
@pytest.mark.parametrize("kind", ["dense", "paged", "quantized"])
def test_key_stats_match_oracle_probabilities(kind: str, request_: KeyStats) -> None:
    spec = AttentionSpec(window=9, softcap=3.0)
    if kind == "dense":
        t, s = 3, 19
        rng = _rng(5)
        q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
        k, v = rng.standard_normal((2, B, s, K, H)).astype(np.float32)
        lengths = np.array([19, 0, 7])
        q_pos, kv_pos = _decode_positions(lengths, t, s)
        view = DenseView(jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_pos), jnp.asarray(lengths, jnp.int32))
    elif kind == "paged":
        lengths = np.array([13, 5, 20])
        view, q, k, v = _paged(1, 3, lengths, page=4, pages_per_row=5, pool=17)
        q_pos, kv_pos = _decode_positions(lengths, 3, 20)
    else:
        view, q, k, v, q_pos, kv_pos = _quantized(3, 3, 4, np.array([16, 10, 4]), s=16, r=4, group=8)
    want = _oracle_mass(q, k, q_pos, kv_pos, spec, request_)
    ref, ref_lse = _oracle(q, k, v, q_pos, kv_pos, spec)
    for name in ("xla", "reference"):
        out, lse, mass = attention(q, view, spec=spec, q_positions=jnp.asarray(q_pos), return_lse=True,
                                   key_stats=request_, implementation=name)
        assert mass.shape == want.shape and mass.shape[-1] == view.num_slots and mass.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(mass), want, rtol=1e-5, atol=1e-5, err_msg=name)
        assert_close(out, ref, "float32")
        assert_lse_close(lse, ref_lse)
    out, mass = attention(q, view, spec=spec, q_positions=jnp.asarray(q_pos), key_stats=True)
    assert out.shape == q.shape and mass.shape == (B, view.num_slots)


def test_key_stats_refused_by_kernels_and_validated() -> None:
    q = jnp.zeros((1, 1, 2, 64))
    view = DenseView(jnp.zeros((1, 8, 1, 64)), jnp.zeros((1, 8, 1, 64)))
    reason = unsupported("pallas_tpu", q, view, AttentionSpec(), key_stats=KeyStats())
    assert reason == "key_stats is not served"
    with pytest.raises(NotImplementedError, match="pallas_tpu: key_stats is not served"):
        attention(q, view, key_stats=True, implementation="pallas_tpu")
    with pytest.raises(ValueError, match="KeyStats.heads"):
        KeyStats(heads=())
    with pytest.raises(TypeError, match="key_stats"):
        attention(q, view, key_stats="all")


# ------------------------------------------------------------------ blockwise XLA path


@pytest.mark.parametrize("layout", ["BSKH", "BKSH"])
def test_xla_goes_blockwise_for_long_dense_views_and_differentiates(layout: str) -> None:
    """T * S past `prefers_blockwise`: "xla" runs the online-softmax loop, matches the
    oracle, and its gradient (the materialised path's, in the backward) matches too.
    [B, K, S, H] (the cache's layout): a third full, so the run-time choice is blockwise."""
    from efficient.attention.blockwise import prefers_blockwise

    t = 4
    s = next(s for s in (512, 1024, 2048, 4096, 8192, 16384) if prefers_blockwise(t, s, layout))
    n = s * 3 // 4 if layout == "BSKH" else s // 3
    rng = _rng(11)
    q, k, v = (jnp.asarray(rng.standard_normal(shape), jnp.float32)
               for shape in ((1, t, 2, 8), (1, s, 1, 8), (1, s, 1, 8)))
    lengths = jnp.asarray([n], jnp.int32)
    spec = AttentionSpec(window=s // 3)
    q_pos = jnp.arange(t, dtype=jnp.int32)[None] + n - t
    kv_pos = jnp.where(jnp.arange(s)[None] < n, jnp.arange(s)[None], -1)

    def dispatched(q, k, v):  # noqa: ANN001, ANN202
        if layout == "BKSH":
            view = DenseView(jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2), lengths=lengths, layout="BKSH")
        else:
            view = DenseView(k, v, lengths=lengths)
        return attention(q, view, spec=spec, q_positions=q_pos, implementation="xla")

    def oracle(q, k, v):  # noqa: ANN001, ANN202
        return attention_reference(q, k, v, spec=spec, q_positions=q_pos, kv_positions=kv_pos)

    assert "fwd=_blockwise_fwd" in str(jax.make_jaxpr(dispatched)(q, k, v))  # the blockwise path
    assert_close(dispatched(q, k, v), oracle(q, k, v), "float32")
    cot = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    got = jax.grad(lambda *a: jnp.sum(dispatched(*a) * cot), (0, 1, 2))(q, k, v)
    want = jax.grad(lambda *a: jnp.sum(oracle(*a) * cot), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        assert_close(g, w, "float32", kind="gradient")


@pytest.mark.parametrize("held", [700, 1900], ids=["sparse", "full"])
def test_xla_decode_over_a_cache_layout_view_chooses_by_fill(held: int) -> None:
    """A [B, K, S, H] view (the dense cache's) of 2048 slots, one decode query: "xla"
    runs blockwise while the fullest row holds at most half of S and materialised past
    it (a run-time cond); both match the oracle with NaN in every slot past lengths."""
    from efficient.attention.blockwise import prefers_blockwise

    s = 2048
    assert prefers_blockwise(1, s, "BKSH") == "sparse"
    rng = _rng(12)
    lengths = np.array([held, held // 3])
    q = jnp.asarray(rng.standard_normal((2, 1, 6, 8)), jnp.float32)
    k, v = rng.standard_normal((2, 2, s, 2, 8)).astype(np.float32)
    q_pos, kv_pos = _decode_positions(lengths, 1, s)
    past = (np.arange(s)[None] >= lengths[:, None])[:, None, :, None]
    kk, vv = (jnp.asarray(np.where(past, np.nan, np.swapaxes(x, 1, 2))) for x in (k, v))
    view = DenseView(kk, vv, jnp.asarray(np.arange(s)[None].repeat(2, 0), jnp.int32),
                     jnp.asarray(lengths, jnp.int32), layout="BKSH")
    def run(q, view):  # noqa: ANN001, ANN202
        return attention(q, view, spec=AttentionSpec(), q_positions=jnp.asarray(q_pos), implementation="xla")

    program = str(jax.make_jaxpr(run)(q, view))
    assert "cond[" in program and "_blockwise_fwd" in program  # both paths, picked at run time
    out = jax.jit(run)(q, view)
    ref = attention_reference(q, jnp.asarray(k), jnp.asarray(v), q_positions=jnp.asarray(q_pos),
                              kv_positions=jnp.asarray(kv_pos))
    assert_close(out, ref, "float32", what=f"held {held}")


# ------------------------------------------------------------------ per-KV-head positions


def test_per_head_positions_match_the_oracle_run_head_by_head() -> None:
    """A dense view whose KV heads hold different tokens ([B, K, S] positions, an evicting
    cache's) equals the oracle run on each KV head with its own positions; kernels decline it."""
    rng = _rng(11)
    t, s, g = 3, 12, N // K
    spec = AttentionSpec(window=6)
    q = jnp.asarray(rng.standard_normal((B, t, N, H)), jnp.float32)
    k, v = rng.standard_normal((2, B, K, s, H)).astype(np.float32)
    kv_pos = np.stack([np.stack([rng.permutation(20)[:s] for _ in range(K)]) for _ in range(B)]).astype(np.int32)
    kv_pos[0, 1, :4] = -1  # empty entries in one head only
    q_pos = np.broadcast_to(np.arange(17, 20, dtype=np.int32), (B, t)).copy()
    lengths = np.array([12, 9, 12], np.int32)
    view = DenseView(jnp.asarray(k), jnp.asarray(v), jnp.asarray(kv_pos), jnp.asarray(lengths), layout="BKSH")
    kept = np.where(np.arange(s)[None, None] < lengths[:, None, None], kv_pos, -1)
    for name in ("xla", "reference"):
        out, lse = attention(q, view, spec=spec, q_positions=jnp.asarray(q_pos), return_lse=True, implementation=name)
        for head in range(K):
            want, want_lse = _oracle(q[:, :, head * g:(head + 1) * g], np.swapaxes(k[:, head:head + 1], 1, 2),
                                     np.swapaxes(v[:, head:head + 1], 1, 2), q_pos, kept[:, head], spec)
            assert_close(out[:, :, head * g:(head + 1) * g], want, "float32")
            assert_lse_close(lse[:, :, head * g:(head + 1) * g], want_lse)
    q64, kv64 = jnp.zeros((B, t, N, 64)), jnp.zeros((B, K, s, 64))  # a head size the kernel serves
    view64 = DenseView(kv64, kv64, jnp.asarray(kv_pos), jnp.asarray(lengths), layout="BKSH")
    assert unsupported("pallas_tpu", q64, view64, spec) == "per-KV-head positions [B, K, S] are not served"
