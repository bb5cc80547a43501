"""Building blocks shared by the families: RMSNorm, linear layers, attention, gated MLP.

Modules hold parameters only. Linear kernels are [in, out] (the transpose of
PyTorch's weight), embeddings [V, D]. A layer's attention does not touch the
cache: it hands q, k, v to an `attend` callback supplied by the shared forward
(which writes the cache at the traced layer index and calls the dispatcher).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient.models.config import ModelConfig
from efficient.models.rope import apply_rotary

INIT = nnx.initializers.normal(0.02)

# attend(q [B T N H], k [B T K H], v [B T K H]) -> attention output [B T N H]
Attend = Callable[[jax.Array, jax.Array, jax.Array], jax.Array]


def _normalize(x: Float[Array, "... D"], eps: float) -> Float[Array, "... D"]:
    x32 = x.astype(jnp.float32)
    return x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)


class RMSNorm(nnx.Module):
    """RMSNorm (Zhang & Sennrich, 2019) in float32, scaled after casting back (HF Llama)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        return self.weight[...] * _normalize(x, self.eps).astype(x.dtype)


class OffsetRMSNorm(nnx.Module):
    """Gemma's RMSNorm: x / rms(x) * (1 + w), all in float32, then cast back (w starts at 0)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.zeros((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        scale = 1.0 + self.weight[...].astype(jnp.float32)
        return (_normalize(x, self.eps) * scale).astype(x.dtype)


Norm = type[RMSNorm] | type[OffsetRMSNorm]


def linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype, kernel_init=INIT, rngs=rngs)


class Attention(nnx.Module):
    """q/k/v projections, optional q/k RMSNorm (Qwen3, Gemma 3), RoPE, `attend`, o_proj."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs, norm: Norm = RMSNorm) -> None:
        c = config
        self.config = c
        self.q_proj = linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.k_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.v_proj = linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.o_proj = linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dtype, rngs)
        if c.qk_norm:
            self.q_norm = norm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = norm(c.head_dim, c.rms_norm_eps, dtype)

    def project_kv(
        self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
    ) -> tuple[Float[Array, "B T K H"], Float[Array, "B T K H"]]:
        """The keys (normed, rotated) and values of `x`: what the layer writes to a cache."""
        c = self.config
        b, t, _ = x.shape
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            k = self.k_norm(k)
        return apply_rotary(k, cos, sin), v

    def __call__(
        self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"], attend: Attend
    ) -> Float[Array, "B T D"]:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        if c.qk_norm:
            q = self.q_norm(q)
        k, v = self.project_kv(x, cos, sin)
        out = attend(apply_rotary(q, cos, sin), k, v)
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim))


_ACTIVATIONS = {"silu": jax.nn.silu, "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True)}


class MLP(nnx.Module):
    """Gated feed-forward down(act(gate(x)) * up(x)): SwiGLU (silu) or GeGLU (gelu tanh)."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.activation = config.activation
        self.gate_proj = linear(d, f, bias, dtype, rngs)
        self.up_proj = linear(d, f, bias, dtype, rngs)
        self.down_proj = linear(f, d, bias, dtype, rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(_ACTIVATIONS[self.activation](self.gate_proj(x)) * self.up_proj(x))
