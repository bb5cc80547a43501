"""Load llama.cpp GGUF files (archs llama/Mistral, qwen2, qwen3) without torch.

    model = from_gguf("SmolLM2-135M-Instruct.Q4_1.gguf")   # or from_pretrained(path)

The file is memory-mapped with `gguf.GGUFReader`. `config_from_gguf` maps the
llama.cpp metadata (`{arch}.block_count`, `embedding_length`, ...) onto
`ModelConfig` and checks it against the tensor shapes. `GGUFSource` presents
the tensors under their Hugging Face names in the HF layout ([out, in]),
dequantizing one tensor per `get` with `gguf.quants.dequantize` (F32, F16,
BF16, Q4_0..Q8_0, K-quants, ...), and undoes the Q/K row permutation that
llama.cpp's converter applies to the `llama` arch (to interleave RoPE pairs).
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import gguf
import numpy as np
from flax import nnx

from efficient.models.config import ModelConfig, RopeConfig
from efficient.models.loading import CheckpointError, load_tensors
from efficient.models.rope import static_inv_freq

SUPPORTED_ARCHS = ("llama", "qwen2", "qwen3")
# Archs whose q/k rows llama.cpp permutes (`LlamaModel.permute` in convert_hf_to_gguf.py).
_PERMUTED_ARCHS = ("llama",)

_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_BLOCK_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# Tensors llama.cpp stores that are not parameters of the HF model.
_EXTRA_TENSORS = ("rope_freqs.weight",)


class GGUFError(CheckpointError):
    """A GGUF file that cannot be read or does not describe a supported model."""


def hf_tensor_name(gguf_name: str) -> str | None:
    """The HF name of a llama.cpp tensor name (None if it has no HF counterpart)."""
    if gguf_name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[gguf_name]
    parts = gguf_name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] in ("weight", "bias"):
        hf = _BLOCK_NAMES.get(parts[2])
        if hf is not None:
            return f"model.layers.{parts[1]}.{hf}.{parts[3]}"
    return None


_GGUFReader = gguf.GGUFReader  # bound at import (tests may patch gguf.GGUFReader with _Reader)


class _Reader(_GGUFReader):
    """`gguf.GGUFReader` parsing through a plain ndarray view of its memmap: slicing a
    np.memmap costs a Python `__array_finalize__` per slice, and a tokenizer holds
    ~10^5 strings (3-4x faster to open; the bytes stay memory-mapped)."""

    @property
    def data(self) -> np.ndarray:
        return self._plain

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self.path = str(getattr(value, "filename", "") or "")
        self._plain = value.view(np.ndarray)  # its .base keeps the memmap open


def open_gguf(path: str | os.PathLike[str]) -> gguf.GGUFReader:
    """A memory-mapped reader; a missing, non-GGUF or truncated file raises GGUFError."""
    file = Path(path)
    if not file.is_file():
        raise GGUFError(f"GGUF file {str(file)!r} does not exist")
    try:
        return _Reader(file, "r")
    except Exception as e:  # the reader raises ValueError, IndexError, KeyError, ... on bad bytes
        with open(file, "rb") as f:
            magic = f.read(4)
        what = "is not a GGUF file" if magic != b"GGUF" else "is truncated or corrupt"
        raise GGUFError(f"{str(file)!r} {what} ({type(e).__name__}: {e})") from e


def _location(reader: gguf.GGUFReader) -> str:
    return str(getattr(reader, "path", None) or getattr(reader.data, "filename", None) or "<gguf>")


class _Metadata:
    """Typed access to a reader's key/value fields; errors name the file and the key."""

    def __init__(self, reader: gguf.GGUFReader) -> None:
        self.reader = reader
        self.location = _location(reader)

    def has(self, key: str) -> bool:
        return key in self.reader.fields

    def get(self, key: str, default: Any = None) -> Any:
        field = self.reader.fields.get(key)
        if field is None:
            return default
        try:
            return field.contents()
        except Exception as e:
            raise GGUFError(f"{self.location!r}: cannot decode metadata field {key!r}: {e}") from e

    def require(self, key: str) -> Any:
        if key not in self.reader.fields:
            raise GGUFError(f"{self.location!r} lacks the required metadata field {key!r}")
        return self.get(key)

    def get_int(self, key: str, default: int | None = None, required: bool = False) -> int | None:
        value = self.require(key) if required else self.get(key, default)
        if isinstance(value, list):  # per-layer arrays (e.g. head counts): must be uniform here
            if not value or len(set(value)) != 1:
                raise GGUFError(f"{self.location!r}: metadata field {key!r} varies per layer "
                                f"({value[:8]}...), which is not supported")
            value = value[0]
        if value is None:
            return None
        if isinstance(value, float) and not value.is_integer():
            raise GGUFError(f"{self.location!r}: metadata field {key!r} must be an integer, got {value!r}")
        return int(value)

    def get_float(self, key: str, default: float | None = None, required: bool = False) -> float | None:
        """A float; float32 fields as their shortest decimal (1e-05, not 9.9999997e-06)."""
        value = self.require(key) if required else self.get(key, default)
        if value is None:
            return None
        field = self.reader.fields.get(key)
        if field is not None and field.types == [gguf.GGUFValueType.FLOAT32]:
            return float(str(np.float32(value)))
        return float(value)


