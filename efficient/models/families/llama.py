"""Llama 2/3, Mistral, Qwen2, Qwen3: the pre-norm SwiGLU decoder layer.

Llama (Touvron et al., 2023), Mistral (Jiang et al., 2023: sliding window),
Qwen2 (qkv bias), Qwen3 (q/k RMSNorm). One layer serves them all with switches
from `ModelConfig`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient.models.config import ModelConfig, hf_eos_ids, rope_from_hf, rope_to_hf
from efficient.models.families import Family, LayerParam, register
from efficient.models.modules import MLP, Attend, Attention, RMSNorm

ARCHITECTURES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                 "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}


class LlamaLayer(nnx.Module):
    """x + attn(norm(x)), then + mlp(norm(x))."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, dtype, rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = MLP(config, dtype, rngs)

    def project_kv(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
                   ) -> tuple[Float[Array, "B T K H"], Float[Array, "B T K H"]]:
        """The keys and values this layer writes to a cache for input `x`."""
        return self.self_attn.project_kv(self.input_layernorm(x), cos, sin)

    def __call__(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"],
                 attend: Attend) -> Float[Array, "B T D"]:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, attend)
        return x + self.mlp(self.post_attention_layernorm(x))


def layer_params(config: ModelConfig) -> Iterator[LayerParam]:
    yield "input_layernorm.weight", ("input_layernorm", "weight"), False
    yield "post_attention_layernorm.weight", ("post_attention_layernorm", "weight"), False
    yield from attention_params(config)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield f"mlp.{proj}.weight", ("mlp", proj, "kernel"), True
        if config.mlp_bias:
            yield f"mlp.{proj}.bias", ("mlp", proj, "bias"), False


def attention_params(config: ModelConfig) -> Iterator[LayerParam]:
    for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
        yield f"self_attn.{proj}.weight", ("self_attn", proj, "kernel"), True
        if config.o_bias if proj == "o_proj" else config.qkv_bias:
            yield f"self_attn.{proj}.bias", ("self_attn", proj, "bias"), False
    if config.qk_norm:
        for norm in ("q_norm", "k_norm"):
            yield f"self_attn.{norm}.weight", ("self_attn", norm, "weight"), False


def _sliding_layout(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int | None, tuple[bool, ...]]:
    """Which layers use a sliding window, following each family's HF semantics."""
    window = hf.get("sliding_window")
    layer_types = hf.get("layer_types")
    if layer_types:
        flags = tuple(t == "sliding_attention" for t in layer_types)
        return (window if any(flags) else None), (flags if any(flags) else ())
    if not window:
        return None, ()
    if model_type == "mistral":
        return window, (True,) * num_layers
    if model_type in ("qwen2", "qwen3"):
        if not hf.get("use_sliding_window", False):
            return None, ()
        first_full = hf.get("max_window_layers", num_layers)
        flags = tuple(i >= first_full for i in range(num_layers))
        return (window if any(flags) else None), (flags if any(flags) else ())
    return None, ()


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    model_type = hf["model_type"]
    num_heads = hf["num_attention_heads"]
    num_layers = hf["num_hidden_layers"]
    sliding_window, sliding_layers = _sliding_layout(hf, model_type, num_layers)
    attention_bias = bool(hf.get("attention_bias", False))
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or hf["hidden_size"] // num_heads,
        max_position_embeddings=hf.get("max_position_embeddings", 2048),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope_from_hf(hf),
        qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
        o_bias=model_type in ("llama", "qwen3") and attention_bias,
        mlp_bias=bool(hf.get("mlp_bias", False)),
        qk_norm=model_type == "qwen3",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        sliding_window=sliding_window,
        sliding_layers=sliding_layers,
        model_type=model_type,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=hf_eos_ids(hf),
        pad_token_id=hf.get("pad_token_id"),
        dtype=str(dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"),
    )


def common_hf(config: ModelConfig, architecture: str) -> dict[str, Any]:
    """The `config.json` keys every family writes the same way."""
    eos = config.eos_token_ids
    return {
        "architectures": [architecture],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(eos) if len(eos) > 1 else (eos[0] if eos else None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.dtype,
    }


def to_hf(config: ModelConfig) -> dict[str, Any]:
    hf = common_hf(config, ARCHITECTURES[config.model_type])
    hf.update(
        rope_theta=config.rope.theta,
        rope_parameters=rope_to_hf(config.rope),
        attention_bias=config.qkv_bias if config.model_type != "qwen2" else False,
        mlp_bias=config.mlp_bias,
        hidden_act="silu",
    )
    if config.sliding_layers:
        hf["sliding_window"] = config.sliding_window
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in config.sliding_layers]
        if config.model_type in ("qwen2", "qwen3"):  # their configs drop the window without this
            hf["use_sliding_window"] = True
            hf["max_window_layers"] = config.sliding_layers.index(True)
    return hf


FAMILY = register(Family(
    name="llama", model_types=tuple(ARCHITECTURES), layer=LlamaLayer, norm=RMSNorm,
    config_from_hf=config_from_hf, to_hf=to_hf, layer_params=layer_params,
))
