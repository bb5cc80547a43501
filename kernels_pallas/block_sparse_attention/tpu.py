"""Block-sparse attention forward as a Pallas Mosaic TPU kernel (splash-attention style).

Grid (row b, query head n, query block i, list entry j). The key-block lists (index
[B, N, Tb, M], count [B, N, Tb], flattened: 2-D SMEM arrays pad badly) are scalar-prefetched
into SMEM, and the K/V (and key-position) index maps read them: entry j fetches key block
index[b, n, i, j] of KV head n // G. Past the list's end (j >= count) the index map repeats
the last listed block, so the pipeline issues no new copy (the DMA of unlisted blocks is
never made) and the step's compute is skipped with `pl.when`. The online softmax (m, l,
acc) lives in float32 VMEM scratch; the output is normalised at the last entry. Inside a
listed block the usual rule masks by positions (causal, window), so a fully masked query
gives zeros and log-sum-exp -inf. On a real TPU block_q and block_k should be multiples
of 128 (the lane width) unless they span the whole axis; interpret mode takes any size.
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
from kernels_pallas.flash_attention.reference import soft_cap, visible
from kernels_pallas.flash_attention.tpu import NN, NT  # a @ b, a @ b.T


@dataclasses.dataclass(frozen=True)
class Config:
    causal: bool
    window: int | None
    softcap: float | None
    scale: float
    block_q: int
    block_k: int
    heads: int  # N
    query_blocks: int  # Tb
    entries: int  # M
    interpret: object


def _dot(a: jax.Array, b: jax.Array, dims) -> jax.Array:  # noqa: ANN001
    precision = jax.lax.Precision.HIGHEST if a.dtype == jnp.float32 else None
    return jax.lax.dot_general(a, b, dims, precision=precision, preferred_element_type=jnp.float32)


def _flat(cfg: Config, b, n, i):  # noqa: ANN001, ANN202
    """Offset of (b, n, i) in the flattened count array (times M: in the index array)."""
    return (b * cfg.heads + n) * cfg.query_blocks + i


def _entry(cfg: Config, b, n, i, j, index_ref, count_ref):  # noqa: ANN001, ANN202
    """Key block of list entry j, clamped to the last listed one (no new copy past the end)."""
    last = jnp.maximum(count_ref[_flat(cfg, b, n, i)] - 1, 0)
    return index_ref[_flat(cfg, b, n, i) * cfg.entries + jnp.minimum(j, last)]


def _kernel(cfg: Config, index_ref, count_ref, qp_ref, kp_ref, q_ref, k_ref, v_ref,  # noqa: ANN001
            o_ref, lse_ref, m_ref, l_ref, acc_ref) -> None:
    b, n, i, j = (pl.program_id(axis) for axis in range(4))

    @pl.when(j == 0)
    def _init() -> None:
        online_softmax.reset(m_ref, l_ref, acc_ref)

    @pl.when(j < count_ref[_flat(cfg, b, n, i)])
    def _step() -> None:
        v = v_ref[...]
        logits = soft_cap(_dot(q_ref[...], k_ref[...], NT) * cfg.scale, cfg.softcap)  # bq bk
        vis = visible(qp_ref[...], kp_ref[...], None, None, causal=cfg.causal, window=cfg.window)
        logits = jnp.where(vis, logits, -jnp.inf)
        p, alpha = online_softmax.advance(m_ref, l_ref, logits)
        # A key no query of the block sees (padding) may hold NaN: its value row is zeroed.
        acc_ref[...] = alpha * acc_ref[...] + _dot(p.astype(v.dtype), jnp.where(vis.any(axis=0)[:, None], v, 0), NN)

    @pl.when(j == pl.num_programs(3) - 1)
    def _finish() -> None:
        online_softmax.emit(m_ref, l_ref, acc_ref[...], o_ref, lse_ref)


def forward(
    cfg: Config, q: Float[Array, "B N T H"], k: Float[Array, "B K S H"], v: Float[Array, "B K S H"],
    qp: Int[Array, "B T 1"], kp: Int[Array, "B 1 S"], index: Int[Array, " BNTbM"], count: Int[Array, " BNTb"],
) -> tuple[Float[Array, "B N T H"], Float[Array, "B N T 1"]]:
    b, n, t, h = q.shape
    g = n // k.shape[1]
    bq, bk = cfg.block_q, cfg.block_k
    entry = functools.partial(_entry, cfg)
    row = lambda b_, n_, i, j, *_: (b_, n_, i, 0)  # noqa: E731
    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=2,
        grid=(b, n, t // bq, cfg.entries),
        in_specs=[
            pl.BlockSpec((None, bq, 1), lambda b_, n_, i, j, *_: (b_, i, 0)),
            pl.BlockSpec((None, 1, bk), lambda b_, n_, i, j, ix, c: (b_, 0, entry(b_, n_, i, j, ix, c))),
            pl.BlockSpec((None, None, bq, h), row),
            pl.BlockSpec((None, None, bk, h),
                         lambda b_, n_, i, j, ix, c: (b_, jax.lax.div(n_, g), entry(b_, n_, i, j, ix, c), 0)),
            pl.BlockSpec((None, None, bk, h),
                         lambda b_, n_, i, j, ix, c: (b_, jax.lax.div(n_, g), entry(b_, n_, i, j, ix, c), 0)),
        ],
        out_specs=[pl.BlockSpec((None, None, bq, h), row), pl.BlockSpec((None, None, bq, 1), row)],
        scratch_shapes=[pltpu.VMEM((bq, 1), jnp.float32), pltpu.VMEM((bq, 1), jnp.float32),
                        pltpu.VMEM((bq, h), jnp.float32)],
    )
    return pl.pallas_call(
        functools.partial(_kernel, cfg),
        grid_spec=grid_spec,
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, n, t, 1), jnp.float32)],
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "parallel", "arbitrary")),
        interpret=cfg.interpret,
        name="block_sparse_attention_fwd",
    )(index, count, qp, kp, q, k, v)
