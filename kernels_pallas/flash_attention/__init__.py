"""Flash attention for prefill and training (FlashAttention-2, Dao 2023).

`flash_attention(q[B,T,N,H], k[B,S,K,H], v[B,S,K,H], *, q_positions, kv_positions,
q_segment_ids, kv_segment_ids, causal, window, softcap, scale, return_lse,
block_sizes, interpret)`: jitted, validated, differentiable in q, k, v.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from kernels_pallas.flash_attention import tpu
from kernels_pallas.flash_attention.reference import flash_attention_reference
from kernels_pallas.flash_attention.tuning import BlockSizes, default_block_sizes

SUPPORTED_HEAD_DIMS = (64, 128, 256)
SUPPORTED_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def _check_ids(name: str, x: jax.Array | None, shape: tuple[int, ...]) -> None:
    if x is None:
        return
    if tuple(x.shape) != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not jnp.issubdtype(x.dtype, jnp.integer):
        raise TypeError(f"{name} must be an integer dtype, got {x.dtype}")


def validate(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    window: int | None,
    softcap: float | None,
    scale: float | None,
    block_sizes: object,
    block_sizes_type: type,
    ids: dict[str, tuple[jax.Array | None, tuple[int, ...]]],
) -> None:
    """Shared input checks of the attention kernels; errors name the argument and value."""
    for name, x in (("q", q), ("k", k), ("v", v)):
        if x.ndim != 4:
            raise ValueError(f"{name} must have rank 4 [B, T|S, N|K, H], got shape {x.shape}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise NotImplementedError(f"{name}.dtype={x.dtype} is not supported (float32, bfloat16)")
    if not q.dtype == k.dtype == v.dtype:
        raise ValueError(f"q, k, v dtypes must match, got {q.dtype}, {k.dtype}, {v.dtype}")
    b, _, n, h = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[3] != h:
        raise ValueError(f"k {k.shape} and v {v.shape} must be [B={b}, S, K, H={h}]")
    if h not in SUPPORTED_HEAD_DIMS:
        raise NotImplementedError(f"head_dim={h} is not supported (supported: {SUPPORTED_HEAD_DIMS})")
    if n % k.shape[2]:
        raise ValueError(f"query heads N={n} must be a multiple of kv heads K={k.shape[2]}")
    if window is not None and (isinstance(window, bool) or not isinstance(window, int) or window < 1):
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    if softcap is not None and not softcap > 0:
        raise ValueError(f"softcap must be > 0 or None, got {softcap!r}")
    if scale is not None and not scale > 0:
        raise ValueError(f"scale must be > 0 or None, got {scale!r}")
    if block_sizes is not None and not isinstance(block_sizes, block_sizes_type):
        raise TypeError(f"block_sizes must be a {block_sizes_type.__name__} or None, got {block_sizes!r}")
    for name, (x, shape) in ids.items():
        _check_ids(name, x, shape)


_STATIC = ("causal", "window", "softcap", "scale", "return_lse", "block_sizes", "interpret")


@functools.partial(jax.jit, static_argnames=_STATIC)
def flash_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    q_positions: jax.Array | None = None,
    kv_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    causal: bool = True,
    window: int | None = None,
    softcap: float | None = None,
    scale: float | None = None,
    return_lse: bool = False,
    block_sizes: BlockSizes | None = None,
    interpret: object = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    """Flash attention on TPU (or interpreted); see `tpu.flash_attention`."""
    b, t = q.shape[:2]
    s = k.shape[1]
    if (q_segment_ids is None) != (kv_segment_ids is None):
        raise ValueError("q_segment_ids and kv_segment_ids must be given together")
    validate(
        q, k, v, window=window, softcap=softcap, scale=scale,
        block_sizes=block_sizes, block_sizes_type=BlockSizes,
        ids={
            "q_positions": (q_positions, (b, t)),
            "kv_positions": (kv_positions, (b, s)),
            "q_segment_ids": (q_segment_ids, (b, t)),
            "kv_segment_ids": (kv_segment_ids, (b, s)),
        },
    )
    return tpu.flash_attention(
        q, k, v,
        q_positions=q_positions, kv_positions=kv_positions,
        q_segment_ids=q_segment_ids, kv_segment_ids=kv_segment_ids,
        causal=causal, window=window, softcap=softcap, scale=scale, return_lse=return_lse,
        block_sizes=block_sizes, interpret=interpret,
    )


__all__ = [
    "SUPPORTED_DTYPES",
    "SUPPORTED_HEAD_DIMS",
    "BlockSizes",
    "default_block_sizes",
    "flash_attention",
    "flash_attention_reference",
    "validate",
]
