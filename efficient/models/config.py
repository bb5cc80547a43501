"""`ModelConfig`: the frozen description of a Llama-style decoder.

One implementation serves Llama 2/3, Mistral, Qwen2 and Qwen3 with switches:
qkv bias (Qwen2), q/k RMSNorm (Qwen3), explicit head_dim, tied embeddings,
RoPE scaling (linear, dynamic NTK, llama3, YaRN) and sliding-window layers.
`ModelConfig.from_hf(config_dict)` maps a Hugging Face `config.json`.
"""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")
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
        layer = attn + 3 * d * f + 2 * d + (2 * f + d if self.mlp_bias else 0)
        embed = self.vocab_size * d * (1 if self.tie_embeddings else 2)
        return self.num_layers * layer + embed + d

    # ------------------------------------------------------------------ HF
    @classmethod
    def from_hf(cls, hf: dict[str, Any], dtype: str | None = None) -> ModelConfig:
        """Map a Hugging Face `config.json` dict (Llama/Mistral/Qwen2/Qwen3)."""
        model_type = hf.get("model_type")
        if model_type not in SUPPORTED_MODEL_TYPES:
            archs = hf.get("architectures")
            raise NotImplementedError(
                f"unsupported model_type {model_type!r} (architectures={archs}); "
                f"supported: {SUPPORTED_MODEL_TYPES}"
            )
        required = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                    "num_attention_heads")
        missing = [key for key in required if key not in hf]
        if missing:
            raise ValueError(f"config.json lacks required keys {missing}")
        num_heads = hf["num_attention_heads"]
        num_kv_heads = hf.get("num_key_value_heads") or num_heads
        head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
        num_layers = hf["num_hidden_layers"]
        sliding_window, sliding_layers = _sliding_layout(hf, model_type, num_layers)
        eos = hf.get("eos_token_id")
        eos_ids = tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))
        attention_bias = bool(hf.get("attention_bias", False))
        torch_dtype = dtype or hf.get("dtype") or hf.get("torch_dtype") or "float32"
        return cls(
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=hf.get("max_position_embeddings", 2048),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
            rope=_rope_from_hf(hf),
            qkv_bias=model_type == "qwen2" or (model_type in ("llama", "qwen3") and attention_bias),
            o_bias=model_type in ("llama", "qwen3") and attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            sliding_window=sliding_window,
            sliding_layers=sliding_layers,
            model_type=model_type,
            bos_token_id=hf.get("bos_token_id"),
            eos_token_ids=eos_ids,
            pad_token_id=hf.get("pad_token_id"),
            dtype=str(torch_dtype),
        )

    @classmethod
    def from_hf_file(cls, path: str | os.PathLike[str], dtype: str | None = None) -> ModelConfig:
        with open(path) as f:
            return cls.from_hf(json.load(f), dtype=dtype)


def _rope_from_hf(hf: dict[str, Any]) -> RopeConfig:
    params = dict(hf.get("rope_parameters") or {})
    legacy = hf.get("rope_scaling") or {}
    params = {**legacy, **params}
    partial = params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0))
    if partial not in (None, 1, 1.0):
        raise NotImplementedError(f"partial_rotary_factor={partial} is not supported (only 1.0)")
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
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


def _sliding_layout(
    hf: dict[str, Any], model_type: str, num_layers: int
) -> tuple[int | None, tuple[bool, ...]]:
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
