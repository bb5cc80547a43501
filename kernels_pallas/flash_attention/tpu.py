"""Flash attention forward and backward as Pallas Mosaic TPU kernels.

FlashAttention-2 (Dao 2023): the forward pass streams key blocks past a
resident query block with an online softmax (running max m, sum l, float32
accumulator) and saves the log-sum-exp; the backward pass recomputes the
probabilities from it, one kernel for dK/dV (looping over the query heads of
the KV group and the query blocks, so repeated K/V are never materialised,
GQA/MQA) and one for dQ. Masking is by positions (negative = padding), causal,
left sliding window and segment ids (packed prompts, Prepacking), so padding
T and S up to block multiples with position -1 is exact. A tile that no query
can see is skipped; a tile that every query sees skips the mask arithmetic.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Float, Int

from kernels_pallas import online_softmax
from kernels_pallas.flash_attention.reference import default_positions, soft_cap, visible
from kernels_pallas.flash_attention.tuning import BlockSizes, default_block_sizes, round_up

NT = (((1,), (1,)), ((), ()))  # a @ b.T
TN = (((0,), (0,)), ((), ()))  # a.T @ b
NN = (((1,), (0,)), ((), ()))  # a @ b


@dataclasses.dataclass(frozen=True)
class Config:
    """Static switches of one call (hashable: a custom_vjp non-diff argument)."""

    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    segments: bool
    blocks: BlockSizes
    interpret: object


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:  # noqa: ANN001
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _tile_class(cfg: Config, qp, kp, qs, ks) -> tuple[jax.Array, jax.Array]:  # noqa: ANN001
    """(some query may see some key, every query sees every key) from block bounds."""
    q_lo, q_hi, k_lo, k_hi = jnp.min(qp), jnp.max(qp), jnp.min(kp), jnp.max(kp)
    some = (q_hi >= 0) & (k_hi >= 0)
    every = (q_lo >= 0) & (k_lo >= 0)
    if cfg.causal:
        some &= k_lo <= q_hi
        every &= k_hi <= q_lo
    if cfg.window is not None:
        some &= q_lo - k_hi < cfg.window
        every &= q_hi - k_lo < cfg.window
    if cfg.segments:
        qs_lo, qs_hi, ks_lo, ks_hi = jnp.min(qs), jnp.max(qs), jnp.min(ks), jnp.max(ks)
        some &= (qs_lo <= ks_hi) & (ks_lo <= qs_hi)
        every &= (qs_lo == qs_hi) & (ks_lo == ks_hi) & (qs_lo == ks_lo)
    return some, every


def _logits(cfg: Config, q, k, qp, kp, qs, ks, masked: bool):  # noqa: ANN001, ANN202
    """Scaled, capped logits (bq, bk), the raw ones (for the cap's derivative), the mask."""
    raw = _dot(q, k, NT) * cfg.scale
    logits = soft_cap(raw, cfg.softcap)
    vis = None
    if masked:
        vis = visible(qp, kp, qs, ks, causal=cfg.causal, window=cfg.window)
        logits = jnp.where(vis, logits, -jnp.inf)
    return raw, logits, vis


def _split_refs(cfg: Config, refs):  # noqa: ANN001, ANN202
    """Positions and (optional) segment-id refs at the head of the operand list."""
    if cfg.segments:
        return refs[0][...], refs[1][...], refs[2][...], refs[3][...], refs[4:]
    return refs[0][...], refs[1][...], None, None, refs[2:]


def _both_paths(cfg: Config, qp, kp, qs, ks, body) -> None:  # noqa: ANN001
    some, every = _tile_class(cfg, qp, kp, qs, ks)
    pl.when(every)(functools.partial(body, False))
    pl.when(some & jnp.logical_not(every))(functools.partial(body, True))


def _fwd_kernel(cfg: Config, *refs) -> None:  # noqa: ANN002
    qp, kp, qs, ks, refs = _split_refs(cfg, refs)
    q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init() -> None:
        online_softmax.reset(m_ref, l_ref, acc_ref)

    def body(masked: bool) -> None:
        v = v_ref[...]
        _, logits, _ = _logits(cfg, q_ref[...], k_ref[...], qp, kp, qs, ks, masked)
        p, alpha = online_softmax.advance(m_ref, l_ref, logits)
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), v, NN)

    _both_paths(cfg, qp, kp, qs, ks, body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish() -> None:
        online_softmax.emit(m_ref, l_ref, acc_ref[...], o_ref, lse_ref)


def _probs_and_dlogits(cfg, q, k, v, do, lse, delta, qp, kp, qs, ks, masked):  # noqa: ANN001, ANN202
    """P (bq, bk) and dL/d(raw logits) of one tile, recomputed from the saved lse."""
    raw, logits, vis = _logits(cfg, q, k, qp, kp, qs, ks, masked)
    p = jnp.exp(logits - jnp.where(lse == -jnp.inf, 0.0, lse))
    if vis is not None:
        p = jnp.where(vis, p, 0.0)
    dp = _dot(do, v, NT)
    ds = p * (dp - delta)
    if cfg.softcap is not None:
        t = jnp.tanh(raw / cfg.softcap)
        ds = ds * (1.0 - t * t)
    return p, ds


def _dq_kernel(cfg: Config, *refs) -> None:  # noqa: ANN002
    qp, kp, qs, ks, refs = _split_refs(cfg, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, acc_ref = refs
    j = pl.program_id(3)

    @pl.when(j == 0)
    def _init() -> None:
        acc_ref[...] = jnp.zeros_like(acc_ref)

    def body(masked: bool) -> None:
        k = k_ref[...]
        _, ds = _probs_and_dlogits(
            cfg, q_ref[...], k, v_ref[...], do_ref[...], lse_ref[...], delta_ref[...],
            qp, kp, qs, ks, masked,
        )
        acc_ref[...] += _dot(ds.astype(k.dtype), k, NN) * cfg.scale

    _both_paths(cfg, qp, kp, qs, ks, body)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish() -> None:
        dq_ref[...] = acc_ref[...].astype(dq_ref.dtype)


def _dkv_kernel(cfg: Config, *refs) -> None:  # noqa: ANN002
    qp, kp, qs, ks, refs = _split_refs(cfg, refs)
    q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, dk_acc, dv_acc = refs
    g, i = pl.program_id(3), pl.program_id(4)

    @pl.when((g == 0) & (i == 0))
    def _init() -> None:
        dk_acc[...] = jnp.zeros_like(dk_acc)
        dv_acc[...] = jnp.zeros_like(dv_acc)

    def body(masked: bool) -> None:
        q, do = q_ref[...], do_ref[...]
        p, ds = _probs_and_dlogits(
            cfg, q, k_ref[...], v_ref[...], do, lse_ref[...], delta_ref[...],
            qp, kp, qs, ks, masked,
        )
        dv_acc[...] += _dot(p.astype(do.dtype), do, TN)
        dk_acc[...] += _dot(ds.astype(q.dtype), q, TN) * cfg.scale

    _both_paths(cfg, qp, kp, qs, ks, body)

    @pl.when((g == pl.num_programs(3) - 1) & (i == pl.num_programs(4) - 1))
    def _finish() -> None:
        dk_ref[...] = dk_acc[...].astype(dk_ref.dtype)
        dv_ref[...] = dv_acc[...].astype(dv_ref.dtype)


def _mask_specs(cfg: Config, bq: int, bk: int, q_idx, kv_idx) -> list[pl.BlockSpec]:  # noqa: ANN001
    """Positions (and segment ids): queries as columns [B, T, 1], keys as rows [B, 1, S]."""
    specs = [pl.BlockSpec((None, bq, 1), q_idx), pl.BlockSpec((None, 1, bk), kv_idx)]
    return specs * 2 if cfg.segments else specs


def _forward(cfg: Config, q, k, v, qp, kp, qs, ks):  # noqa: ANN001, ANN202
    b, n, t, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = cfg.blocks.block_q, cfg.blocks.block_kv
    q_idx = lambda b_, n_, i, j: (b_, i, 0)  # noqa: E731
    kv_idx = lambda b_, n_, i, j: (b_, 0, j)  # noqa: E731
    in_specs = _mask_specs(cfg, bq, bk, q_idx, kv_idx) + [
        pl.BlockSpec((None, None, bq, h), lambda b_, n_, i, j: (b_, n_, i, 0)),
        pl.BlockSpec((None, None, bk, h), lambda b_, n_, i, j: (b_, jax.lax.div(n_, g), j, 0)),
        pl.BlockSpec((None, None, bk, h), lambda b_, n_, i, j: (b_, jax.lax.div(n_, g), j, 0)),
    ]
    out_idx = lambda b_, n_, i, j: (b_, n_, i, 0)  # noqa: E731
    masks = [qp, kp, qs, ks] if cfg.segments else [qp, kp]
    return pl.pallas_call(
        functools.partial(_fwd_kernel, cfg),
        grid=(b, n, t // bq, s // bk),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, None, bq, h), out_idx),
            pl.BlockSpec((None, None, bq, 1), out_idx),
        ],
        out_shape=[
            jax.ShapeDtypeStruct(q.shape, q.dtype),
            jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32),
        ],
        scratch_shapes=[
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, 1), jnp.float32),
            pltpu.VMEM((bq, h), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=cfg.interpret,
        name="flash_attention_fwd",
    )(*masks, q, k, v)


def _backward(cfg: Config, q, k, v, qp, kp, qs, ks, out, lse, do, dlse):  # noqa: ANN001, ANN202
    b, n, t, h = q.shape
    kh, s = k.shape[1], k.shape[2]
    g = n // kh
    bq, bk = cfg.blocks.block_q_bwd, cfg.blocks.block_kv_bwd
    # delta = rowsum(dO * O) - dlse: the lse output's cotangent enters as -dlse (ds = P (dP - delta)).
    delta = jnp.sum(do.astype(jnp.float32) * out.astype(jnp.float32), -1, keepdims=True) - dlse
    masks = [qp, kp, qs, ks] if cfg.segments else [qp, kp]
    interpret = cfg.interpret

    # dQ: grid (B, N, T/bq, S/bk), keys innermost.
    row = lambda b_, n_, i, j: (b_, n_, i, 0)  # noqa: E731
    col = lambda b_, n_, i, j: (b_, jax.lax.div(n_, g), j, 0)  # noqa: E731
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, cfg),
        grid=(b, n, t // bq, s // bk),
        in_specs=_mask_specs(cfg, bq, bk, lambda b_, n_, i, j: (b_, i, 0), lambda b_, n_, i, j: (b_, 0, j))
        + [
            pl.BlockSpec((None, None, bq, h), row),
            pl.BlockSpec((None, None, bk, h), col),
            pl.BlockSpec((None, None, bk, h), col),
            pl.BlockSpec((None, None, bq, h), row),
            pl.BlockSpec((None, None, bq, 1), row),
            pl.BlockSpec((None, None, bq, 1), row),
        ],
        out_specs=pl.BlockSpec((None, None, bq, h), row),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        scratch_shapes=[pltpu.VMEM((bq, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")
        ),
        interpret=interpret,
        name="flash_attention_dq",
    )(*masks, q, k, v, do, lse, delta)

    # dK, dV: grid (B, K, S/bk, G, T/bq); the G query heads of the group and the query blocks are reduced.
    qrow = lambda b_, k_, j, g_, i: (b_, k_ * g + g_, i, 0)  # noqa: E731
    kcol = lambda b_, k_, j, g_, i: (b_, k_, j, 0)  # noqa: E731
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, cfg),
        grid=(b, kh, s // bk, g, t // bq),
        in_specs=_mask_specs(
            cfg, bq, bk, lambda b_, k_, j, g_, i: (b_, i, 0), lambda b_, k_, j, g_, i: (b_, 0, j)
        )
        + [
            pl.BlockSpec((None, None, bq, h), qrow),
            pl.BlockSpec((None, None, bk, h), kcol),
            pl.BlockSpec((None, None, bk, h), kcol),
            pl.BlockSpec((None, None, bq, h), qrow),
            pl.BlockSpec((None, None, bq, 1), qrow),
            pl.BlockSpec((None, None, bq, 1), qrow),
        ],
        out_specs=[pl.BlockSpec((None, None, bk, h), kcol)] * 2,
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        scratch_shapes=[pltpu.VMEM((bk, h), jnp.float32), pltpu.VMEM((bk, h), jnp.float32)],
        compiler_params=pltpu.CompilerParams(
            dimension_semantics=("parallel", "parallel", "parallel", "arbitrary", "arbitrary")
        ),
        interpret=interpret,
        name="flash_attention_dkv",
    )(*masks, q, k, v, do, lse, delta)
    return dq, dk, dv


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _flash(cfg: Config, q, k, v, qp, kp, qs, ks):  # noqa: ANN001, ANN202
    return _forward(cfg, q, k, v, qp, kp, qs, ks)


def _flash_fwd(cfg: Config, q, k, v, qp, kp, qs, ks):  # noqa: ANN001, ANN202
    out, lse = _forward(cfg, q, k, v, qp, kp, qs, ks)
    return (out, lse), (q, k, v, qp, kp, qs, ks, out, lse)


def _flash_bwd(cfg: Config, res, cotangents):  # noqa: ANN001, ANN202
    q, k, v, qp, kp, qs, ks, out, lse = res
    do, dlse = cotangents
    dq, dk, dv = _backward(cfg, q, k, v, qp, kp, qs, ks, out, lse, do.astype(q.dtype), dlse)
    return dq, dk, dv, None, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def _pad_to(x: jax.Array, axis: int, size: int, value: float | int) -> jax.Array:
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, pad, constant_values=value)


