"""Blockwise XLA attention with an online softmax (FlashAttention-2, Dao 2023).

Same semantics as `attention_reference` (masking by positions, -1 = empty; a
fully masked query row gives zeros and lse -inf), but the [B, K, G, T, S]
logits are never materialised: queries are cut into blocks of `block_q`, keys
into blocks of `block_k`, and each query block keeps a running row max `m`, sum
`l` and output accumulator in float32 (Milakov & Gimelshein 2018; Dao 2023,
Alg. 1). Matmuls run in the input dtype with float32 accumulation; K/V are
never repeated across the G query heads of a group.

Two layouts of one step, both measured on XLA:CPU (experiments/bench_blockwise.py):
- grouped (T > 16, prefill): the N heads as [K, G], rows (t, g) per kv head,
  logits [B, K, block_q * G, block_k] per step.
- flat (T <= 16, decode): all T * N query rows against the block's keys of
  *all* K kv heads, [B, T * N, block_k * K], keeping the same-head diagonal by
  a mask. It does K times the (tiny) decode FLOPs but reads K/V in their
  [B, S, K, H] layout without the per-head transpose copies XLA inserts for a
  batched-over-K dot; decode is bandwidth-bound, so this was 1.3-2x faster at S = 8192.
Keys stored [B, K, S, H] (`kv_layout="BKSH"`, the dense cache's layout) always use
the grouped rows: each head's key block is contiguous, so the batched-over-K dot
needs no transpose (decode key blocks of 512).

Work that cannot contribute is skipped at run time: from the positions (and
`lengths`, when given) we compute per key block its min/max valid position and
per query block its min/max query position, decide which (query block, key
block) pairs can have a visible key (causal, window, empty slots), and move the
needed key blocks to the front (stable argsort). Causal prefill thus does about
half the blocks, and decode into a cache of capacity S holding L tokens reads
about L / block_k blocks.

Loop formulation: `lax.map` over query blocks; inside, each query block's key
blocks sorted by kind (`_block_plan`) and one `fori_loop` per kind with a
data-dependent trip count and no conditional inside: blocks every query of the
block sees whole (the interior of a causal prefill: all slots valid, all keys at
or before the block's first query, inside the window) skip building and applying
the mask; masked blocks; and masked blocks of which one half has no visible key
(the causal diagonal block whose second half lies past the query block, a
window's edge), computed at half width. An earlier form (a static trip count
over all key blocks, `lax.switch` skip / masked / full in the body) copied the
running output at every step, skipped ones included, out of the conditional:
per SmolLM2 layer (B=1, N=9, K=3, H=64, f32, causal, [B, K, S, H] keys, min of
9) 153.7 -> 147.5 ms at T = S = 4096, 568 -> 551 ms at 8192, 44.2 -> 41.3 ms at
2048; torch SDPA took 143-149 ms at 4096. Loops with data-dependent trip counts
are not reverse-differentiable, so `attention_blockwise` has a custom VJP: the
materialised path's gradient, recomputed in the backward pass. Prefill blocks of
256 queries x 512 keys (measured before the half-width blocks: 164 ms at 4096
against 186 ms for 256 x 256, 165-170 ms for 512 x 256, 195 ms for 256 x 1024,
191 ms for 128 x 512; 49 against 52 ms at 2048). Decode uses key blocks of 1024
(fewer, larger steps at full caches; still fine-grained skipping at small L).
Uneven T and S are handled without padding copies: the
last block's start is clamped to end at T (S), and the key slots it shares
with its predecessor are masked (the query rows are recomputed and dropped).
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.reference import grouped_attention
from efficient.attention.spec import AttentionSpec, default_positions, validate_inputs
from efficient.attention.views import DenseView, slot_positions

# Defaults measured on XLA:CPU (experiments/bench_blockwise.py).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 512
DECODE_BLOCK_K = 1024  # T <= DECODE_MAX_T: one query block, flat layout
DECODE_BLOCK_K_BY_HEAD = 512  # decode over [B, K, S, H] keys (grouped rows)
DECODE_MAX_T = 16

_NEG = -1e30  # initial running max: finite, so exp(m_old - m_new) never sees inf - inf

# Thresholds of `prefers_blockwise`, measured with experiments/bench_blockwise.py (2-core
# AMD EPYC, B=1, N=9, K=3, H=64). Prefill: tie at T=S=128, 1.1-1.2x at 256-384, 2.3x at
# 512, 8x at 1k, 11-35x at 2k-4k. Decode into a cache of capacity S: at S <= 2048 the
# materialised path wins by ~0.1-0.3 ms (the blockwise set-up costs ~0.1 ms); at 4096
# blockwise is 2x faster a quarter full and 0.85x full; at 8192 it ties full and is
# 1.5-10x faster at L <= 4096.
BLOCKWISE_MIN_LOGITS = 256 * 256
BLOCKWISE_MIN_DECODE_S = 4096
# Decode over [B, K, S, H] keys (the dense cache's layout), SmolLM2 with per-layer cache
# buffers, one-token steps (ms, 30 layers): the blockwise loop copies each key block
# before its dot, the materialised path reads the cache in place, so blockwise wins only
# on a sparsely filled cache: capacity 4224 holding 256 tokens 29-35 against 40-44;
# holding 4096, 52-59 against 45-47; capacity 8192 holding 4096, 49-54 against 51-60;
# holding 8000, 81-89 against 76.
BLOCKWISE_MIN_DECODE_S_BY_HEAD = 2048
DECODE_SPARSE_FILL = 0.5


def prefers_blockwise(t: int, s: int, kv_layout: str = "BSKH") -> bool | str:
    """Whether `attention_blockwise` should replace the materialised "xla" path on
    XLA:CPU for T queries and S keys (S = cache capacity when decoding) in `kv_layout`:
    True, False, or "sparse" (decode over [B, K, S, H] keys: only while the fullest row
    holds at most `DECODE_SPARSE_FILL` of S, chosen at run time from the lengths)."""
    if t <= DECODE_MAX_T:
        if kv_layout == "BKSH":
            return "sparse" if s >= BLOCKWISE_MIN_DECODE_S_BY_HEAD else False
        return s >= BLOCKWISE_MIN_DECODE_S
    return t * s >= BLOCKWISE_MIN_LOGITS


def _check_block(name: str, value: int | None) -> None:
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"{name} must be a positive int or None, got {value!r}")


def _starts(n_blocks: int, block: int, length: int) -> Int[Array, " nblocks"]:
    """Block starts clamped so the last block ends at `length` (it overlaps its predecessor)."""
    return jnp.minimum(jnp.arange(n_blocks, dtype=jnp.int32) * block, length - block)


def _blocked(x: Int[Array, "B L"], starts: Int[Array, " nb"], block: int) -> Int[Array, "B nb blk"]:
    return x[:, starts[:, None] + jnp.arange(block, dtype=jnp.int32)]


def _needed_pairs(
    spec: AttentionSpec,
    qpos: Int[Array, "B nq bq"],
    kpos: Int[Array, "B nk bk"],
) -> Bool[Array, "nq nk"]:
    """(query block, key block) pairs where some row may see some key (any batch row)."""
    big = jnp.iinfo(jnp.int32).max
    qvalid, kvalid = qpos >= 0, kpos >= 0
    q_any, k_any = qvalid.any(-1), kvalid.any(-1)  # B nq, B nk
    q_max = jnp.where(qvalid, qpos, -1).max(-1)[:, :, None]
    q_min = jnp.where(qvalid, qpos, big).min(-1)[:, :, None]
    k_min = jnp.where(kvalid, kpos, big).min(-1)[:, None, :]
    k_max = jnp.where(kvalid, kpos, -1).max(-1)[:, None, :]
    need = q_any[:, :, None] & k_any[:, None, :]  # B nq nk
    if spec.causal:
        need &= k_min <= q_max
    if spec.window is not None:
        need &= q_min - k_max < spec.window
    return need.any(0)


def _full_pairs(
    spec: AttentionSpec,
    qpos: Int[Array, "B nq bq"],
    kpos: Int[Array, "B nk bk"],
) -> Bool[Array, "nq nk"]:
    """(query block, key block) pairs where every query of every row sees every key: no
    mask to build or apply (the interior of a causal prefill)."""
    big = jnp.iinfo(jnp.int32).max
    q_all, k_all = (qpos >= 0).all(-1), (kpos >= 0).all(-1)  # B nq, B nk
    full = q_all[:, :, None] & k_all[:, None, :]  # B nq nk
    if spec.causal:
        full &= kpos.max(-1)[:, None, :] <= jnp.where(qpos >= 0, qpos, -1).min(-1)[:, :, None]
    if spec.window is not None:
        q_max = qpos.max(-1)[:, :, None]
        k_min = jnp.where(kpos >= 0, kpos, big).min(-1)[:, None, :]
        full &= q_max - k_min < spec.window
    return full.all(0)


def _block_plan(
    spec: AttentionSpec,
    qpos: Int[Array, "B nq bq"],
    kpos: Int[Array, "B nk bk"],
    need: Bool[Array, "nq nk"],
    unmasked: bool,
    half: int,
) -> tuple[Int[Array, "nq nk"], Int[Array, "nq nk"], Int[Array, "nq 3"]]:
    """Each query block's key blocks sorted by kind: full (no mask to build: `_full_pairs`,
    only when `unmasked`), masked, masked at half width, not needed. A masked block of which
    one half has no visible key (a causal diagonal block whose second half lies past the
    query block, a window's edge) is computed at half width from `offset` (0 or `half` =
    bk / 2; `half` = 0 for none). Returns (order, offset, ends): block ids and half offsets in that order,
    and where the runs of the first three kinds end."""
    nq, nk = need.shape
    full = need & _full_pairs(spec, qpos, kpos) if unmasked else jnp.zeros_like(need)
    if half:
        halves = _needed_pairs(spec, qpos, kpos.reshape(kpos.shape[0], nk * 2, half)).reshape(nq, nk, 2)
        halved = need & ~full & ~(halves[..., 0] & halves[..., 1])
        offset = jnp.where(halves[..., 0], 0, half).astype(jnp.int32)
    else:
        halved, offset = jnp.zeros_like(need), jnp.zeros(need.shape, jnp.int32)
    kind = jnp.where(full, 0, jnp.where(halved, 2, jnp.where(need, 1, 3)))
    order = jnp.argsort(kind, axis=1, stable=True).astype(jnp.int32)
    ends = jnp.stack([(kind <= c).sum(1, dtype=jnp.int32) for c in range(3)], axis=1)
    return order, jnp.take_along_axis(offset, order, axis=1), ends


def attention_blockwise(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    spec: AttentionSpec = AttentionSpec(),
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    return_lse: bool = False,
    lengths: Int[Array, " B"] | None = None,
    block_q: int | None = None,
    block_k: int | None = None,
    kv_layout: str = "BSKH",
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact attention, computed blockwise with an online softmax (module docstring).

    lengths: optional int32[B]; slots >= lengths[b] are empty for every query of
        row b: they are masked and key blocks past max(lengths) are skipped.
        Empty slots (past lengths or at position -1) never reach the result, even
        when they hold NaN.
    block_q, block_k: block sizes (clipped to T and S); None picks measured defaults.
    kv_layout: "BSKH" (k, v [B, S, K, H]) or "BKSH" (k, v [B, K, S, H], the dense
        cache's stored layout): key blocks are sliced along S in place, per kv head
        (the grouped rows, also when decoding), so a view of one layer of a stacked
        cache is never copied whole.
    Returns output in q.dtype and, if `return_lse`, the float32 log-sum-exp [B, T, N].
    """
    if kv_layout not in ("BSKH", "BKSH"):
        raise ValueError(f"kv_layout must be 'BSKH' or 'BKSH', got {kv_layout!r}")
    by_head = kv_layout == "BKSH"
    # Shape checks on the [B, S, K, H] shape (a stand-in: no transpose is traced).
    k_std = jax.ShapeDtypeStruct((k.shape[0], k.shape[2], k.shape[1], k.shape[3]), k.dtype) if by_head else k
    v_std = jax.ShapeDtypeStruct((v.shape[0], v.shape[2], v.shape[1], v.shape[3]), v.dtype) if by_head else v
    validate_inputs(q, k_std, v_std, q_positions, kv_positions, mask, q_segment_ids, kv_segment_ids)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    b, t, n, h = q.shape
    s = k_std.shape[1]
    if lengths is not None:
        if tuple(lengths.shape) != (b,):
            raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths must be an integer dtype, got {lengths.dtype}")
    if q_positions is None or kv_positions is None:
        dq, dk = default_positions(b, t, s)
        q_positions = dq if q_positions is None else q_positions
        kv_positions = dk if kv_positions is None else kv_positions
    arrays = dict(q_positions=q_positions.astype(jnp.int32), kv_positions=kv_positions.astype(jnp.int32),
                  q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, mask=mask, lengths=lengths)
    out, lse = _blockwise(spec, block_q, block_k, kv_layout, q, k, v, arrays)
    return (out, lse) if return_lse else out


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2, 3))
def _blockwise(spec: AttentionSpec, block_q: int | None, block_k: int | None, kv_layout: str,  # noqa: ANN202
               q, k, v, arrays):  # noqa: ANN001
    return _forward(spec, block_q, block_k, kv_layout, q, k, v, **arrays)


