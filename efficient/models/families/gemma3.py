"""Gemma 3 text decoder (Gemma Team, 2025; HF model_type "gemma3_text", Gemma3ForCausalLM).

Differences from Llama: sandwich norms (input / post_attention / pre_feedforward /
post_feedforward), RMSNorm with (1 + w) in float32, GeGLU with the tanh GELU,
embeddings scaled by sqrt(hidden_size) in the compute dtype, q/k RMSNorm, logit
scale query_pre_attn_scalar**-0.5, 5 local (sliding window, RoPE base
`rope_local_base_freq`) : 1 global layers (RoPE `rope_theta` with its scaling),
optional final logit soft-capping, tied embeddings. Attention logit soft-capping
(Gemma 2) is in the HF config but not applied by Gemma 3, here as in transformers.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float

from efficient.models.config import ModelConfig, RopeConfig, hf_eos_ids, rope_from_hf, rope_to_hf
from efficient.models.families import Family, LayerParam, register
from efficient.models.families.llama import attention_params, common_hf
from efficient.models.modules import MLP, Attend, Attention, OffsetRMSNorm

MODEL_TYPE = "gemma3_text"
_ACTIVATIONS = {"gelu_pytorch_tanh": "gelu_tanh", "gelu_tanh": "gelu_tanh"}
_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")


class Gemma3Layer(nnx.Module):
    """x + post_attn_norm(attn(input_norm(x))), then + post_ff_norm(mlp(pre_ff_norm(x)))."""

    def __init__(self, config: ModelConfig, dtype: jnp.dtype, rngs: nnx.Rngs) -> None:
        d, eps = config.hidden_size, config.rms_norm_eps
        self.input_layernorm = OffsetRMSNorm(d, eps, dtype)
        self.self_attn = Attention(config, dtype, rngs, norm=OffsetRMSNorm)
        self.post_attention_layernorm = OffsetRMSNorm(d, eps, dtype)
        self.pre_feedforward_layernorm = OffsetRMSNorm(d, eps, dtype)
        self.mlp = MLP(config, dtype, rngs)
        self.post_feedforward_layernorm = OffsetRMSNorm(d, eps, dtype)

    def project_kv(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"]
                   ) -> tuple[Float[Array, "B T K H"], Float[Array, "B T K H"]]:
        """The keys and values this layer writes to a cache for input `x`."""
        return self.self_attn.project_kv(self.input_layernorm(x), cos, sin)

    def __call__(self, x: Float[Array, "B T D"], cos: Float[Array, "B T H"], sin: Float[Array, "B T H"],
                 attend: Attend) -> Float[Array, "B T D"]:
        x = x + self.post_attention_layernorm(self.self_attn(self.input_layernorm(x), cos, sin, attend))
        return x + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(x)))


def layer_params(config: ModelConfig) -> Iterator[LayerParam]:
    for norm in _NORMS:
        yield f"{norm}.weight", (norm, "weight"), False
    yield from attention_params(config)
    for proj in ("gate_proj", "up_proj", "down_proj"):
        yield f"mlp.{proj}.weight", ("mlp", proj, "kernel"), True


def _ropes(hf: dict[str, Any]) -> tuple[RopeConfig, RopeConfig]:
    """(global, local) RoPE from either `rope_parameters` keyed by layer type (transformers
    >= 5) or the older rope_theta / rope_scaling / rope_local_base_freq keys."""
    params = hf.get("rope_parameters") or {}
    if "full_attention" in params or "sliding_attention" in params:
        full = dict(params.get("full_attention") or {})
        local = dict(params.get("sliding_attention") or {})
    else:
        full = {**(hf.get("rope_scaling") or {}), **params}
        local = {}
    full.setdefault("rope_theta", hf.get("rope_theta", 1_000_000.0))
    local.setdefault("rope_theta", hf.get("rope_local_base_freq", 10_000.0))
    local.setdefault("rope_type", "default")
    return rope_from_hf(hf, full), rope_from_hf(hf, local)


def config_from_hf(hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
    if hf.get("use_bidirectional_attention"):
        raise NotImplementedError("gemma3_text with use_bidirectional_attention=True is not supported")
    act = hf.get("hidden_activation", hf.get("hidden_act")) or "gelu_pytorch_tanh"
    if act not in _ACTIVATIONS:
        raise NotImplementedError(f"gemma3_text hidden_activation {act!r} is not supported; supported: {tuple(_ACTIVATIONS)}")
    num_layers = hf["num_hidden_layers"]
    layer_types = hf.get("layer_types")
    if not layer_types:
        pattern = hf.get("sliding_window_pattern", 6)
        layer_types = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(num_layers)]
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for num_hidden_layers={num_layers}")
    sliding = tuple(t == "sliding_attention" for t in layer_types)
    window = hf.get("sliding_window", 4096) if any(sliding) else None
    rope, rope_local = _ropes(hf)
    attention_bias = bool(hf.get("attention_bias", False))
    num_heads = hf["num_attention_heads"]
    return ModelConfig(
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=num_layers,
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=hf.get("head_dim") or 256,
        max_position_embeddings=hf.get("max_position_embeddings", 131_072),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        rope=rope,
        rope_local=rope_local if any(sliding) else None,
        qkv_bias=attention_bias,
        o_bias=attention_bias,
        qk_norm=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        sliding_window=window,
        sliding_layers=sliding if any(sliding) else (),
        model_type=MODEL_TYPE,
        bos_token_id=hf.get("bos_token_id", 2),
        eos_token_ids=hf_eos_ids({"eos_token_id": hf.get("eos_token_id", 1)}),
        pad_token_id=hf.get("pad_token_id", 0),
        dtype=str(dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"),
        activation=_ACTIVATIONS[act],
        query_pre_attn_scalar=hf.get("query_pre_attn_scalar", 256),
        # Gemma 3 replaced Gemma 2's attention soft-capping with q/k norm: transformers keeps the
        # key in the config but never applies it, so neither do we (ModelConfig supports it).
        attn_logit_softcapping=None,
        final_logit_softcapping=hf.get("final_logit_softcapping"),
    )


def to_hf(config: ModelConfig) -> dict[str, Any]:
    hf = common_hf(config, "Gemma3ForCausalLM")
    sliding = config.sliding_layers or (False,) * config.num_layers
    hf.update(
        rope_parameters={"full_attention": rope_to_hf(config.rope),
                         "sliding_attention": rope_to_hf(config.rope_local or config.rope)},
        layer_types=["sliding_attention" if s else "full_attention" for s in sliding],
        sliding_window=config.sliding_window,
        attention_bias=config.qkv_bias,
        hidden_activation="gelu_pytorch_tanh",
        query_pre_attn_scalar=config.query_pre_attn_scalar,
        final_logit_softcapping=config.final_logit_softcapping,
    )
    return hf


def embed_scale(config: ModelConfig) -> float:
    return math.sqrt(config.hidden_size)


FAMILY = register(Family(
    name="gemma3", model_types=(MODEL_TYPE,), layer=Gemma3Layer, norm=OffsetRMSNorm,
    config_from_hf=config_from_hf, to_hf=to_hf, layer_params=layer_params, norms_per_layer=4,
    embed_scale=embed_scale,
))
