"""Paged decode attention as a Pallas Mosaic TPU kernel that reads the page pool in place.

PagedAttention (Kwon et al. 2023) stores the KV cache as a pool of M pages of P
slots [M, P, K, H] and a page table per row; attention gathers the pages while it
reads them instead of materialising a contiguous cache. As in jax's ragged paged
attention, the page table and the row lengths are scalar-prefetched into SMEM and
the K/V index maps look pages up in them.

Grid (row b, kv head k, key block i); a key block is `ppb` consecutive logical
pages. The pool is viewed as [M, P, K*H] (a free reshape) and passed `ppb` times,
once per page of a block: operand j fetches the (P, H) slab of kv head k of page
page_table[b, i*ppb + j], so one grid step keeps `ppb` page copies in flight and
no manual DMA is needed. Only the pages that can hold a visible key (below the
row's length, not wholly before the queries' window: `needed_blocks` at page
granularity) are fetched: outside that range each operand's index is clamped to
the nearest needed page it reads anyway, so Pallas issues no new copy, and the
step's compute is skipped with `pl.when` (an operand with no needed page in the
row, e.g. pages 1.. of a one-page row, still reads one page per tile, masked). All G query heads of a kv group and
the T queries are one (G*T, H) matrix; the online softmax (m, l, acc) lives in
float32 VMEM scratch and the output is normalised at the last key block. Slots of
a fetched page past the row's length (or a clamped duplicate page) are masked and
their values zeroed, so NaN there cannot reach the output.

A (P, H) slab is a legal TPU block only when H is a multiple of 128 lanes (or
K = 1). Otherwise (H = 64 with K > 1, e.g. SmolLM2) the kernel reads whole pages
(P, K*H) with one "kv head" of width K*H and block-diagonal queries: row
(k, g, t) holds q in lanes [k*H, (k+1)*H) and zeros elsewhere, so q.k and p@v
give each row its own head's result in its own lanes (K x the MXU work of a
memory-bound kernel; the bytes read are the same).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jaxtyping import Array, Bool, Float, Int

from kernels_pallas import online_softmax
from kernels_pallas.decode_attention.tpu import needed_blocks
from kernels_pallas.flash_attention.reference import soft_cap, visible

LANES = 128  # TPU lane width: a (P, H) block needs H % LANES == 0 unless it spans K*H
TARGET_SLOTS = 128  # default key block: about one lane width of slots
MAX_PAGES_PER_BLOCK = 16  # operands per K and V


@dataclasses.dataclass(frozen=True)
class Config:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    has_mask: bool
    pages_per_block: int
    num_blocks: int
    interpret: object


def default_pages_per_block(page_size: int, pages_per_row: int) -> int:
    """About TARGET_SLOTS slots per key block, at most MAX_PAGES_PER_BLOCK pages and R."""
    return max(1, min(pages_per_row, MAX_PAGES_PER_BLOCK, TARGET_SLOTS // page_size))


def page_range(
    lengths: Int[Array, " B"], qp: Int[Array, "B T"], kp: Int[Array, "B S"], *, causal: bool,
    window: int | None, page_size: int, num_pages: int,
) -> tuple[Int[Array, " B"], Int[Array, " B"]]:
    """Per row, the first and last logical page that can hold a visible key (last < first:
    none). Pages outside [first, last] are never computed on, and fetched only by an
    operand that has no needed page in the row (one constant page per tile)."""
    first, count = needed_blocks(
        lengths, qp, kp, causal=causal, window=window, block_kv=page_size, num_blocks=num_pages
    )
    return first, first + count - 1


def operand_page(i, j: int, first, last, ppb: int, num_pages: int):  # noqa: ANN001, ANN201
    """Logical page operand j reads at key block i: i*ppb + j, with i clamped to the blocks
    where that page is needed (a constant when it is needed in none), so that stepping
    outside [first, last] repeats an index and Pallas issues no copy. Non-negative
    operands only (lax.div truncates)."""
    lo = jax.lax.div(first + (ppb - 1 - j), ppb)  # first block whose page j is >= first
    hi = jax.lax.div(jnp.maximum(last - j, 0), ppb)  # last block whose page j is <= last
    hi = jnp.where(last >= j, hi, -1)
    i_c = jnp.minimum(jnp.maximum(i, lo), jnp.maximum(hi, lo))
    return jnp.minimum(i_c * ppb + j, num_pages - 1)


def _kernel(cfg: Config, *refs) -> None:  # noqa: ANN002
    ppb = cfg.pages_per_block
    _, lens_ref, first_ref, last_ref = refs[:4]
    refs = refs[4:]
    qp_ref, kp_ref = refs[:2]
    mask_ref = refs[2] if cfg.has_mask else None
    refs = refs[3 if cfg.has_mask else 2 :]
    q_ref, k_refs, v_refs = refs[0], refs[1 : 1 + ppb], refs[1 + ppb : 1 + 2 * ppb]
    o_ref, lse_ref, m_ref, l_ref, acc_ref = refs[1 + 2 * ppb :]
    b, i = pl.program_id(0), pl.program_id(2)
    first, last, length = first_ref[b], last_ref[b], lens_ref[b]

    @pl.when(i == 0)
    def _init() -> None:
        online_softmax.reset(m_ref, l_ref, acc_ref)

    @pl.when(jnp.maximum(i * ppb, first) <= jnp.minimum(i * ppb + ppb - 1, last))  # a needed page
    def _update() -> None:
        q, qp = q_ref[...], qp_ref[...]  # (G*T, H), (G*T, 1)
        precision = jax.lax.Precision.HIGHEST if q.dtype == jnp.float32 else None
        dot = functools.partial(jax.lax.dot_general, precision=precision, preferred_element_type=jnp.float32)
        logits, values = [], []
        for j in range(ppb):
            page = i * ppb + j
            k, v = k_refs[j][...], v_refs[j][...]  # (P, H)
            size = k.shape[0]
            page_live = (page >= first) & (page <= last)  # else the buffer holds a clamped duplicate
            # Slots past the row's length hold anything, NaN included: mask them and zero V.
            row_ok = page_live & (page * size + jax.lax.broadcasted_iota(jnp.int32, v.shape, 0) < length)
            col_ok = page_live & (page * size + jax.lax.broadcasted_iota(jnp.int32, (1, size), 1) < length)
            s = soft_cap(dot(q, k, (((1,), (1,)), ((), ()))) * cfg.scale, cfg.softcap)  # (G*T, P)
            vis = visible(qp, kp_ref[j], None, None, causal=cfg.causal, window=cfg.window) & col_ok
            if mask_ref is not None:
                vis &= mask_ref[j] != 0
            logits.append(jnp.where(vis, s, -jnp.inf))
            values.append(jnp.where(row_ok, v, jnp.zeros_like(v)))
        m_prev = m_ref[...]
        m_new = functools.reduce(jnp.maximum, [jnp.max(s, axis=1, keepdims=True) for s in logits], m_prev)
        m_safe = jnp.where(m_new == -jnp.inf, 0.0, m_new)
        probs = [jnp.exp(s - m_safe) for s in logits]
        alpha = jnp.exp(m_prev - m_safe)
        l_ref[...] = alpha * l_ref[...] + sum(jnp.sum(pr, axis=1, keepdims=True) for pr in probs)
        pv = sum(dot(pr.astype(vv.dtype), vv, (((1,), (0,)), ((), ()))) for pr, vv in zip(probs, values))
        acc_ref[...] = alpha * acc_ref[...] + pv
        m_ref[...] = m_new

    @pl.when(i == cfg.num_blocks - 1)
    def _emit() -> None:
        online_softmax.emit(m_ref, l_ref, acc_ref[...], o_ref, lse_ref)


def _paged_call(
    cfg: Config,
    q: Float[Array, "B K GT H"],
    k_pages: Float[Array, "M P KH"],
    v_pages: Float[Array, "M P KH"],
    page_table: Int[Array, " BRp"],
    lengths: Int[Array, " B"],
    first: Int[Array, " B"],
    last: Int[Array, " B"],
    qp: Int[Array, "B GT 1"],
    kp: Int[Array, "B Rp 1 P"],
    mask: Int[Array, "B Rp GT P"] | None,
) -> tuple[Float[Array, "B K GT H"], Float[Array, "B K GT 1"]]:
    """q: the G*T query rows (g*T + t) of each kv group; the pool viewed as [M, P, K*H];
    page_table flattened [B * Rp] (2-D SMEM arrays pad badly); kp/mask per logical page,
    Rp = num_blocks * ppb. The whole-page path passes K=1 and H = K*H."""
    b, kh, r, h = q.shape
    p = k_pages.shape[1]
    ppb, rp = cfg.pages_per_block, cfg.num_blocks * cfg.pages_per_block

    def block_index(b_, i, first_ref, last_ref):  # noqa: ANN001, ANN202
        """Key block i clamped to the row's needed blocks (no new copy outside them)."""
        first_, last_ = first_ref[b_], last_ref[b_]
        return jnp.minimum(jnp.maximum(i, jax.lax.div(first_, ppb)), jax.lax.div(jnp.maximum(last_, first_), ppb))

    def kv_spec(j: int) -> pl.BlockSpec:
        def index_map(b_, k_, i, pt, lens, first_ref, last_ref):  # noqa: ANN001, ANN202
            page = operand_page(i, j, first_ref[b_], last_ref[b_], ppb, rp)
            return pt[b_ * rp + page], 0, k_

        return pl.BlockSpec((None, p, h), index_map)

    def logical(block: tuple[int | None, ...]) -> pl.BlockSpec:
        return pl.BlockSpec(
            block, lambda b_, k_, i, pt, lens, f, l_: (b_, block_index(b_, i, f, l_), 0, 0)
        )

    def per_tile(last_dim: int) -> pl.BlockSpec:  # one (row, kv head) tile, the same at every key block
        return pl.BlockSpec((None, None, r, last_dim), lambda b_, k_, i, *_: (b_, k_, 0, 0))

    in_specs = [
        pl.BlockSpec((None, r, 1), lambda b_, k_, i, *_: (b_, 0, 0)),
        logical((None, ppb, 1, p)),
    ]
    if cfg.has_mask:
        in_specs.append(logical((None, ppb, r, p)))
    in_specs.append(per_tile(h))
    in_specs += [kv_spec(j) for j in range(ppb)] * 2
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=4,
        grid=(b, kh, cfg.num_blocks),
        in_specs=in_specs,
        out_specs=[per_tile(h), per_tile(1)],
        scratch_shapes=[
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, 1), jnp.float32),
            pltpu.VMEM((r, h), jnp.float32),
        ],
    )
    operands = [qp, kp] + ([mask] if mask is not None else []) + [q] + [k_pages] * ppb + [v_pages] * ppb
    out, lse = pl.pallas_call(
        functools.partial(_kernel, cfg),
        grid_spec=grid_spec,
        out_shape=[
            jax.ShapeDtypeStruct((b, kh, r, h), jnp.float32),
            jax.ShapeDtypeStruct((b, kh, r, 1), jnp.float32),
        ],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="paged_decode_attention",
    )(page_table, lengths, first, last, *operands)
    return out, lse


