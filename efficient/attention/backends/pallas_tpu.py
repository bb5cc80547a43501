"""The "pallas_tpu" attention implementation: Pallas Mosaic TPU kernels.

Routing: T <= 16 queries without segment ids go to the split-K decode kernel
(which also takes an arbitrary `mask`, e.g. a tree mask); everything else to
the flash kernel (causal/window/soft-cap/segment ids by positions, no `mask`).
The masking rule of `efficient.attention.spec` maps one to one onto the kernels'
position-based masks, padding included. On CPU the kernels run in TPU interpret
mode (slow; for tests and debugging); on other backends this raises.
"""

from __future__ import annotations

import jax
from jax.experimental.pallas import tpu as pltpu

from efficient.attention.dispatcher import register_implementation
from efficient.attention.spec import AttentionSpec
from kernels_pallas.decode_attention import MAX_QUERIES, decode_attention
from kernels_pallas.flash_attention import SUPPORTED_DTYPES, SUPPORTED_HEAD_DIMS, flash_attention


def _interpret() -> object:
    backend = jax.default_backend()
    if backend == "tpu":
        return False
    if backend == "cpu":
        return pltpu.InterpretParams(uninitialized_memory="nan", out_of_bounds_reads="raise")
    raise NotImplementedError(f"pallas_tpu needs a TPU (or CPU interpret mode), backend is {backend}")


def pallas_tpu_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    spec: AttentionSpec,
    q_positions: jax.Array | None,
    kv_positions: jax.Array | None,
    q_segment_ids: jax.Array | None,
    kv_segment_ids: jax.Array | None,
    mask: jax.Array | None,
    return_lse: bool,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Dispatcher adapter; raises NotImplementedError for cases the kernels do not serve."""
    if q.dtype not in SUPPORTED_DTYPES or k.dtype != q.dtype or v.dtype != q.dtype:
        raise NotImplementedError(f"pallas_tpu: dtypes q={q.dtype} k={k.dtype} v={v.dtype} (need float32/bfloat16, equal)")
    if q.shape[-1] not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"pallas_tpu: head_dim={q.shape[-1]} (supported {SUPPORTED_HEAD_DIMS})")
    interpret = _interpret()
    common = dict(
        q_positions=q_positions,
        kv_positions=kv_positions,
        causal=spec.causal,
        window=spec.window,
        softcap=spec.softcap,
        scale=spec.scale,
        return_lse=return_lse,
        interpret=interpret,
    )
    t = q.shape[1]
    if t <= MAX_QUERIES and q_segment_ids is None:
        return decode_attention(q, k, v, mask=mask, **common)
    if mask is not None:
        raise NotImplementedError(f"pallas_tpu: an arbitrary mask is served for T <= {MAX_QUERIES}, got T={t}")
    return flash_attention(
        q, k, v, q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids, **common
    )


register_implementation("pallas_tpu", pallas_tpu_attention)
