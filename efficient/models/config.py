"""`ModelConfig`: the frozen description of a decoder-only transformer.

The families (`efficient.models.families`: Llama 2/3, Mistral, Qwen2, Qwen3 in
llama.py; Gemma 3 in gemma3.py) share it with switches: qkv bias (Qwen2), q/k
RMSNorm (Qwen3, Gemma 3), explicit head_dim, tied embeddings, RoPE scaling
(linear, dynamic NTK, llama3, YaRN), sliding-window layers with their own RoPE
(Gemma 3), query scale and logit soft-capping. `ModelConfig.from_hf(config_dict)`
maps a Hugging Face `config.json` through the family registered for its model_type.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_ACTIVATIONS = ("silu", "gelu_tanh")
SUPPORTED_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")


@dataclasses.dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding parameters (HF `rope_parameters` / `rope_scaling`)."""

    theta: float = 10000.0
    rope_type: str = "default"
    factor: float = 1.0
    original_max_position_embeddings: int | None = None
    low_freq_factor: float = 1.0  # llama3
    high_freq_factor: float = 4.0  # llama3
    beta_fast: float = 32.0  # yarn
    beta_slow: float = 1.0  # yarn
    attention_factor: float | None = None  # yarn; None: derived from factor/mscale
    mscale: float | None = None  # yarn
    mscale_all_dim: float | None = None  # yarn
    truncate: bool = True  # yarn

    def __post_init__(self) -> None:
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings:
            raise ValueError(
                f"rope_type {self.rope_type!r} needs original_max_position_embeddings, got "
                f"{self.original_max_position_embeddings!r}"
            )
        if self.rope_type == "llama3" and self.high_freq_factor == self.low_freq_factor:
            raise ValueError(
                f"llama3 rope needs high_freq_factor != low_freq_factor, both are {self.low_freq_factor}"
            )
        if self.rope_type not in SUPPORTED_ROPE_TYPES:
            raise NotImplementedError(
                f"rope_type {self.rope_type!r} is not supported; supported: {SUPPORTED_ROPE_TYPES}"
            )
        if not self.theta > 0:
            raise ValueError(f"rope theta must be > 0, got {self.theta}")
        if self.rope_type != "default" and not self.factor > 0:
            raise ValueError(f"rope factor must be > 0, got {self.factor}")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Architecture of a Llama-style decoder-only transformer."""

    vocab_size: int
    hidden_size: int  # D
    intermediate_size: int  # F
    num_layers: int  # L
    num_heads: int  # N
    num_kv_heads: int  # K
    head_dim: int  # H
    max_position_embeddings: int = 2048
    rms_norm_eps: float = 1e-6
    rope: RopeConfig = RopeConfig()
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    tie_embeddings: bool = False
    sliding_window: int | None = None
    # Per layer: True where the layer uses the sliding window. Empty: none.
    sliding_layers: tuple[bool, ...] = ()
    model_type: str = "llama"
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    dtype: str = "float32"
    # Which attention implementation(s) the model's layers ask the dispatcher for.
    attention_implementation: str | tuple[str, ...] | None = None
    activation: str = "silu"  # of the gated MLP: "silu" (SwiGLU) or "gelu_tanh" (GeGLU)
    # RoPE of the sliding-window layers (Gemma 3's rope_local_base_freq); None: `rope`.
    rope_local: RopeConfig | None = None
    query_pre_attn_scalar: float | None = None  # logit scale query_pre_attn_scalar**-0.5; None: H**-0.5
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None

    def __post_init__(self) -> None:
        # Sequences become tuples: the config is part of the (hashable) graphdef.
        for name in ("sliding_layers", "eos_token_ids"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if isinstance(self.attention_implementation, list):
            object.__setattr__(self, "attention_implementation", tuple(self.attention_implementation))
        positive = ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                    "num_kv_heads", "head_dim", "max_position_embeddings")
        for name in positive:
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"ModelConfig.{name} must be a positive int, got {value!r}")
        if not self.rms_norm_eps > 0:
            raise ValueError(f"ModelConfig.rms_norm_eps must be > 0, got {self.rms_norm_eps!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"num_heads={self.num_heads} is not divisible by num_kv_heads={self.num_kv_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for rotary embeddings, got {self.head_dim}")
        if self.sliding_layers and len(self.sliding_layers) != self.num_layers:
            raise ValueError(
                f"sliding_layers has {len(self.sliding_layers)} entries for {self.num_layers} layers"
            )
        if self.sliding_window and not self.sliding_layers:
            raise ValueError(
                f"sliding_window={self.sliding_window} is set but sliding_layers is empty: "
                "say which layers use it (e.g. (True,) * num_layers)"
            )
        if any(self.sliding_layers) and not (self.sliding_window and self.sliding_window > 0):
            raise ValueError(f"sliding layers need sliding_window > 0, got {self.sliding_window!r}")
        if self.activation not in SUPPORTED_ACTIVATIONS:
            raise ValueError(f"ModelConfig.activation must be one of {SUPPORTED_ACTIVATIONS}, got {self.activation!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ValueError(f"ModelConfig.{name} must be > 0 or None, got {value!r}")
        if self.dtype not in ("float32", "bfloat16", "float16"):
            raise ValueError(f"dtype must be float32, bfloat16 or float16, got {self.dtype!r}")

    @property
    def group_size(self) -> int:  # G
        return self.num_heads // self.num_kv_heads

    def layer_window(self, layer: int) -> int | None:
        """The sliding window of `layer`, or None for full attention."""
        if self.sliding_layers and self.sliding_layers[layer]:
            return self.sliding_window
        return None

    def windowed_layers(self) -> tuple[bool, ...]:
        """Per layer: True where it attends through the sliding window."""
        return tuple(self.layer_window(layer) is not None for layer in range(self.num_layers))

    def layer_rope(self, layer: int) -> RopeConfig:
        """The RoPE of `layer`: `rope_local` on sliding layers when set, else `rope`."""
        if self.rope_local is not None and self.layer_window(layer) is not None:
            return self.rope_local
        return self.rope

    def layer_kinds(self) -> tuple[tuple[tuple[int | None, RopeConfig], ...], tuple[int, ...]]:
        """The distinct (window, rope) kinds in order of first use, and each layer's kind id.

        The shared forward scans over layers with the kind id as a traced per-layer
        value and selects the kind's static attention spec and RoPE table by it."""
        kinds: list[tuple[int | None, RopeConfig]] = []
        ids = []
        for layer in range(self.num_layers):
            kind = (self.layer_window(layer), self.layer_rope(layer))
            if kind not in kinds:
                kinds.append(kind)
            ids.append(kinds.index(kind))
        return tuple(kinds), tuple(ids)

    def replace(self, **changes: Any) -> ModelConfig:
        return dataclasses.replace(self, **changes)

    def num_parameters(self) -> int:
        d, f, h = self.hidden_size, self.intermediate_size, self.head_dim
        n, k = self.num_heads, self.num_kv_heads
        attn = d * n * h + 2 * d * k * h + n * h * d
        if self.qkv_bias:
            attn += n * h + 2 * k * h
        if self.o_bias:
            attn += d
        if self.qk_norm:
            attn += 2 * h
        from efficient.models.families import get_family  # the registry imports this module

        norms = get_family(self.model_type).norms_per_layer
        layer = attn + 3 * d * f + norms * d + (2 * f + d if self.mlp_bias else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        """Map a Hugging Face `config.json` dict through the family of its model_type."""
        from efficient.models.families import get_family  # the registry imports this module

        if not isinstance(hf, dict):
            raise TypeError(f"ModelConfig.from_hf: hf must be a dict (a parsed config.json), got {type(hf).__name__}")
        family = get_family(hf.get("model_type"), architectures=hf.get("architectures"))
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        return family.config_from_hf(hf, dtype)

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike[str], dtype: str | None = None) -> ModelConfig:
        """`from_hf` of the JSON object in the file at `path`; ValueError naming the file if it
        is not JSON or not an object."""
        try:
            with open(path, encoding="utf-8") as f:
                hf = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"path: {str(path)!r} is not a valid JSON config file ({e})") from e
        if not isinstance(hf, dict):
            raise ValueError(f"path: {str(path)!r} must hold a JSON object, got a JSON {type(hf).__name__}")
        return cls.from_hf(hf, dtype=dtype)


