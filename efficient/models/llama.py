"""One NNX decoder for Llama-style families (Llama 2/3, Mistral, Qwen2, Qwen3).

Modules hold parameters only; the KV cache and positions are explicit
arguments and results. Parameter layout: linear kernels are [in, out]
(the transpose of PyTorch's weight), embeddings [V, D].
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient.attention import AttentionSpec, DenseView, attention
from efficient.cache.protocol import KVCache
from efficient.models.config import ModelConfig
from efficient.models.rope import apply_rotary

_INIT = nnx.initializers.normal(0.02)


class RMSNorm(nnx.Module):
    """RMSNorm in float32, scaled after casting back (the HF Llama convention)."""

    def __init__(self, dim: int, eps: float, dtype: jnp.dtype) -> None:
        self.weight = nnx.Param(jnp.ones((dim,), dtype))
        self.eps = eps

    def __call__(self, x: Float[Array, "... D"]) -> Float[Array, "... D"]:
        x32 = x.astype(jnp.float32)
        normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return self.weight[...] * normed.astype(x.dtype)


def _linear(din: int, dout: int, bias: bool, dtype: jnp.dtype, rngs: nnx.Rngs) -> nnx.Linear:
    return nnx.Linear(din, dout, use_bias=bias, dtype=dtype, param_dtype=dtype,
                      kernel_init=_INIT, rngs=rngs)


class Attention(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        c = config
        self.config = c
        self.layer = layer
        self.q_proj = _linear(c.hidden_size, c.num_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.k_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.v_proj = _linear(c.hidden_size, c.num_kv_heads * c.head_dim, c.qkv_bias, dtype, rngs)
        self.o_proj = _linear(c.num_heads * c.head_dim, c.hidden_size, c.o_bias, dtype, rngs)
        if c.qk_norm:
            self.q_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(c.head_dim, c.rms_norm_eps, dtype)
        self.spec = AttentionSpec(causal=True, window=c.layer_window(layer))

    def __call__(
        self,
        x: Float[Array, "B T D"],
        cos: Float[Array, "B T H"],
        sin: Float[Array, "B T H"],
        positions: Int[Array, "B T"],
        cache: KVCache | None,
        slots: Int[Array, "B T"] | None,
        mask: jax.Array | None,
        implementation: str | tuple[str, ...] | None,
    ) -> tuple[Float[Array, "B T D"], KVCache | None]:
        c = self.config
        b, t, _ = x.shape
        q = self.q_proj(x).reshape(b, t, c.num_heads, c.head_dim)
        k = self.k_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        v = self.v_proj(x).reshape(b, t, c.num_kv_heads, c.head_dim)
        if c.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if cache is None:
            view = DenseView(k=k, v=v, positions=positions)
        else:
            cache = cache.update(self.layer, k, v, slots)
            view = cache.view(self.layer)
        out = attention(
            q, view,
            spec=self.spec,
            q_positions=positions,
            mask=mask,
            implementation=implementation or c.attention_implementation,
        )
        return self.o_proj(out.reshape(b, t, c.num_heads * c.head_dim)), cache


class MLP(nnx.Module):
    """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        d, f, bias = config.hidden_size, config.intermediate_size, config.mlp_bias
        self.gate_proj = _linear(d, f, bias, dtype, rngs)
        self.up_proj = _linear(d, f, bias, dtype, rngs)
        self.down_proj = _linear(f, d, bias, dtype, rngs)

    def __call__(self, x: Float[Array, "B T D"]) -> Float[Array, "B T D"]:
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nnx.Module):
    def __init__(self, config: ModelConfig, layer: int, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def __call__(self, x, cos, sin, positions, cache, slots, mask, implementation):  # noqa: ANN001, ANN204
        h, cache = self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, slots, mask,
                                  implementation)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), cache


class LlamaModel(nnx.Module):
    """Embeddings, L decoder layers, final norm and LM head (tied or not)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: str | None = None) -> None:
        self.config = config
        param_dtype = jnp.dtype(dtype or config.dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=param_dtype,
                                      param_dtype=param_dtype, embedding_init=_INIT, rngs=rngs)
        self.layers = nnx.List(
            [DecoderLayer(config, i, param_dtype, rngs) for i in range(config.num_layers)]
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype)
        if not config.tie_embeddings:
            self.lm_head = _linear(config.hidden_size, config.vocab_size, False, param_dtype, rngs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens.embedding[...].dtype

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """LM head in float32 accumulation; logits returned as float32."""
        if self.config.tie_embeddings:
            weight = self.embed_tokens.embedding[...]
            return jnp.einsum("btd,vd->btv", hidden, weight, preferred_element_type=jnp.float32)
        kernel = self.lm_head.kernel[...]
        return jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
