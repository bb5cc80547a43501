"""Write small GGUF files from random-weight HF models, the way llama.cpp's
convert_hf_to_gguf.py does: llama.cpp tensor names, shapes listed ne0 first
(GGUFWriter reverses numpy shapes), Q/K rows permuted for the `llama` arch,
norms kept F32, llama3 rope as a `rope_freqs.weight` tensor, a gpt2-style
token list, and weights quantized with `gguf.quants.quantize` (plus a Q6_K
encoder here, since gguf-py cannot quantize K-quants).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from helpers.hf_models import BASE, FAMILIES

Q = gguf.GGMLQuantizationType
QK_K = 256

# HF module suffix -> llama.cpp block tensor (own table: independent of the loader's).
_BLOCK = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3"}


def build_model(family: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """`hf_models.FAMILIES[family]` with `overrides` (e.g. K-quant friendly dims), random weights."""
    import transformers

    spec = {**BASE, **FAMILIES[family], **overrides}
    model_type = spec.pop("model_type")
    config = transformers.AutoConfig.for_model(model_type, **spec)
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    with torch.no_grad():
        for name, param in model.named_parameters():
            param.normal_(1.0, 0.1) if name.endswith("norm.weight") else param.normal_(0.0, 0.25)
    return model.float().eval()


def gguf_name(hf_name: str) -> str:
    if hf_name in _GLOBAL:
        return _GLOBAL[hf_name]
    _, _, layer, rest = hf_name.split(".", 3)
    module, kind = rest.rsplit(".", 1)
    return f"blk.{layer}.{_BLOCK[module]}.{kind}"


def permute_rows(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's `LlamaModel.permute`: rotate-half pairs -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def quantize_q6_k(x: np.ndarray) -> np.ndarray:
    """A plain Q6_K encoder (ggml's block_q6_K layout: ql[128], qh[64], int8 scales[16], f16 d)."""
    rows, cols = x.shape
    sub = x.astype(np.float32).reshape(-1, 16, 16)  # [blocks, 16 sub-blocks, 16 values]
    s = np.abs(sub).max(-1) / 31
    d16 = (s.max(-1) / 127).astype(np.float16)
    d = d16.astype(np.float32)
    sc = np.clip(np.round(s / np.where(d > 0, d, 1)[:, None]), -128, 127).astype(np.int8)
    step = d[:, None] * sc
    q = np.clip(np.round(sub / np.where(step > 0, step, 1)[..., None]), -32, 31)
    u = (q.astype(np.int16) + 32).astype(np.uint8).reshape(-1, 2, 128)  # [blocks, half, 128]
    low = (u & 15).reshape(-1, 2, 2, 64)
    ql = (low[:, :, 0] | (low[:, :, 1] << 4)).reshape(-1, 128)
    high = (u >> 4).reshape(-1, 2, 4, 32)
    qh = (high[:, :, 0] | (high[:, :, 1] << 2) | (high[:, :, 2] << 4) | (high[:, :, 3] << 6)).reshape(-1, 64)
    blocks = np.concatenate([ql, qh, sc.view(np.uint8), d16.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(rows, cols // QK_K * 210)


def quantize(x: np.ndarray, qtype: Q) -> np.ndarray:
    return quantize_q6_k(x) if qtype == Q.Q6_K else gguf.quants.quantize(x, qtype)


def llama3_rope_factors(rope: dict[str, Any], theta: float, head_dim: int) -> np.ndarray:
    """llama.cpp's `rope_freqs` for rope_type llama3 (divisors of the base frequencies)."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    old = rope["original_max_position_embeddings"]
    freqs = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)
    out = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < old / high:
            out.append(1.0)
        elif wavelen > old / low:
            out.append(factor)
        else:
            smooth = (old / wavelen - low) / (high - low)
            out.append(1 / ((1 - smooth) / factor + smooth))
    return np.asarray(out, np.float32)


def _tokenizer(writer: gguf.GGUFWriter, vocab: int, config: Any) -> None:
    tokens = ["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(3, vocab)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens[:vocab])
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges([])
    writer.add_bos_token_id(config.bos_token_id)
    writer.add_eos_token_id(config.eos_token_id)
    writer.add_pad_token_id(config.pad_token_id)


def write_gguf(model: torch.nn.Module, path: Path, qtype: Q, *, name: str = "tiny",
               metadata: dict[str, Any] | None = None, drop: tuple[str, ...] = (),
               tensor_types: dict[str, Q] | None = None) -> Path:
    """`model` as a GGUF file: 2-D weights in `qtype` (F16 where a row is not a whole
    number of blocks, as llama.cpp falls back), 1-D tensors F32.

    metadata: extra or replacing key/values ({arch} is substituted; value None drops
    the key); drop: metadata keys to leave out; tensor_types: per-tensor type overrides.
    """
    c = model.config
    arch = _ARCH[c.model_type]
    head_dim = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
    kv: dict[str, Any] = {
        "general.name": name,
        "{arch}.block_count": c.num_hidden_layers,
        "{arch}.context_length": c.max_position_embeddings,
        "{arch}.embedding_length": c.hidden_size,
        "{arch}.feed_forward_length": c.intermediate_size,
        "{arch}.attention.head_count": c.num_attention_heads,
        "{arch}.attention.head_count_kv": c.num_key_value_heads,
        "{arch}.rope.freq_base": float(c.rope_parameters["rope_theta"]),
        "{arch}.attention.layer_norm_rms_epsilon": float(c.rms_norm_eps),
        "{arch}.rope.dimension_count": head_dim,
    }
    if arch == "llama":
        kv["{arch}.vocab_size"] = c.vocab_size
    if arch == "qwen3":
        kv["{arch}.attention.key_length"] = head_dim
        kv["{arch}.attention.value_length"] = head_dim
    rope = c.rope_parameters
    if rope.get("rope_type") == "linear":
        kv["{arch}.rope.scaling.type"] = "linear"
        kv["{arch}.rope.scaling.factor"] = float(rope["factor"])
    elif rope.get("rope_type") == "yarn":
        kv["{arch}.rope.scaling.type"] = "yarn"
        kv["{arch}.rope.scaling.factor"] = float(rope["factor"])
        kv["{arch}.rope.scaling.original_context_length"] = rope["original_max_position_embeddings"]
    kv.update(metadata or {})

    writer = gguf.GGUFWriter(path, kv.pop("general.architecture", arch))
    for key, value in kv.items():
        key = key.replace("{arch}", arch)
        if value is None or key in drop:
            continue
        if isinstance(value, str):
            writer.add_string(key, value)
        elif isinstance(value, float):
            writer.add_float32(key, value)
        else:
            writer.add_uint32(key, int(value))
    _tokenizer(writer, c.vocab_size, c)
    tensors = {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()
               if not k.endswith("rotary_emb.inv_freq")}
    if c.tie_word_embeddings:
        tensors.pop("lm_head.weight", None)
    if rope.get("rope_type") == "llama3":
        writer.add_tensor("rope_freqs.weight", llama3_rope_factors(rope, rope["rope_theta"], head_dim))
    for hf, w in tensors.items():
        target = gguf_name(hf)
        if arch == "llama" and (".attn_q." in target or ".attn_k." in target):
            heads = c.num_attention_heads if ".attn_q." in target else c.num_key_value_heads
            w = permute_rows(w, heads)
        wanted = (tensor_types or {}).get(target, qtype if w.ndim == 2 else Q.F32)
        block = gguf.GGML_QUANT_SIZES[wanted][0]
        if w.shape[-1] % block:
            wanted = Q.F16
        if wanted == Q.F32:
            writer.add_tensor(target, w)
        elif wanted == Q.F16:
            writer.add_tensor(target, w.astype(np.float16))
        elif wanted == Q.I32:
            writer.add_tensor(target, w.astype(np.int32))
        else:
            writer.add_tensor(target, quantize(w, wanted), raw_dtype=wanted)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
