"""Blockwise XLA attention with an online softmax (FlashAttention-2, Dao 2023).

Same semantics as `attention_reference` (masking by positions, -1 = empty; a
fully masked query row gives zeros and lse -inf), but the [B, K, G, T, S]
logits are never materialised: queries are cut into blocks of `block_q`, keys
into blocks of `block_k`, and each query block keeps a running row max `m`, sum
`l` and output accumulator in float32 (Milakov & Gimelshein 2018; Dao 2023,
Alg. 1). Matmuls run in the input dtype with float32 accumulation; GQA groups
the N query heads as [K, G] so K/V are never repeated. Peak intermediate per
step is [B, K, block_q * G, block_k].

Work that cannot contribute is skipped at run time: from the positions (and
`lengths`, when given) we compute per key block its min/max valid position and
per query block its min/max query position, decide which (query block, key
block) pairs can have a visible key (causal, window, empty slots), move the
needed key blocks to the front (stable argsort) and run a `lax.while_loop`
whose trip count is their number. Causal prefill thus does ~half the blocks,
and decode into a cache of capacity S holding L tokens reads ~L/block_k blocks.

Formulation (measured on a 2-core AMD EPYC, XLA:CPU, SmolLM2 shapes; see
experiments/bench_blockwise.py): `lax.map` over query blocks with a compacted
`while_loop` over key blocks. It beat `fori_loop` over all key blocks with a
`lax.cond` skip (the cond's per-iteration operand copies cost more than the
skipped work saved at S <= 8k), and decode uses the same loop with a single
query block (T <= block_q) and larger key blocks. Not reverse-differentiable
(the while_loop has a data-dependent trip count); use "xla" for gradients.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jaxtyping import Array, Bool, Float, Int

from efficient.attention.spec import AttentionSpec, default_positions, validate_inputs

# Defaults measured on XLA:CPU (experiments/bench_blockwise.py).
DEFAULT_BLOCK_Q = 256
DEFAULT_BLOCK_K = 256
DECODE_BLOCK_K = 1024  # T <= DECODE_MAX_T: one query block, bigger key blocks
DECODE_MAX_T = 16
# Below this many logits per (batch, kv head) the materialised "xla" path wins (measured).
BLOCKWISE_MIN_LOGITS = 512 * 512

_NEG = -1e30  # initial running max: finite, so exp(m_old - m_new) never sees inf - inf


def prefers_blockwise(t: int, s: int) -> bool:
    """Whether `attention_blockwise` beats the materialised "xla" path on XLA:CPU
    for T queries and S keys (measured threshold; decode is never slower)."""
    return t <= DECODE_MAX_T and s >= 2 * DECODE_BLOCK_K or t * s >= BLOCKWISE_MIN_LOGITS


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
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Exact attention, computed blockwise with an online softmax (module docstring).

    lengths: optional int32[B]; slots >= lengths[b] are empty for every query of
        row b: they are masked, never read into the result (even NaN there is
        harmless) and key blocks past max(lengths) are skipped.
    block_q, block_k: block sizes (clipped to T and S); None picks measured defaults.
    Returns output in q.dtype and, if `return_lse`, the float32 log-sum-exp [B, T, N].
    """
    validate_inputs(q, k, v, q_positions, kv_positions, mask, q_segment_ids, kv_segment_ids)
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    _check_block("block_q", block_q)
    _check_block("block_k", block_k)
    b, t, n, h = q.shape
    s, kh = k.shape[1], k.shape[2]
    g = n // kh
    if lengths is not None:
        if tuple(lengths.shape) != (b,):
            raise ValueError(f"lengths must have shape ({b},), got {tuple(lengths.shape)}")
        if not jnp.issubdtype(lengths.dtype, jnp.integer):
            raise TypeError(f"lengths must be an integer dtype, got {lengths.dtype}")
    if q_positions is None or kv_positions is None:
        dq, dk = default_positions(b, t, s)
        q_positions = dq if q_positions is None else q_positions
        kv_positions = dk if kv_positions is None else kv_positions
    q_positions = q_positions.astype(jnp.int32)
    kv_positions = kv_positions.astype(jnp.int32)
    decode = t <= DECODE_MAX_T
    bq = min(block_q or (t if decode else DEFAULT_BLOCK_Q), t)
    bk = min(block_k or (DECODE_BLOCK_K if decode else DEFAULT_BLOCK_K), s)
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
    order = jnp.argsort(~need, axis=1, stable=True).astype(jnp.int32)  # needed blocks first
    count = need.sum(1, dtype=jnp.int32)
    scale = spec.logit_scale(h)
    sanitize = None if lengths is None else (k_starts + bk > lengths.min())  # nk: block reads past a length

    def query_block(qi: Int[Array, ""]) -> tuple[Array, Array]:
        q0 = q_starts[qi]
        qblk = jax.lax.dynamic_slice_in_dim(q, q0, bq, axis=1).reshape(b, bq, kh, g, h)
        qblk = qblk.transpose(0, 2, 1, 3, 4).reshape(b, kh, bq * g, h)  # rows (t, g)
        qp = qpos[:, qi]  # B bq
        qseg = None if q_segment_ids is None else jax.lax.dynamic_slice_in_dim(q_segment_ids, q0, bq, 1)

        def body(i: Int[Array, ""], carry: tuple) -> tuple:
            m, l, acc = carry
            kb = order[qi, i]
            k0 = k_starts[kb]
            kblk = jax.lax.dynamic_slice_in_dim(k, k0, bk, axis=1)  # B bk K H
            vblk = jax.lax.dynamic_slice_in_dim(v, k0, bk, axis=1)
            kp = kpos[:, kb]  # B bk
            vis = (qp[:, :, None] >= 0) & (kp[:, None, :] >= 0)  # B bq bk
            if spec.causal:
                vis &= kp[:, None, :] <= qp[:, :, None]
            if spec.window is not None:
                vis &= qp[:, :, None] - kp[:, None, :] < spec.window
            if qseg is not None:
                kseg = jax.lax.dynamic_slice_in_dim(kv_segment_ids, k0, bk, 1)
                vis &= qseg[:, :, None] == kseg[:, None, :]
            if mask is not None:
                vis &= jax.lax.dynamic_slice(mask, (0, q0, k0), (b, bq, bk))
            if sanitize is not None:  # zero V slots past lengths (they may hold NaN)
                vblk = jax.lax.cond(
                    sanitize[kb], lambda x: jnp.where((kp >= 0)[:, :, None, None], x, 0), lambda x: x, vblk
                )
            logits = jnp.einsum("bkqh,bskh->bkqs", qblk, kblk, preferred_element_type=jnp.float32)
            logits = logits * scale
            if spec.softcap is not None:
                logits = spec.softcap * jnp.tanh(logits / spec.softcap)
            vis = jnp.broadcast_to(vis[:, None, :, None, :], (b, 1, bq, g, bk)).reshape(b, 1, bq * g, bk)
            logits = jnp.where(vis, logits, -jnp.inf)
            m_new = jnp.maximum(m, logits.max(-1))
            p = jnp.exp(logits - m_new[..., None])  # masked: exp(-inf) = 0
            alpha = jnp.exp(m - m_new)
            l = alpha * l + p.sum(-1)
            pv = jnp.einsum("bkqs,bskh->bkqh", p.astype(v.dtype), vblk, preferred_element_type=jnp.float32)
            return m_new, l, alpha[..., None] * acc + pv

        init = (
            jnp.full((b, kh, bq * g), _NEG, jnp.float32),
            jnp.zeros((b, kh, bq * g), jnp.float32),
            jnp.zeros((b, kh, bq * g, h), jnp.float32),
        )
        # Static trip count (reverse-differentiable scan); the compacted `order` puts the
        # count[qi] needed key blocks first and the cond skips the rest at run time.
        m, l, acc = jax.lax.fori_loop(
            0, nk, lambda i, c: jax.lax.cond(i < count[qi], body, lambda i, c: c, i, c), init
        )
        out = acc / jnp.where(l == 0, 1.0, l)[..., None]
        out = out.reshape(b, kh, bq, g, h).transpose(0, 2, 1, 3, 4).reshape(b, bq, n, h).astype(q.dtype)
        lse = jnp.where(l > 0, m + jnp.log(jnp.where(l > 0, l, 1.0)), -jnp.inf)
        lse = lse.reshape(b, kh, bq, g).transpose(0, 2, 1, 3).reshape(b, bq, n)
        return out, lse

    if nq == 1:
        out, lse = query_block(jnp.int32(0))
    else:
        outs, lses = jax.lax.map(query_block, jnp.arange(nq, dtype=jnp.int32))  # nq B bq ...
        out, lse = _unblock(outs, t, bq), _unblock(lses, t, bq)
    return (out, lse) if return_lse else out


def _unblock(x: Float[Array, "nq B bq ..."], t: int, bq: int) -> Float[Array, "B T ..."]:
    """Concatenate query blocks along T, dropping the rows the clamped last block repeats."""
    nq = x.shape[0]
    x = jnp.moveaxis(x, 0, 1)  # B nq bq ...
    head = x[:, : nq - 1].reshape(x.shape[0], (nq - 1) * bq, *x.shape[3:])
    tail = x[:, nq - 1, (nq - 1) * bq - (t - bq):]
    return jnp.concatenate([head, tail], axis=1)