def flash_attention(
    q: Float[Array, "B T N H"],
    k: Float[Array, "B S K H"],
    v: Float[Array, "B S K H"],
    *,
    q_positions: Int[Array, "B T"] | None = None,
    kv_positions: Int[Array, "B S"] | None = None,
    q_segment_ids: Int[Array, "B T"] | None = None,
    kv_segment_ids: Int[Array, "B S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: object = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Flash attention (differentiable in q, k, v); inputs are assumed validated."""
    b, t, n, h = q.shape
    s = k.shape[1]
    blocks = (block_sizes or default_block_sizes(t, s, h)).fitted(t, s)
    tp = round_up(t, max(blocks.block_q, blocks.block_q_bwd))
    sp = round_up(s, max(blocks.block_kv, blocks.block_kv_bwd))
    if tp % blocks.block_q or tp % blocks.block_q_bwd or sp % blocks.block_kv or sp % blocks.block_kv_bwd:
        raise ValueError(f"forward and backward block sizes must divide each other, got {blocks}")
    dq_pos, dkv_pos = default_positions(b, t, s)
    qp = dq_pos if q_positions is None else q_positions.astype(jnp.int32)
    kp = dkv_pos if kv_positions is None else kv_positions.astype(jnp.int32)
    segments = q_segment_ids is not None
    # Padding: position -1 hides padded keys and queries exactly (zeros out, lse -inf).
    qp = _pad_to(qp, 1, tp, -1)[:, :, None]  # B Tp 1
    kp = _pad_to(kp, 1, sp, -1)[:, None, :]  # B 1 Sp
    qs = _pad_to(q_segment_ids.astype(jnp.int32), 1, tp, 0)[:, :, None] if segments else None
    ks = _pad_to(kv_segment_ids.astype(jnp.int32), 1, sp, 0)[:, None, :] if segments else None
    qt = _pad_to(q, 1, tp, 0).transpose(0, 2, 1, 3)  # B N Tp H
    kt = _pad_to(k, 1, sp, 0).transpose(0, 2, 1, 3)  # B K Sp H
    vt = _pad_to(v, 1, sp, 0).transpose(0, 2, 1, 3)  # B K Sp H
    cfg = Config(
        causal=causal,
        window=window,
        softcap=softcap,
        scale=float(h**-0.5 if scale is None else scale),
        segments=segments,
        blocks=blocks,
        interpret=interpret,
    )
    out, lse = _flash(cfg, qt, kt, vt, qp, kp, qs, ks)
    out = out.transpose(0, 2, 1, 3)[:, :t]  # B T N H
    if not return_lse:
        return out
    return out, lse[..., 0].transpose(0, 2, 1)[:, :t]  # B T N