def _blockwise_fwd(spec: AttentionSpec, block_q: int | None, block_k: int | None, kv_layout: str,  # noqa: ANN202
                   q, k, v, arrays):  # noqa: ANN001
    return _blockwise(spec, block_q, block_k, kv_layout, q, k, v, arrays), (q, k, v, arrays)


def _blockwise_bwd(spec: AttentionSpec, block_q: int | None, block_k: int | None, kv_layout: str,  # noqa: ANN202
                   res, cotangent):  # noqa: ANN001
    """The forward's loops have data-dependent trip counts (not reverse-differentiable):
    differentiate the materialised path, same function, O(T S) memory in the backward only
    (what the reverse of a static-trip-count scan would store too)."""
    q, k, v, arrays = res
    arrays = dict(arrays)
    # Past-length slots as the forward sees them: position -1 (the views' own rule).
    view = DenseView(k, v, positions=arrays["kv_positions"], lengths=arrays.pop("lengths"), layout=kv_layout)
    arrays["kv_positions"] = positions = slot_positions(view)
    live = positions >= 0  # B S; empty slots may hold NaN: zero them, as the forward does
    v = jnp.where(live[:, None, :, None] if kv_layout == "BKSH" else live[:, :, None, None], v,
                  jnp.zeros((), v.dtype))

    def materialised(q, k, v):  # noqa: ANN001, ANN202
        return grouped_attention(q, k, v, spec=spec, return_lse=True, exact=False, kv_layout=kv_layout, **arrays)

    _, vjp = jax.vjp(materialised, q, k, v)
    return (*vjp(cotangent), None)