def _tensor_shapes(reader: gguf.GGUFReader) -> dict[str, tuple[int, ...]]:
    """llama.cpp tensor name -> shape in numpy order (GGUF lists ne0 first: reversed)."""
    return {t.name: tuple(int(d) for d in reversed(t.shape.tolist())) for t in reader.tensors}


def _llama3_rope(factors: np.ndarray, theta: float, head_dim: int, location: str) -> RopeConfig:
    """The llama3 RopeConfig whose frequencies equal theta's divided by `factors`
    (the `rope_freqs.weight` tensor llama.cpp writes instead of rope_scaling metadata).

    Only the thresholds old_len/low and old_len/high matter, so low_freq_factor is
    fixed to 1 (Llama 3.x's value); the fit is verified and refused if inexact.
    """
    base, _ = static_inv_freq(RopeConfig(theta=theta), head_dim)
    if np.allclose(factors, 1.0, rtol=1e-6, atol=0):
        return RopeConfig(theta=theta)
    factor = float(factors.max())
    wavelen = 2 * math.pi / base.astype(np.float64)
    unscaled = np.isclose(factors, 1.0, rtol=1e-6)
    scaled = np.isclose(factors, factor, rtol=1e-6)
    medium = ~unscaled & ~scaled
    if medium.sum() >= 2:  # smooth = old_len / wavelen / (high - 1) - 1 / (high - 1): linear in 1/wavelen
        smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
        slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
        high = round(1 - 1 / intercept, 4) if intercept < 0 else 4.0
        old_len = slope * (high - 1)
    else:  # no ramp to fit: any thresholds separating the two groups give the same frequencies
        high = 4.0
        lo = wavelen[unscaled].max() * high if unscaled.any() else 0.0
        hi = wavelen[scaled].min() if scaled.any() else lo + 2
        old_len = (lo + hi) / 2
    candidate = RopeConfig(theta=theta, rope_type="llama3", factor=factor, low_freq_factor=1.0,
                           high_freq_factor=float(high),
                           original_max_position_embeddings=max(1, round(old_len)))
    got, _ = static_inv_freq(candidate, head_dim)
    if not np.allclose(base / got, factors, rtol=1e-4, atol=0):
        raise GGUFError(f"{location!r}: tensor 'rope_freqs.weight' ({np.round(factors[:6], 4).tolist()}...) "
                        "is not a llama3 frequency scaling; arbitrary per-frequency factors are not supported")
    return candidate


def _rope_config(meta: _Metadata, arch: str, head_dim: int, rope_freqs: np.ndarray | None) -> RopeConfig:
    theta = meta.get_float(f"{arch}.rope.freq_base", 10000.0)
    kind = meta.get(f"{arch}.rope.scaling.type", "none")
    factor = meta.get_float(f"{arch}.rope.scaling.factor")
    if kind == "none" and meta.has(f"{arch}.rope.scale_linear"):  # older files
        kind, factor = "linear", meta.get_float(f"{arch}.rope.scale_linear")
    if rope_freqs is not None:
        if kind != "none":
            raise GGUFError(f"{meta.location!r}: both rope_freqs.weight and "
                            f"{arch}.rope.scaling.type={kind!r} are set")
        return _llama3_rope(rope_freqs, theta, head_dim, meta.location)
    if kind == "none" or (kind == "linear" and factor in (None, 1.0)):
        return RopeConfig(theta=theta)
    if factor is None:
        raise GGUFError(f"{meta.location!r} lacks the metadata field {arch + '.rope.scaling.factor'!r} "
                        f"required by rope scaling type {kind!r}")
    if kind == "linear":
        return RopeConfig(theta=theta, rope_type="linear", factor=factor)
    if kind == "yarn":
        return RopeConfig(
            theta=theta, rope_type="yarn", factor=factor,
            original_max_position_embeddings=meta.get_int(f"{arch}.rope.scaling.original_context_length",
                                                      required=True),
            beta_fast=meta.get_float(f"{arch}.rope.scaling.yarn_beta_fast", 32.0),
            beta_slow=meta.get_float(f"{arch}.rope.scaling.yarn_beta_slow", 1.0),
        )
    raise GGUFError(f"{meta.location!r}: metadata {arch + '.rope.scaling.type'!r}={kind!r} is not "
                    "supported (none, linear, yarn)")


