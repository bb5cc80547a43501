"""What each attention implementation serves: one table, read by the dispatcher and the tests.

`unsupported(name, q, view, spec, ...)` is a pure, trace-time check on static
facts (view type and layout, dtypes, shapes, which optional inputs are given,
the spec): it returns None when `name` serves the case, else the reason. The
dispatcher picks the first candidate it returns None for and then calls it; an
error raised inside an implementation is a bug and propagates.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from efficient.attention.spec import AttentionSpec, KeyStats
from efficient.attention.views import LAYOUTS, VIEW_TYPES, DenseView, KVView, PagedView, QuantizedView
from kernels_pallas.decode_attention import MAX_QUERIES
from kernels_pallas.flash_attention import SUPPORTED_HEAD_DIMS

F32, BF16, F16 = jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16)


@dataclasses.dataclass(frozen=True)
class Capabilities:
    """The cases an implementation serves (None in a tuple field: any)."""

    views: tuple[type, ...] = VIEW_TYPES
    layouts: tuple[str, ...] = LAYOUTS  # of a DenseView
    backends: tuple[str, ...] | None = None  # jax.default_backend() values
    dtypes: tuple[jnp.dtype, ...] | None = None  # of q, and of k/v when `same_dtype`
    same_dtype: bool = False  # q, k and v must share the dtype
    head_dims: tuple[int, ...] | None = None
    window: bool = True
    window_needs_causal: bool = False
    softcap: bool = True
    segments: bool = True
    positions: bool = True  # q_positions or view positions
    lengths: bool = True  # view.lengths
    lse: bool = True
    key_stats: bool = False
    mask_max_t: int | None = None  # an arbitrary mask for T <= this (None: any T; 0: never)
    mask_with_segments: bool = True
    causal_needs_t_eq_s: bool = False
    max_t: int | None = None  # the most queries per call (None: any)
    corrections: bool = True  # a QuantizedView's GEAR low-rank/outlier corrections or exact sinks
    per_head_positions: bool = False  # a DenseView with positions [B, K, S] (an evicting cache's)


CAPABILITIES: dict[str, Capabilities] = {
    "xla": Capabilities(key_stats=True, per_head_positions=True),
    "reference": Capabilities(key_stats=True, per_head_positions=True),
    # Decode kernel (T <= 16, no segment ids, any mask) or flash kernel (segment ids, no mask).
    "pallas_tpu": Capabilities(
        views=(DenseView,), backends=("tpu", "cpu"), dtypes=(F32, BF16), same_dtype=True,
        head_dims=SUPPORTED_HEAD_DIMS, mask_max_t=MAX_QUERIES, mask_with_segments=False,
    ),
    # Decode kernels reading a paged view through its page table / dequantizing a KIVI view in place.
    "pallas_tpu_paged": Capabilities(
        views=(PagedView,), backends=("tpu", "cpu"), dtypes=(F32, BF16), same_dtype=True,
        head_dims=SUPPORTED_HEAD_DIMS, segments=False, key_stats=False, max_t=MAX_QUERIES,
    ),
    "pallas_tpu_quantized": Capabilities(
        views=(QuantizedView,), backends=("tpu", "cpu"), dtypes=(F32, BF16), same_dtype=True,
        head_dims=SUPPORTED_HEAD_DIMS, segments=False, key_stats=False, max_t=MAX_QUERIES, corrections=False,
    ),
    # jax.nn.dot_product_attention(implementation="cudnn"): default positions only.
    "cudnn": Capabilities(
        views=(DenseView,), layouts=("BSKH",), backends=("gpu", "cuda"), dtypes=(BF16, F16),
        same_dtype=True, head_dims=(64, 128), window_needs_causal=True, softcap=False,
        segments=False, positions=False, lengths=False, lse=False, mask_max_t=0, causal_needs_t_eq_s=True,
    ),
}


def unsupported(
    name: str,
    q: jax.Array,
    view: KVView,
    spec: AttentionSpec,
    *,
    q_positions: jax.Array | None = None,
    q_segment_ids: jax.Array | None = None,
    kv_segment_ids: jax.Array | None = None,
    mask: jax.Array | None = None,
    return_lse: bool = False,
    key_stats: KeyStats | None = None,
    capabilities: Capabilities | None = None,
) -> str | None:
    """Why implementation `name` does not serve this call (None if it does)."""
    caps = capabilities or CAPABILITIES.get(name)
    if caps is None:
        return f"{name} declares no capabilities"
    backend = jax.default_backend()
    t, s = q.shape[1], view.num_slots
    layout = getattr(view, "layout", None)
    given_positions = q_positions is not None or getattr(view, "positions", None) is not None
    checks = (
        (caps.backends is not None and backend not in caps.backends,
         lambda: f"needs backend {'/'.join(caps.backends)}, this one is {backend}"),
        (not isinstance(view, caps.views),
         lambda: f"{type(view).__name__} is not served (serves {', '.join(c.__name__ for c in caps.views)})"),
        (layout is not None and layout not in caps.layouts, lambda: f"DenseView layout {layout} is not served"),
        (caps.dtypes is not None and jnp.dtype(q.dtype) not in caps.dtypes,
         lambda: f"dtype {q.dtype} is not served ({', '.join(map(str, caps.dtypes))})"),
        (caps.same_dtype and jnp.dtype(view.dtype) != jnp.dtype(q.dtype),
         lambda: f"q dtype {q.dtype} != kv dtype {view.dtype}"),
        (caps.head_dims is not None and q.shape[-1] not in caps.head_dims,
         lambda: f"head_dim={q.shape[-1]} is not served ({caps.head_dims})"),
        (spec.window is not None and not caps.window, lambda: "window is not served"),
        (spec.window is not None and not spec.causal and caps.window_needs_causal,
         lambda: "window without causal is not served"),
        (spec.softcap is not None and not caps.softcap, lambda: "softcap is not served"),
        (q_segment_ids is not None and not caps.segments, lambda: "segment ids are not served"),
        (given_positions and not caps.positions, lambda: "explicit positions are not served"),
        (view.lengths is not None and not caps.lengths, lambda: "view lengths are not served"),
        (getattr(getattr(view, "positions", None), "ndim", 2) == 3 and not caps.per_head_positions,
         lambda: "per-KV-head positions [B, K, S] are not served"),
        (return_lse and not caps.lse, lambda: "return_lse is not served"),
        (key_stats is not None and not caps.key_stats, lambda: "key_stats is not served"),
        (mask is not None and caps.mask_max_t is not None and t > caps.mask_max_t,
         lambda: f"an arbitrary mask is served for T <= {caps.mask_max_t}, got T={t}"),
        (mask is not None and q_segment_ids is not None and not caps.mask_with_segments,
         lambda: "a mask together with segment ids is not served"),
        (getattr(view, "has_corrections", False) and not caps.corrections,
         lambda: "GEAR low-rank/outlier corrections and exact sink slots are not served"),
        (caps.max_t is not None and t > caps.max_t, lambda: f"serves T <= {caps.max_t} queries, got T={t}"),
        (spec.causal and caps.causal_needs_t_eq_s and t != s,
         lambda: f"causal with T={t} != S={s} is not served (top-left aligned mask)"),
    )
    return next((reason() for failed, reason in checks if failed), None)