_blockwise.defvjp(_blockwise_fwd, _blockwise_bwd)


def _forward(
    spec: AttentionSpec,
    block_q: int | None,
    block_k: int | None,
    kv_layout: str,
    q: Float[Array, "B T N H"],
    k: Array,
    v: Array,
    *,
    q_positions: Int[Array, "B T"],
    kv_positions: Int[Array, "B S"],
    q_segment_ids: Int[Array, "B T"] | None,
    kv_segment_ids: Int[Array, "B S"] | None,
    mask: Bool[Array, "B T S"] | None,
    lengths: Int[Array, " B"] | None,
) -> tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """The blockwise loops (module docstring); output and float32 lse."""
    by_head = kv_layout == "BKSH"
    b, t, n, h = q.shape
    s, kh = (k.shape[2], k.shape[1]) if by_head else (k.shape[1], k.shape[2])
    g = n // kh
    axis = 2 if by_head else 1  # S axis of k and v
    decode = t <= DECODE_MAX_T
    flat = decode and not by_head  # decode layout of [B, S, K, H] keys (module docstring)
    bq = min(block_q or (t if decode else DEFAULT_BLOCK_Q), t)
    bk = min(block_k or ((DECODE_BLOCK_K_BY_HEAD if by_head else DECODE_BLOCK_K) if decode else DEFAULT_BLOCK_K), s)
    nq, nk = -(-t // bq), -(-s // bk)
    q_starts, k_starts = _starts(nq, bq, t), _starts(nk, bk, s)

    # Key slots that hold a token: the clamped last block masks slots its predecessor
    # already covered; slots past lengths are empty.
    slot = k_starts[:, None] + jnp.arange(bk, dtype=jnp.int32)  # nk bk
    owned = slot >= (jnp.arange(nk, dtype=jnp.int32) * bk)[:, None]
    kpos = jnp.where(owned, _blocked(kv_positions, k_starts, bk), -1)  # B nk bk
    if lengths is not None:
        kpos = jnp.where(slot < lengths.astype(jnp.int32)[:, None, None], kpos, -1)
    qpos = _blocked(q_positions, q_starts, bq)  # B nq bq
    need = _needed_pairs(spec, qpos, kpos)  # nq nk
    # Blocks every query sees whole skip building and applying the mask (the flat decode
    # layout always masks: its logits pair every head with every kv head). Only without
    # segment ids or an explicit mask, which the positions cannot vouch for.
    unmasked = not flat and q_segment_ids is None and mask is None
    half = bk // 2 if bk % 2 == 0 else 0
    order, offset, ends = _block_plan(spec, qpos, kpos, need, unmasked, half)
    scale = spec.logit_scale(h)
    # Scale the query block once instead of every logit block (one pass over [rows, bk] fewer
    # per key block: 159 -> 155 ms per SmolLM2 layer at T = S = 4096), where that rounds no
    # differently: float32 queries, or a power-of-two scale (H = 64: 1/8). Not under a softcap,
    # which needs the scaled logits anyway.
    fold_scale = spec.softcap is None and (q.dtype == jnp.float32 or math.frexp(scale)[0] == 0.5)
    # Rows of the running statistics: flat (t, n) over all heads; grouped (t, g) per kv head.
    rows = (b, bq * n) if flat else (b, kh, bq * g)
    same_head = (jnp.arange(kh)[:, None, None, None] == jnp.arange(kh))  # K 1 1 K'

    def query_block(qi: Int[Array, ""]) -> tuple[Array, Array]:
        q0 = q_starts[qi]
        qblk = jax.lax.dynamic_slice_in_dim(q, q0, bq, axis=1)  # B bq N H
        if flat:
            qblk = qblk.reshape(b, bq * n, h)
        else:
            qblk = qblk.reshape(b, bq, kh, g, h).transpose(0, 2, 1, 3, 4).reshape(*rows, h)
        if fold_scale:
            qblk = (qblk * scale).astype(q.dtype)
        qp = qpos[:, qi]  # B bq
        qseg = None if q_segment_ids is None else jax.lax.dynamic_slice_in_dim(q_segment_ids, q0, bq, 1)

        def scores(kblk: Array) -> Float[Array, "*rows w"]:
            """Scaled (and capped) logits of the query block against one key block."""
            if flat:  # every head against every kv head: no K/V transposes (the mask keeps the diagonal)
                logits = jnp.einsum("brh,bsh->brs", qblk, kblk.reshape(b, -1, h),
                                    preferred_element_type=jnp.float32)
            else:
                logits = jnp.einsum("bkqh,bksh->bkqs" if by_head else "bkqh,bskh->bkqs", qblk, kblk,
                                    preferred_element_type=jnp.float32)
            if not fold_scale:
                logits = logits * scale
            if spec.softcap is not None:
                logits = spec.softcap * jnp.tanh(logits / spec.softcap)
            return logits

        def body(i: Int[Array, ""], carry: tuple, masked: bool, width: int) -> tuple:
            """One key block (`width` keys from its start, or from its offset at half width)."""
            m, l, acc = carry
            kb = order[qi, i]
            off = offset[qi, i] if width < bk else 0
            k0 = k_starts[kb] + off
            kblk = jax.lax.dynamic_slice_in_dim(k, k0, width, axis=axis)  # B w K H | B K w H
            vblk = jax.lax.dynamic_slice_in_dim(v, k0, width, axis=axis)
            if not masked:  # a full block (`_full_pairs`): every slot holds a visible key
                return _online_softmax_step(m, l, acc, scores(kblk), vblk, by_head)
            kp = kpos[:, kb] if width == bk else jax.lax.dynamic_slice_in_dim(kpos[:, kb], off, width, 1)  # B w
            vis = (qp[:, :, None] >= 0) & (kp[:, None, :] >= 0)  # B bq w
            if spec.causal:
                vis &= kp[:, None, :] <= qp[:, :, None]
            if spec.window is not None:
                vis &= qp[:, :, None] - kp[:, None, :] < spec.window
            if qseg is not None:
                kseg = jax.lax.dynamic_slice_in_dim(kv_segment_ids, k0, width, 1)
                vis &= qseg[:, :, None] == kseg[:, None, :]
            if mask is not None:
                vis &= jax.lax.dynamic_slice(mask, (0, q0, k0), (b, bq, width))
            # Zero V in empty slots (past lengths or position -1: they may hold NaN, and
            # 0 * NaN = NaN in P.V); measured free: it fuses into the block's slice copy.
            vblk = jnp.where((kp >= 0)[:, None, :, None] if by_head else (kp >= 0)[:, :, None, None], vblk, 0)
            if flat:  # keep the same-head diagonal of the flat logits
                vis = vis[:, :, None, None, :, None] & same_head  # B bq K G|1 w K'
                vis = jnp.broadcast_to(vis, (b, bq, kh, g, width, kh)).reshape(b, bq * n, width * kh)
            else:
                vis = jnp.broadcast_to(vis[:, None, :, None, :], (b, 1, bq, g, width)).reshape(b, 1, bq * g, width)
            logits = jnp.where(vis, scores(kblk), -jnp.inf)
            if flat:
                return _online_softmax_step(m, l, acc, logits, vblk.reshape(b, width * kh, h), None)
            return _online_softmax_step(m, l, acc, logits, vblk, by_head)

        carry = (
            jnp.full(rows, _NEG, jnp.float32),
            jnp.zeros(rows, jnp.float32),
            jnp.zeros((*rows, h), jnp.float32),
        )
        start = jnp.int32(0)
        for end, masked, width in ((ends[qi, 0], False, bk), (ends[qi, 1], True, bk), (ends[qi, 2], True, half)):
            if width and (masked or unmasked):
                carry = jax.lax.fori_loop(start, end, functools.partial(body, masked=masked, width=width), carry)
            start = end
        m, l, acc = carry
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        if not flat:
            out = out.reshape(b, kh, bq, g, h).transpose(0, 2, 1, 3, 4)
            lse = lse.reshape(b, kh, bq, g).transpose(0, 2, 1, 3)
        return out.reshape(b, bq, n, h).astype(q.dtype), lse.reshape(b, bq, n)

    if nq == 1:
        return query_block(jnp.int32(0))
    outs, lses = jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))  # nq B bq ...
    return _unblock(outs, t, bq), _unblock(lses, t, bq)