def _check_shapes(config: ModelConfig, shapes: dict[str, tuple[int, ...]], arch: str, location: str) -> None:
    """Metadata vs tensor shapes: errors name both the metadata fields and the tensor."""
    c = config
    expected = {
        "token_embd.weight": ((c.vocab_size, c.hidden_size), f"{arch}.vocab_size, {arch}.embedding_length"),
        "blk.0.attn_q.weight": ((c.num_heads * c.head_dim, c.hidden_size),
                                f"{arch}.attention.head_count * head_dim, {arch}.embedding_length"),
        "blk.0.attn_k.weight": ((c.num_kv_heads * c.head_dim, c.hidden_size),
                                f"{arch}.attention.head_count_kv * head_dim, {arch}.embedding_length"),
        "blk.0.ffn_gate.weight": ((c.intermediate_size, c.hidden_size),
                                  f"{arch}.feed_forward_length, {arch}.embedding_length"),
    }
    for name, (want, fields) in expected.items():
        if name not in shapes:
            raise GGUFError(f"{location!r} lacks the tensor {name!r}")
        if shapes[name] != want:
            raise GGUFError(
                f"{location!r}: tensor {name!r} has shape {shapes[name]} (HF layout) but the metadata "
                f"({fields}; head_dim={c.head_dim}) implies {want}"
            )
    last = f"blk.{c.num_layers - 1}.attn_q.weight"
    beyond = f"blk.{c.num_layers}.attn_q.weight"
    if last not in shapes or beyond in shapes:
        found = sum(1 for n in shapes if n.endswith(".attn_q.weight"))
        raise GGUFError(f"{location!r}: metadata {arch + '.block_count'!r}={c.num_layers} but the file "
                        f"holds {found} blocks")


