"""ModelConfig: mapping HF config.json dicts, and rejecting inconsistent ones."""

from __future__ import annotations

import pytest

from efficient.models import ModelConfig, RopeConfig

BASE = dict(vocab_size=100, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=2, max_position_embeddings=128)


def test_llama_defaults_and_gqa() -> None:
    c = ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_theta": 500000.0})
    assert (c.num_heads, c.num_kv_heads, c.head_dim, c.group_size) == (8, 2, 8, 4)
    assert c.rope.theta == 500000.0 and c.rope.rope_type == "default"
    assert not c.qkv_bias and not c.qk_norm and not c.sliding_layers


def test_qwen2_has_qkv_bias_and_qwen3_has_qk_norm_and_explicit_head_dim() -> None:
    q2 = ModelConfig.from_hf({**BASE, "model_type": "qwen2"})
    assert q2.qkv_bias and not q2.o_bias
    q3 = ModelConfig.from_hf({**BASE, "model_type": "qwen3", "head_dim": 32})
    assert q3.qk_norm and q3.head_dim == 32


def test_mistral_sliding_window_applies_to_every_layer() -> None:
    c = ModelConfig.from_hf({**BASE, "model_type": "mistral", "sliding_window": 16})
    assert c.sliding_layers == (True,) * 4 and c.layer_window(2) == 16


def test_qwen2_sliding_layers_follow_max_window_layers_and_layer_types() -> None:
    c = ModelConfig.from_hf({**BASE, "model_type": "qwen2", "sliding_window": 8,
                             "use_sliding_window": True, "max_window_layers": 2})
    assert c.sliding_layers == (False, False, True, True)
    off = ModelConfig.from_hf({**BASE, "model_type": "qwen2", "sliding_window": 8})
    assert off.sliding_layers == () and off.layer_window(0) is None
    typed = ModelConfig.from_hf({**BASE, "model_type": "qwen3", "sliding_window": 8,
                                 "layer_types": ["full_attention", "sliding_attention"] * 2})
    assert typed.sliding_layers == (False, True, False, True)


def test_legacy_rope_scaling_and_new_rope_parameters_both_parse() -> None:
    legacy = ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_theta": 1e4,
                                  "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert legacy.rope.rope_type == "linear" and legacy.rope.factor == 2.0
    new = ModelConfig.from_hf({**BASE, "model_type": "llama", "rope_parameters": {
        "rope_type": "llama3", "rope_theta": 5e5, "factor": 8.0, "low_freq_factor": 1.0,
        "high_freq_factor": 4.0, "original_max_position_embeddings": 64}})
    assert new.rope == RopeConfig(theta=5e5, rope_type="llama3", factor=8.0,
                                  original_max_position_embeddings=64)


def test_eos_list_and_tied_embeddings() -> None:
    c = ModelConfig.from_hf({**BASE, "model_type": "llama", "eos_token_id": [2, 7],
                             "tie_word_embeddings": True})
    assert c.eos_token_ids == (2, 7) and c.tie_embeddings


@pytest.mark.parametrize(
    ("changes", "error", "match"),
    [
        ({"num_key_value_heads": 3}, ValueError, "num_heads=8 is not divisible by num_kv_heads=3"),
        ({"model_type": "gpt2"}, NotImplementedError, "unsupported model_type 'gpt2'"),
        ({"rope_scaling": {"rope_type": "longrope", "factor": 2.0}}, NotImplementedError, "longrope"),
        ({"hidden_size": 0}, ValueError, "hidden_size"),
        ({"vocab_size": None}, ValueError, "vocab_size"),
    ],
)
def test_inconsistent_configs_raise(changes: dict, error: type, match: str) -> None:
    hf = {**BASE, "model_type": "llama", **changes}
    with pytest.raises(error, match=match):
        ModelConfig.from_hf(hf)


def test_missing_required_key_is_named() -> None:
    hf = {k: v for k, v in BASE.items() if k != "intermediate_size"}
    with pytest.raises(ValueError, match="intermediate_size"):
        ModelConfig.from_hf({**hf, "model_type": "llama"})


def test_num_parameters_counts_the_model() -> None:
    from flax import nnx

    from efficient.models import LlamaModel

    for hf in ({**BASE, "model_type": "qwen2"}, {**BASE, "model_type": "qwen3", "tie_word_embeddings": True}):
        config = ModelConfig.from_hf(hf)
        model = LlamaModel(config, rngs=nnx.Rngs(0))
        actual = sum(x.size for x in __import__("jax").tree_util.tree_leaves(nnx.state(model, nnx.Param)))
        assert config.num_parameters() == actual


GEMMA3 = {**BASE, "model_type": "gemma3_text", "num_hidden_layers": 7, "head_dim": 16, "sliding_window": 32}


def test_gemma3_maps_pattern_ropes_and_scales() -> None:
    c = ModelConfig.from_hf({**GEMMA3, "rope_theta": 1e6, "rope_local_base_freq": 1e4,
                             "rope_scaling": {"rope_type": "linear", "factor": 8.0},
                             "final_logit_softcapping": 30.0})
    assert c.sliding_layers == (True,) * 5 + (False, True)  # 5 local : 1 global
    assert c.rope == RopeConfig(theta=1e6, rope_type="linear", factor=8.0)
    assert c.rope_local == RopeConfig(theta=1e4)
    assert c.layer_rope(0) == c.rope_local and c.layer_rope(5) == c.rope
    kinds, ids = c.layer_kinds()
    assert kinds == ((32, c.rope_local), (None, c.rope)) and ids == (0, 0, 0, 0, 0, 1, 0)
    assert c.qk_norm and c.tie_embeddings and c.activation == "gelu_tanh"
    assert (c.query_pre_attn_scalar, c.final_logit_softcapping, c.attn_logit_softcapping) == (256, 30.0, None)
    typed = ModelConfig.from_hf({**GEMMA3, "rope_parameters": {
        "full_attention": {"rope_type": "default", "rope_theta": 5e5},
        "sliding_attention": {"rope_type": "default", "rope_theta": 100.0}}})
    assert typed.rope.theta == 5e5 and typed.rope_local.theta == 100.0


def test_unsupported_model_type_names_the_supported_ones() -> None:
    with pytest.raises(NotImplementedError, match=r"unsupported model_type 'gemma2'.*'llama'.*'gemma3_text'"):
        ModelConfig.from_hf({**BASE, "model_type": "gemma2"})
    with pytest.raises(NotImplementedError, match="hidden_activation 'relu'"):
        ModelConfig.from_hf({**GEMMA3, "hidden_activation": "relu"})


def test_gemma3_num_parameters_counts_the_model() -> None:
    from flax import nnx

    from efficient.models import LlamaModel

    config = ModelConfig.from_hf({**GEMMA3, "num_hidden_layers": 2})
    model = LlamaModel(config, rngs=nnx.Rngs(0))
    actual = sum(x.size for x in __import__("jax").tree_util.tree_leaves(nnx.state(model, nnx.Param)))
    assert config.num_parameters() == actual
