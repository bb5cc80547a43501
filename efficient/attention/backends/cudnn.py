"""The "cudnn" attention implementation: jax.nn.dot_product_attention on cuDNN.

cuDNN's fused attention serves the common prefill case: float16/bfloat16,
head_dim <= 128 (multiple of 8), default positions (queries are the last T of
the S keys), causal or not, a causal left window. It has no log-sum-exp output,
soft-capping, segment ids, per-row positions or arbitrary masks through this
API; those cases raise NotImplementedError and the dispatcher moves on.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from efficient.attention.dispatcher import register_implementation
from efficient.attention.spec import AttentionSpec

CUDNN_DTYPES = (jnp.dtype(jnp.float16), jnp.dtype(jnp.bfloat16))


def cudnn_attention(
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
) -> jax.Array:
    """Dispatcher adapter; raises NotImplementedError for cases cuDNN does not serve."""
    backend = jax.default_backend()
    if backend not in ("gpu", "cuda"):
        raise NotImplementedError(f"cudnn needs an NVIDIA GPU, backend is {backend}")
    unsupported = {
        "return_lse": return_lse,
        "mask": mask is not None,
        "segment ids": q_segment_ids is not None,
        "q_positions": q_positions is not None,
        "kv_positions": kv_positions is not None,
        "softcap": spec.softcap is not None,
        "window without causal": spec.window is not None and not spec.causal,
    }
    for what, present in unsupported.items():
        if present:
            raise NotImplementedError(f"cudnn: {what} is not supported")
    if q.dtype not in CUDNN_DTYPES:
        raise NotImplementedError(f"cudnn: dtype {q.dtype} is not supported (float16, bfloat16)")
    h = q.shape[-1]
    if h > 128 or h % 8:
        raise NotImplementedError(f"cudnn: head_dim={h} is not supported (<= 128, multiple of 8)")
    t, s = q.shape[1], k.shape[1]
    if spec.causal and t != s:
        # cuDNN's causal mask is top-left aligned; ours puts the queries last (bottom-right).
        raise NotImplementedError(f"cudnn: causal with T={t} != S={s} is not supported")
    return jax.nn.dot_product_attention(
        q,
        k,
        v,
        scale=spec.logit_scale(h),
        is_causal=spec.causal,
        local_window_size=None if spec.window is None else (spec.window - 1, 0),
        implementation="cudnn",
    )


register_implementation("cudnn", cudnn_attention)
