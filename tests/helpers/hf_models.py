"""Small random-weight Hugging Face models of each supported family, saved to disk."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

FAMILIES: dict[str, dict[str, Any]] = {
    # Llama 3 style: GQA 4:2, untied, llama3 rope scaling.
    "llama3": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 32},
        rope_theta=500000.0,
    ),
    # Llama 2 style: MHA, linear rope scaling, tied embeddings.
    "llama2_linear_tied": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=4,
        rope_scaling={"rope_type": "linear", "factor": 2.0}, tie_word_embeddings=True,
    ),
    # MQA with dynamic NTK scaling: max_position 16 < the test lengths, so it kicks in.
    "llama_dynamic_mqa": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=16,
        rope_scaling={"rope_type": "dynamic", "factor": 2.0},
    ),
    "llama_yarn": dict(
        model_type="llama", num_attention_heads=4, num_key_value_heads=2,
        rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    # Mistral with a sliding window shorter than the test sequences.
    "mistral_window": dict(model_type="mistral", num_attention_heads=4, num_key_value_heads=2,
                           sliding_window=5),
    "qwen2_bias": dict(model_type="qwen2", num_attention_heads=4, num_key_value_heads=2,
                       tie_word_embeddings=True),
    # Qwen3: q/k norm and an explicit head_dim different from hidden/heads.
    "qwen3_qknorm": dict(model_type="qwen3", num_attention_heads=4, num_key_value_heads=2, head_dim=12),
    # Gemma 3 text, one (sliding) layer: legacy rope keys, query scale 12**-0.5, and an
    # attn_logit_softcapping that transformers ignores for Gemma 3 (so must we).
    "gemma3_1layer": dict(model_type="gemma3_text", num_hidden_layers=1, num_attention_heads=4,
                          num_key_value_heads=2, head_dim=8, query_pre_attn_scalar=12, sliding_window=5,
                          rope_theta=10000.0, rope_local_base_freq=100.0, attn_logit_softcapping=5.0),
    # Gemma 3 text, 7 layers: the default 5 local : 1 global pattern (layer 5 global), window 5,
    # linear-scaled global rope, local base 100, final logit soft-capping, MQA.
    "gemma3_7layer": dict(model_type="gemma3_text", num_hidden_layers=7, num_attention_heads=4,
                          num_key_value_heads=1, head_dim=8, query_pre_attn_scalar=8, sliding_window=5,
                          rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 100.0},
                                           "full_attention": {"rope_type": "linear", "factor": 2.0,
                                                              "rope_theta": 10000.0}},
                          final_logit_softcapping=3.0),
}

# Families compared within ATOL * max|logit| (Gemma's scaled embeddings make logits large).
RELATIVE_TOLERANCE = ("gemma3_1layer", "gemma3_7layer")

BASE = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
            max_position_embeddings=64, rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
            pad_token_id=0)


def build_hf_model(family: str, seed: int = 0) -> torch.nn.Module:
    import transformers

    spec = dict(FAMILIES[family])
    model_type = spec.pop("model_type")
    config_cls = transformers.AutoConfig.for_model(model_type).__class__
    config = config_cls(**{**BASE, **spec})
    config._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager")
    # Random weights with a larger scale than the init so the test is not trivial.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.normal_(1.0, 0.1)
            else:
                param.normal_(0.0, 0.25)
    return model.float().eval()


def save_hf_model(family: str, folder: Path, seed: int = 0) -> torch.nn.Module:
    model = build_hf_model(family, seed)
    model.save_pretrained(folder, safe_serialization=True)
    return model