def _online_softmax_step(
    m: Float[Array, "*rows"],
    l: Float[Array, "*rows"],
    acc: Float[Array, "*rows H"],
    logits: Float[Array, "*rows bk"],
    vblk: Array,
    by_head: bool | None,
) -> tuple[Array, Array, Array]:
    """One key block of the online softmax (Dao 2023, Alg. 1): rescale the running max,
    sum and output by the new max and add this block's P.V. `by_head` names vblk's layout:
    True [B, K, bk, H], False [B, bk, K, H], None flat [B, bk * K, H]."""
    m_new = jnp.maximum(m, logits.max(-1))
    p = jnp.exp(logits - m_new[..., None])  # hidden: exp(-inf) = 0
    alpha = jnp.exp(m - m_new)
    l = alpha * l + p.sum(-1)
    p = p.astype(vblk.dtype)  # P.V in the input dtype, float32 accumulation (as the reference)
    equation = {True: "bkqs,bksh->bkqh", False: "bkqs,bskh->bkqh", None: "brs,bsh->brh"}[by_head]
    pv = jnp.einsum(equation, p, vblk, preferred_element_type=jnp.float32)
    return m_new, l, alpha[..., None] * acc + pv


def _unblock(x: Float[Array, "nq B bq ..."], t: int, bq: int) -> Float[Array, "B T ..."]:
    """Concatenate query blocks along T, dropping the rows the clamped last block repeats."""
    nq = x.shape[0]
    x = jnp.moveaxis(x, 0, 1)  # B nq bq ...
    head = x[:, : nq - 1].reshape(x.shape[0], (nq - 1) * bq, *x.shape[3:])
    tail = x[:, nq - 1, (nq - 1) * bq - (t - bq):]
    return jnp.concatenate([head, tail], axis=1)
