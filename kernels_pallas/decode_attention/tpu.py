"""Split-K decode attention as a Pallas Mosaic TPU kernel, stream-K balanced.

Flash-Decoding splits the key axis so that a single query still fills the
machine; Lean Attention (Sanovar et al. 2024) goes further with stream-K: the
key blocks of all (row, kv head) tiles are laid end to end and cut into
`num_workers` equal contiguous ranges, so ragged cache lengths cost no idle
workers. Each worker emits one partial (normalised output, log-sum-exp) per
tile piece it touched; the pieces are merged with their log-sum-exp
(associativity of the online softmax). All G query heads of a KV group and
the T (<= 16) new tokens are one (G*T, H) matrix, so each K/V block is read
once per group. Only the key blocks that can hold a visible key (below the
row's length, inside the queries' window) are scheduled; idle steps repeat the
last block index, so Pallas issues no copy for the others (the scalar-prefetched
schedule plays the role of the clamped index_map of splash / ragged paged
attention). K/V in [B, K, S, H] ("BKSH", the dense cache's layout) are read in
place; S need not be a block multiple (the last block is an edge block whose
slots past the length are masked and zeroed in the kernel).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu

from kernels_pallas import online_softmax
from kernels_pallas.decode_attention.reference import decode_attention_reference, decode_positions
from kernels_pallas.decode_attention.tuning import BlockSizes
from kernels_pallas.flash_attention.reference import soft_cap, visible

VALID, FIRST, LAST = 1, 2, 4


@dataclasses.dataclass(frozen=True)
class Config:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    has_mask: bool
    layout: str
    blocks: BlockSizes
    interpret: object


def needed_blocks(
    lengths: jax.Array, qp: jax.Array, kp: jax.Array, *, causal: bool, window: int | None, block_kv: int, num_blocks: int
) -> tuple[jax.Array, jax.Array]:
    """Per row, the first key block and the number of consecutive blocks that can hold a
    visible key: slots below the row's length with a position at or before the latest
    query (causal) and after the earliest query's window start. The rest is never read."""
    s = kp.shape[1]
    slot = jnp.arange(s, dtype=jnp.int32)[None, :]
    live = (slot < lengths[:, None]) & (kp >= 0)
    q_ok = qp >= 0
    if causal:
        q_max = jnp.max(jnp.where(q_ok, qp, -1), axis=1, keepdims=True)
        live &= kp <= q_max
    if window is not None:
        q_min = jnp.min(jnp.where(q_ok, qp, jnp.iinfo(jnp.int32).max), axis=1, keepdims=True)
        live &= kp > q_min - window
    live &= jnp.any(q_ok, axis=1, keepdims=True)
    first = jnp.min(jnp.where(live, slot, s), axis=1)
    last = jnp.max(jnp.where(live, slot, -1), axis=1)
    start = jnp.clip(first // block_kv, 0, num_blocks - 1)
    count = jnp.where(last >= 0, last // block_kv + 1 - start, 0)
    return start.astype(jnp.int32), count.astype(jnp.int32)


def stream_k_schedule(
    block_start: jax.Array, block_count: jax.Array, kv_heads: int, num_blocks: int, workers: int
) -> tuple[jax.Array, ...]:
    """Per grid step (worker p, step u): row, kv head, key block, piece id, flags; piece -> tile.

    Units (b, k, i) for i < block_count[b] (key block block_start[b] + i) are numbered
    in (b, k, i) order; worker p takes units [p*c, (p+1)*c) with c = ceil(total / workers).
    A piece is a maximal run of one worker's units inside one (b, k) tile. Idle steps
    repeat the worker's last block indices, so the pipeline issues no new copy: a block
    past a row's length or outside its window is never fetched.
    """
    b = block_start.shape[0]
    tiles = b * kv_heads
    steps = -(-tiles * num_blocks // workers)  # static upper bound on c
    n_pieces = tiles + 2 * workers  # at most tiles + workers - 1 real pieces; then one sink per worker
    units = jnp.repeat(jnp.clip(block_count, 0, num_blocks), kv_heads)  # per tile
    starts = jnp.repeat(block_start, kv_heads)
    tile_end = jnp.cumsum(units)
    total = tile_end[-1]
    c = jnp.maximum(-(-total // workers), 1)
    p = jnp.arange(workers)[:, None]
    u = jnp.arange(steps)[None, :]
    n_valid = jnp.clip(total - p * c, 0, c)  # P 1
    valid = u < n_valid
    unit = jnp.where(n_valid > 0, p * c + jnp.clip(jnp.minimum(u, n_valid - 1), 0), 0)
    tile = jnp.clip(jnp.searchsorted(tile_end, unit, side="right"), 0, tiles - 1)
    i = unit - (tile_end[tile] - units[tile])
    first = valid & ((i == 0) | (u == 0))
    last = valid & ((u + 1 == n_valid) | (i + 1 == units[tile]))
    piece = jnp.cumsum(first.reshape(-1)).reshape(first.shape) - 1
    last_piece = jnp.take_along_axis(piece, jnp.clip(n_valid - 1, 0), 1)  # P 1
    # Idle steps keep the piece of the worker's last valid step; a worker without work, its own sink.
    piece = jnp.where(valid, piece, jnp.where(n_valid > 0, last_piece, tiles + workers + p))
    flags = valid * VALID + first * FIRST + last * LAST
    piece_tile = jnp.full((n_pieces,), tiles, jnp.int32).at[
        jnp.where(first, piece, n_pieces)
    ].set(tile, mode="drop")
    j = jnp.clip(starts[tile] + i, 0, num_blocks - 1)
    flat = lambda x: x.reshape(-1).astype(jnp.int32)  # noqa: E731
    return (flat(tile // kv_heads), flat(tile % kv_heads), flat(j), flat(piece), flat(flags)), piece_tile


def _kernel(cfg: Config, steps: int, *refs) -> None:  # noqa: ANN002
    tb, tk, tj, tpiece, tflag, lens = refs[:6]
    del tk, tpiece
    if cfg.has_mask:
        qp_ref, kp_ref, mask_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[6:]
    else:
        qp_ref, kp_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[6:]
    w = pl.program_id(0) * steps + pl.program_id(1)
    flag = tflag[w]

    @pl.when((flag & FIRST) != 0)
    def _init() -> None:
        online_softmax.reset(m_ref, l_ref, acc_ref)

    @pl.when((flag & VALID) != 0)
    def _update() -> None:
        q, k, v = q_ref[...], k_ref[...], v_ref[...]
        bk, h = v.shape
        # Slots past the row's length (in its last block, or past the cache end) hold
        # anything, NaN included: mask their logits and zero their values.
        first_slot = tj[w] * bk
        length = lens[tb[w]]
        v = jnp.where(first_slot + jax.lax.broadcasted_iota(jnp.int32, (bk, h), 0) < length, v, 0)
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        logits = jax.lax.dot_general(
            q, k, (((1,), (1,)), ((), ())), precision=precision, preferred_element_type=jnp.float32
        )  # R bk
        logits = soft_cap(logits * cfg.scale, cfg.softcap)
        vis = visible(qp_ref[...], kp_ref[...], None, None, causal=cfg.causal, window=cfg.window)
        vis &= first_slot + jax.lax.broadcasted_iota(jnp.int32, (1, bk), 1) < length
        if cfg.has_mask:
            vis &= mask_ref[...] != 0
        logits = jnp.where(vis, logits, -jnp.inf)
        p, alpha = online_softmax.advance(m_ref, l_ref, logits)
        acc_ref[...] = alpha * acc_ref[...] + jax.lax.dot_general(
            p.astype(v.dtype), v, (((1,), (0,)), ((), ())), precision=precision,
            preferred_element_type=jnp.float32,
        )

    @pl.when((flag & LAST) != 0)
    def _emit() -> None:
        online_softmax.emit(m_ref, l_ref, acc_ref[...], o_ref, lse_ref)


def combine_pieces(
    out: jax.Array, lse: jax.Array, piece_tile: jax.Array, tiles: int
) -> tuple[jax.Array, jax.Array]:
    """Merge partial (out [P, R, H], lse [P, R]) of each tile by log-sum-exp; unused pieces ignored."""
    used = (piece_tile < tiles)[:, None]  # P 1
    lse = jnp.where(used, lse, -jnp.inf)
    top = jax.ops.segment_max(lse, piece_tile, num_segments=tiles)  # tiles R
    top = jnp.where(jnp.isfinite(top), top, 0.0)
    w = jnp.where(used, jnp.exp(lse - top[jnp.minimum(piece_tile, tiles - 1)]), 0.0)  # P R
    den = jax.ops.segment_sum(w, piece_tile, num_segments=tiles)
    num = jax.ops.segment_sum(jnp.where(used[..., None], w[..., None] * out, 0.0), piece_tile, num_segments=tiles)
    empty = den == 0.0
    merged = num / jnp.where(empty, 1.0, den)[..., None]
    return merged, jnp.where(empty, -jnp.inf, top + jnp.log(jnp.where(empty, 1.0, den)))


def _decode_kernel_call(cfg: Config, q, k, v, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    """q [B, K, R, H], k/v [B, K, S, H], qp [B, R, 1], kp [B, 1, S], mask [B, R, S] | None.

    S need not be a multiple of the key block: the last block is partial (edge block)."""
    b, kh, r, h = q.shape
    s = k.shape[2]
    # A cache shorter than the block is one full-extent block (legal for any S on TPU).
    bk, workers = min(cfg.blocks.block_kv, s), cfg.blocks.num_workers
    num_blocks = -(-s // bk)
    start, count = needed_blocks(
        lengths, qp[:, :, 0], kp[:, 0, :], causal=cfg.causal, window=cfg.window, block_kv=bk,
        num_blocks=num_blocks,
    )
    tables, piece_tile = stream_k_schedule(start, count, kh, num_blocks, workers)
    steps = -(-b * kh * num_blocks // workers)
    n_pieces = piece_tile.shape[0]

    def at(fn):  # noqa: ANN001, ANN202
        def index_map(p, u, tb, tk, tj, tpiece, tflag, lens):  # noqa: ANN001, ANN202
            w = p * steps + u
            return fn(tb[w], tk[w], tj[w], tpiece[w])

        return index_map

    in_specs = [
        pl.BlockSpec((None, r, 1), at(lambda b_, k_, j, c: (b_, 0, 0))),
        pl.BlockSpec((None, 1, bk), at(lambda b_, k_, j, c: (b_, 0, j))),
    ]
    if cfg.has_mask:
        in_specs.append(pl.BlockSpec((None, r, bk), at(lambda b_, k_, j, c: (b_, 0, j))))
    in_specs += [
        pl.BlockSpec((None, None, r, h), at(lambda b_, k_, j, c: (b_, k_, 0, 0))),
        pl.BlockSpec((None, None, bk, h), at(lambda b_, k_, j, c: (b_, k_, j, 0))),
        pl.BlockSpec((None, None, bk, h), at(lambda b_, k_, j, c: (b_, k_, j, 0))),
    ]
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=6,
        grid=(workers, steps),
        in_specs=in_specs,
        out_specs=[
            pl.BlockSpec((None, r, h), at(lambda b_, k_, j, c: (c, 0, 0))),
            pl.BlockSpec((None, r, 1), at(lambda b_, k_, j, c: (c, 0, 0))),
        ],
        scratch_shapes=[
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, h), jnp.float32),
        ],
    )
    operands = [qp, kp] + ([mask] if cfg.has_mask else []) + [q, k, v]
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg, steps),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((n_pieces, r, h), jnp.float32),
            jax.ShapeDtypeStruct((n_pieces, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="decode_attention_stream_k",
    )(*tables, lengths, *operands)
    out, lse = combine_pieces(out, lse[..., 0], piece_tile, b * kh)
    return out.reshape(b, kh, r, h), lse.reshape(b, kh, r)


def _layout(cfg: Config, q, k, v, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    """[B, T, N, H] -> kernel layout (rows g*T + t per KV group). K/V in "BKSH" are read
    in place (no transpose, no padding); "BSKH" is transposed (one copy per call)."""
    b, t, n, h = q.shape
    kh = k.shape[1] if cfg.layout == "BKSH" else k.shape[2]
    g = n // kh
    qk = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)
    if cfg.layout == "BSKH":
        k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # B K S H
    qp = jnp.tile(qp, (1, g))[:, :, None]  # B G*T 1
    if mask is not None:
        mask = jnp.tile(mask, (1, g, 1)).astype(jnp.int32)  # B G*T S
    out, lse = _decode_kernel_call(cfg, qk, k, v, lengths, qp, kp[:, None, :], mask)
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)
    lse = lse.reshape(b, kh, g, t).transpose(0, 3, 1, 2).reshape(b, t, n)
    return out.astype(q.dtype), lse


def _reference(cfg: Config, q, k, v, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    if cfg.layout == "BKSH":
        k, v = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return decode_attention_reference(
        q, k, v, lengths=lengths, q_positions=qp, kv_positions=kp, mask=mask,
        causal=cfg.causal, window=cfg.window, softcap=cfg.softcap, scale=cfg.scale, return_lse=True,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _decode(cfg: Config, q, k, v, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    return _layout(cfg, q, k, v, lengths, qp, kp, mask)


def _decode_fwd(cfg: Config, q, k, v, lengths, qp, kp, mask):  # noqa: ANN001, ANN202
    return _layout(cfg, q, k, v, lengths, qp, kp, mask), (q, k, v, lengths, qp, kp, mask)


def _decode_bwd(cfg: Config, res, cotangents):  # noqa: ANN001, ANN202
    """Decode is an inference kernel; its (rare) gradient is the reference's, O(B N T S) memory."""
    q, k, v, lengths, qp, kp, mask = res
    _, vjp = jax.vjp(lambda q_, k_, v_: _reference(cfg, q_, k_, v_, lengths, qp, kp, mask), q, k, v)
    return (*vjp(cotangents), None, None, None, None)


_decode.defvjp(_decode_fwd, _decode_bwd)


def decode_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    lengths: jax.Array | None = None,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    mask: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    kv_layout: str = "BSKH",
    interpret: object = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Decode attention of T <= 16 new queries [B, T, N, H] over a cache [B, S, K, H]
    ("BSKH") or [B, K, S, H] ("BKSH", read in place)."""
    b, t, _, h = q.shape
    s = k.shape[2] if kv_layout == "BKSH" else k.shape[1]
    lengths = jnp.full((b,), s, jnp.int32) if lengths is None else jnp.clip(lengths.astype(jnp.int32), 0, s)
    dq, dk = decode_positions(lengths, t, s)
    cfg = Config(
        causal=causal,
        window=window,
        softcap=softcap,
        scale=float(h**-0.5 if scale is None else scale),
        has_mask=mask is not None,
        layout=kv_layout,
        blocks=(block_sizes or BlockSizes()).fitted(s),
        interpret=interpret,
    )
    qp = dq if q_positions is None else q_positions.astype(jnp.int32)
    kp = dk if kv_positions is None else kv_positions.astype(jnp.int32)
    out, lse = _decode(cfg, q, k, v, lengths, qp, kp, mask)
    return (out, lse) if return_lse else out