def paged_decode_attention(
    q: Float[Array, "B T N H"],
    k_pages: Float[Array, "M P K H"],
    v_pages: Float[Array, "M P K H"],
    page_table: Int[Array, "B R"],
    lengths: Int[Array, " B"],
    *,
    q_positions: Int[Array, "B T"] | None = None,
    page_positions: Int[Array, "M P"] | None = None,
    mask: Bool[Array, "B T S"] | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    pages_per_block: int | None = None,
    interpret: object = False,
) -> Float[Array, "B T N H"] | tuple[Float[Array, "B T N H"], Float[Array, "B T N"]]:
    """Decode attention of T <= 16 queries over a paged cache, read in place (unvalidated;
    see `kernels_pallas.paged_attention.paged_decode_attention`)."""
    b, t, n, h = q.shape
    m, p, kh, _ = k_pages.shape
    g, r = n // kh, page_table.shape[1]
    ppb = min(pages_per_block or default_pages_per_block(p, r), r)
    nb = -(-r // ppb)
    rp = nb * ppb
    lengths = jnp.clip(lengths.astype(jnp.int32), 0, r * p)
    qp = lengths[:, None] - t + jnp.arange(t, dtype=jnp.int32)[None] if q_positions is None else q_positions
    qp = qp.astype(jnp.int32)
    # Page metadata (int32 per slot; the K/V pages themselves are never copied).
    pages = jnp.pad(jnp.clip(page_table.astype(jnp.int32), 0, m - 1), ((0, 0), (0, rp - r)))
    if page_positions is None:
        kp = jnp.broadcast_to(jnp.arange(rp * p, dtype=jnp.int32), (b, rp * p))
    else:
        kp = page_positions.astype(jnp.int32)[pages].reshape(b, rp * p)
    kp = jnp.where(jnp.arange(rp * p)[None] < lengths[:, None], kp, -1)
    first, last = page_range(lengths, qp, kp, causal=causal, window=window, page_size=p, num_pages=rp)
    cfg = Config(
        causal=causal,
        window=window,
        softcap=softcap,
        scale=float(h**-0.5 if scale is None else scale),
        has_mask=mask is not None,
        pages_per_block=ppb,
        num_blocks=nb,
        interpret=interpret,
    )
    qk = q.reshape(b, t, kh, g, h).transpose(0, 2, 3, 1, 4).reshape(b, kh, g * t, h)  # rows g*T + t
    fuse = h % LANES != 0 and kh > 1
    rows = kh * g if fuse else g  # query rows per kernel tile, times T
    if fuse:  # block-diagonal queries: row (k, g, t) holds q in lanes [k*H, (k+1)*H), zeros elsewhere
        eye = jnp.eye(kh, dtype=q.dtype)
        qk = (qk[:, :, :, None, :] * eye[None, :, None, :, None]).reshape(b, 1, kh * g * t, kh * h)
    qp_rows = jnp.tile(qp, (1, rows))[:, :, None]  # B rows*T 1
    if mask is not None:
        mask = jnp.pad(mask, ((0, 0), (0, 0), (0, (rp - r) * p))).reshape(b, t, rp, p)
        mask = jnp.tile(mask.transpose(0, 2, 1, 3), (1, 1, rows, 1)).astype(jnp.int32)  # B Rp rows*T P
    out, lse = _paged_call(
        cfg, qk, k_pages.reshape(m, p, kh * h), v_pages.reshape(m, p, kh * h), pages.reshape(-1),
        lengths, first, last, qp_rows, kp.reshape(b, rp, 1, p), mask,
    )
    if fuse:  # row (k, g, t) keeps its own head's lanes
        out = jnp.moveaxis(jnp.diagonal(out.reshape(b, kh, g * t, kh, h), axis1=1, axis2=3), -1, 1)
    out = out.reshape(b, kh, g, t, h).transpose(0, 3, 1, 2, 4).reshape(b, t, n, h).astype(q.dtype)
    lse = lse.reshape(b, kh, g, t).transpose(0, 3, 1, 2).reshape(b, t, n)
    return (out, lse) if return_lse else out