def config_from_gguf(path_or_reader: str | os.PathLike[str] | gguf.GGUFReader,
                     dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` described by a GGUF file's llama.cpp metadata (default dtype float32)."""
    reader = path_or_reader if isinstance(path_or_reader, _GGUFReader) else open_gguf(path_or_reader)
    meta = _Metadata(reader)
    arch = meta.require("general.architecture")
    if arch not in SUPPORTED_ARCHS:
        raise GGUFError(f"{meta.location!r}: general.architecture={arch!r} is not supported; "
                        f"supported: {SUPPORTED_ARCHS}")
    shapes = _tensor_shapes(reader)
    hidden = meta.get_int(f"{arch}.embedding_length", required=True)
    num_heads = meta.get_int(f"{arch}.attention.head_count", required=True)
    num_kv_heads = meta.get_int(f"{arch}.attention.head_count_kv", num_heads)
    head_dim = (meta.get_int(f"{arch}.attention.key_length") or meta.get_int(f"{arch}.rope.dimension_count")
                or hidden // max(num_heads, 1))
    value_dim = meta.get_int(f"{arch}.attention.value_length", head_dim)
    if value_dim != head_dim:
        raise GGUFError(f"{meta.location!r}: {arch}.attention.value_length={value_dim} differs from the "
                        f"key length {head_dim}, which is not supported")
    vocab = meta.get_int(f"{arch}.vocab_size")
    if vocab is None and meta.has("tokenizer.ggml.tokens"):
        vocab = len(reader.fields["tokenizer.ggml.tokens"].data)
    if vocab is None and "token_embd.weight" in shapes:
        vocab = shapes["token_embd.weight"][0]
    if vocab is None:
        raise GGUFError(f"{meta.location!r}: no {arch}.vocab_size, tokenizer.ggml.tokens or token_embd.weight")
    num_layers = meta.get_int(f"{arch}.block_count", required=True)
    rope_freqs = None
    if "rope_freqs.weight" in shapes:
        rope_freqs = GGUFSource(reader).dequantized("rope_freqs.weight").reshape(-1)
    window = meta.get_int(f"{arch}.attention.sliding_window")
    name = str(meta.get("general.name", "") or "")
    eos = meta.get_int("tokenizer.ggml.eos_token_id")
    try:
        config = ModelConfig(
            vocab_size=vocab,
            hidden_size=hidden,
            intermediate_size=meta.get_int(f"{arch}.feed_forward_length", required=True),
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=num_kv_heads,
            head_dim=head_dim,
            max_position_embeddings=meta.get_int(f"{arch}.context_length", required=True),
            rms_norm_eps=meta.get_float(f"{arch}.attention.layer_norm_rms_epsilon", required=True),
            rope=_rope_config(meta, arch, head_dim, rope_freqs),
            qkv_bias="blk.0.attn_q.bias" in shapes,
            o_bias="blk.0.attn_output.bias" in shapes,
            mlp_bias="blk.0.ffn_gate.bias" in shapes,
            qk_norm=arch == "qwen3",
            tie_embeddings="output.weight" not in shapes,
            sliding_window=window if window else None,
            sliding_layers=(True,) * num_layers if window else (),
            model_type="mistral" if arch == "llama" and "mistral" in name.lower() else arch,
            bos_token_id=meta.get_int("tokenizer.ggml.bos_token_id"),
            eos_token_ids=() if eos is None else (eos,),
            pad_token_id=meta.get_int("tokenizer.ggml.padding_token_id"),
            dtype=dtype or "float32",
        )
    except (ValueError, NotImplementedError) as e:
        if isinstance(e, GGUFError):
            raise
        raise GGUFError(f"{meta.location!r}: metadata describes an invalid model: {e}") from e
    _check_shapes(config, shapes, arch, meta.location)
    return config


@functools.cache
def _can_dequantize(qtype: gguf.GGMLQuantizationType) -> bool:
    """Whether `gguf.quants.dequantize` handles `qtype` (tried on one zero block)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if qtype in (gguf.GGMLQuantizationType.F32, gguf.GGMLQuantizationType.F16):
        return True
    try:
        gguf.quants.dequantize(np.zeros((1, type_size), np.uint8), qtype)
    except NotImplementedError:
        return False
    return True


def _unpermute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `w.reshape(heads, 2, rows // heads // 2, ...).swapaxes(1, 2)`:
    back from interleaved RoPE pairs to HF's rotate-half layout (weights and biases)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


class GGUFSource:
    """The tensors of a GGUF file under HF names, dequantized to float32 one at a time."""

    def __init__(self, path_or_reader: str | os.PathLike[str] | gguf.GGUFReader,
                 config: ModelConfig | None = None) -> None:
        reader = path_or_reader if isinstance(path_or_reader, _GGUFReader) else open_gguf(path_or_reader)
        self._reader = reader
        self.location = _location(reader)
        self._tensors = {t.name: t for t in reader.tensors}
        self._config = config
        self._arch = _Metadata(reader).get("general.architecture")
        self._hf_to_gguf: dict[str, str] = {}
        for name in self._tensors:
            hf = hf_tensor_name(name)
            if hf is not None:
                self._hf_to_gguf[hf] = name
            elif name not in _EXTRA_TENSORS:
                self._hf_to_gguf[name] = name  # unknown: reported by load_tensors as unexpected

    def names(self) -> Iterable[str]:
        return self._hf_to_gguf.keys()

    def dequantized(self, gguf_name: str) -> np.ndarray:
        """One tensor by its llama.cpp name, float32, numpy order (reversed GGUF shape)."""
        tensor = self._tensors[gguf_name]
        qtype = tensor.tensor_type
        if not _can_dequantize(qtype):
            raise GGUFError(f"{self.location!r}: tensor {gguf_name!r} has type {qtype.name}, which "
                            "gguf.quants.dequantize does not support")
        shape = tuple(int(d) for d in reversed(tensor.shape.tolist()))
        try:
            values = gguf.quants.dequantize(tensor.data, qtype)
        except Exception as e:
            raise GGUFError(f"{self.location!r}: cannot dequantize tensor {gguf_name!r} "
                            f"({qtype.name}, shape {shape}): {e}") from e
        return np.asarray(values, np.float32).reshape(shape)

    def get(self, name: str) -> np.ndarray:
        gguf_name = self._hf_to_gguf[name]
        values = self.dequantized(gguf_name)
        if self._arch in _PERMUTED_ARCHS and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            config = self._config or config_from_gguf(self._reader)
            self._config = config
            heads = config.num_heads if ".attn_q." in gguf_name else config.num_kv_heads
            if values.shape[0] % (2 * heads):
                raise GGUFError(f"{self.location!r}: tensor {gguf_name!r} with {values.shape[0]} rows "
                                f"cannot hold {heads} heads of even size")
            values = _unpermute_rows(values, heads)
        return values


def from_gguf(path: str | os.PathLike[str], dtype: str | None = None, sharding: object | None = None
              ) -> nnx.Module:
    """Load a GGUF file (llama/Mistral, qwen2, qwen3) into the model `load_tensors` builds.

    dtype: parameter/compute dtype ("float32", "bfloat16", "float16"); default float32.
    """
    reader = open_gguf(path)
    config = config_from_gguf(reader, dtype=dtype)
    return load_tensors(config, GGUFSource(reader, config), sharding)