def hf_eos_ids(hf: dict[str, Any]) -> tuple[int, ...]:
    eos = hf.get("eos_token_id")
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def rope_from_hf(hf: dict[str, Any], params: dict[str, Any] | None = None,
                 default_theta: float = 10000.0) -> RopeConfig:
    """A RopeConfig from HF rope parameters (default: the config's `rope_parameters`
    merged over the legacy `rope_scaling`; `rope_theta` falls back to the top level)."""
    if params is None:
        params = {**(hf.get("rope_scaling") or {}), **(hf.get("rope_parameters") or {})}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = params.get("rope_theta", hf.get("rope_theta", default_theta))
    rope_type = params.get("rope_type", params.get("type", "default"))
    original = params.get("original_max_position_embeddings")
    if original is None and rope_type in ("llama3", "yarn"):
        original = hf.get("original_max_position_embeddings", hf.get("max_position_embeddings"))
    return RopeConfig(
        theta=float(theta),
        rope_type=rope_type,
        factor=float(params.get("factor") or 1.0),
        original_max_position_embeddings=original,
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        beta_fast=float(params.get("beta_fast") or 32.0),
        beta_slow=float(params.get("beta_slow") or 1.0),
        attention_factor=params.get("attention_factor"),
        mscale=params.get("mscale"),
        mscale_all_dim=params.get("mscale_all_dim"),
        truncate=bool(params.get("truncate", True)),
    )


def rope_to_hf(rope: RopeConfig) -> dict[str, Any]:
    """HF `rope_parameters` for `rope` (the inverse of `rope_from_hf`)."""
    params: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        params["factor"] = rope.factor
    if rope.original_max_position_embeddings is not None:
        params["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rope_type == "llama3":
        params.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.rope_type == "yarn":
        params.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rope, key) is not None:
                params[key] = getattr(rope, key)
    return params
