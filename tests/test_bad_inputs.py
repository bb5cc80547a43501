"""Bad input across the public API raises a typed error naming the argument, before any
compilation (issue 13, "Reliability").

Each case asserts the exception type and that the message names the argument (and, where
it matters, the value). The first section pins the four silent wrong outputs the issue
found (a cache of another model, a cache factory giving too few slots, an infinite
temperature, float positions / an integer cache / float token ids): each used to return
garbage without an error. Everything here fails in validation, so nothing big compiles.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import TINY, tiny_model

from efficient.attention import AttentionSpec, DenseView, attention
from efficient.cache import DenseKVCache
from efficient.data import ByteTokenizer, GGUFTokenizer, HFTokenizer, load_tokenizer
from efficient.decoding import Sample, generate, sampling_from_dict, speculative_generate
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter
from efficient.decoding.verify import TypicalAcceptance
from efficient.models import (
    CheckpointError,
    GGUFError,
    ModelConfig,
    RopeConfig,
    config_from_gguf,
    forward,
    from_pretrained,
    jit_forward,
    load_config,
    save_pretrained,
    to_hf_config,
)

ROOT = Path(__file__).resolve().parents[1]
TOKENS = jnp.asarray([[1, 2, 3]], jnp.int32)
PROMPTS = [[1, 2, 3]]


def _cache(**changes: object) -> DenseKVCache:
    """A dense cache shaped for TINY (batch 1, capacity 8), with `changes` to its shape."""
    args = dict(num_layers=TINY.num_layers, batch_size=1, capacity=8, num_kv_heads=TINY.num_kv_heads,
                head_dim=TINY.head_dim)
    return DenseKVCache.init(**{**args, **changes})


def _factory(**changes: object) -> Callable[[ModelConfig, int, int], DenseKVCache]:
    """A cache factory that ignores what it is asked for and returns `_cache(**changes)`."""
    return lambda config, batch, capacity: _cache(**changes)


# --------------------------------------------------------------- the four silent wrong outputs


def test_silent_1_cache_with_fewer_layers_than_the_model_is_refused_by_forward() -> None:
    with pytest.raises(ValueError, match=r"forward: cache has layers \(num_layers\) 1, the model has 2"):
        forward(tiny_model(), TOKENS, cache=_cache(num_layers=1))


def test_silent_2_cache_factory_with_too_few_slots_is_refused() -> None:
    small = _factory(capacity=4)
    with pytest.raises(ValueError, match=r"generate: the cache factory returned a cache with capacity 4"):
        generate(tiny_model(), PROMPTS, max_new_tokens=8, cache=small)
    with pytest.raises(ValueError, match=r"speculative_generate: the cache factory .* capacity 4"):
        speculative_generate(tiny_model(), PROMPTS, drafter=PromptLookupDrafter.create(), max_new_tokens=8,
                             cache=small)


@pytest.mark.parametrize("temperature", [math.inf, -math.inf, math.nan])
def test_silent_3_non_finite_temperature_is_refused(temperature: float) -> None:
    with pytest.raises(ValueError, match="temperature"):
        Sample(temperature=temperature)


def test_silent_4_float_positions_integer_cache_and_float_ids_are_refused() -> None:
    with pytest.raises(TypeError, match="forward: positions must hold integers, got dtype float32"):
        forward(tiny_model(), TOKENS, positions=jnp.asarray([[0.0, 1.5, 2.0]]))
    with pytest.raises(ValueError, match="dtype must be a floating dtype.*int8"):
        DenseKVCache.for_model(TINY, 1, 8, dtype=jnp.int8)
    with pytest.raises(TypeError, match="ids: expected integer token ids, got float64"):
        ByteTokenizer().decode([65.7, 66.2])


# --------------------------------------------------------------- forward and jit_forward

FORWARD_CASES = [
    # (id, kwargs over forward(tiny_model(), TOKENS), error, match)
    ("model_config", dict(model=TINY), TypeError, r"model must be .*DecoderModel.*got ModelConfig"),
    ("model_none", dict(model=None), TypeError, "model must be .*got NoneType"),
    ("tokens_list", dict(tokens=[[1, 2, 3]]), TypeError, "tokens must be an integer jax or numpy array, got list"),
    ("tokens_float", dict(tokens=jnp.asarray([[1.0, 2.0]])), TypeError, "tokens must hold integers"),
    ("tokens_rank1", dict(tokens=jnp.asarray([1, 2], jnp.int32)), ValueError, "tokens must have rank 2"),
    ("tokens_out_of_vocab", dict(tokens=jnp.asarray([[1, 61]], jnp.int32)), ValueError, "tokens holds id 61"),
    ("tokens_empty", dict(tokens=jnp.zeros((1, 0), jnp.int32)), ValueError, "tokens is empty"),
    ("positions_float", dict(positions=jnp.asarray([[0.0, 1.0, 2.0]])), TypeError, "positions must hold integers"),
    ("positions_list", dict(positions=[[0, 1, 2]]), TypeError, "positions must be an integer jax or numpy array"),
    ("positions_shape", dict(positions=jnp.asarray([[0, 1]], jnp.int32)), ValueError, r"positions must have shape"),
    ("positions_past_max", dict(positions=jnp.asarray([[2046, 2047, 2048]], jnp.int32)), ValueError,
     "positions reach 2048, past the model's max_position_embeddings 2048"),
    ("cache_layers", dict(cache=_cache(num_layers=3)), ValueError, r"cache has layers \(num_layers\) 3"),
    ("cache_kv_heads", dict(cache=_cache(num_kv_heads=1)), ValueError, r"cache has KV heads \(num_kv_heads\) 1"),
    ("cache_head_dim", dict(cache=_cache(head_dim=4)), ValueError, r"cache has head size \(head_dim\) 4"),
    ("cache_batch", dict(cache=_cache(batch_size=2)), ValueError, "cache batch_size 2 != batch size 1"),
    ("cache_dict", dict(cache={"k": 0}), TypeError, "cache must be a KV cache.*got dict"),
    ("cache_full", dict(cache=_cache(capacity=2)), ValueError, "capacity 2"),
    ("skip_layers", dict(skip_layers=(5,)), ValueError, r"skip_layers: layer ids \[5\]"),
    ("logits_indices_range", dict(logits_indices=jnp.asarray([[3]], jnp.int32)), ValueError,
     r"logits_indices must lie in \[0, 3\)"),
    ("logits_indices_float", dict(logits_indices=jnp.asarray([[0.0]])), TypeError, "logits_indices must hold integers"),
    ("logits_indices_shape", dict(logits_indices=jnp.asarray([[0], [1]], jnp.int32)), ValueError,
     r"logits_indices must have shape \[1, I\]"),
    ("tree_mask_shape", dict(tree_mask=jnp.ones((1, 2, 2), bool)), ValueError, "tree_mask must be bool with shape"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in FORWARD_CASES], ids=[c[0] for c in FORWARD_CASES])
def test_forward_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"model": tiny_model(), "tokens": TOKENS, **kwargs}
    with pytest.raises(error, match=match):
        forward(args.pop("model"), args.pop("tokens"), **args)


def test_positions_past_the_limit_are_allowed_for_dynamic_rope_only_when_it_scales() -> None:
    """Dynamic NTK RoPE exists to run past max_position_embeddings: not refused."""
    dynamic = tiny_model(0, rope=RopeConfig(rope_type="dynamic", factor=2.0), max_position_embeddings=20)
    positions = jnp.asarray([[20, 21, 22]], jnp.int32)
    logits, _ = forward(dynamic, TOKENS, positions=positions)
    assert np.isfinite(np.asarray(logits)).all()
    with pytest.raises(ValueError, match="positions reach 22.*max_position_embeddings 20"):
        forward(tiny_model(0, max_position_embeddings=20), TOKENS, positions=positions)


JIT_FORWARD_CASES = [
    ("tokens_list", dict(tokens=[[1, 2]]), TypeError, "jit_forward: tokens must be an integer"),
    ("positions_float", dict(positions=jnp.asarray([[0.0, 1.0, 2.0]])), TypeError, "jit_forward: positions"),
    ("cache_layers", dict(cache=_cache(num_layers=1)), ValueError, "jit_forward: cache has layers"),
    ("cache_batch", dict(cache=_cache(batch_size=3)), ValueError, "jit_forward: cache batch_size 3"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in JIT_FORWARD_CASES],
                         ids=[c[0] for c in JIT_FORWARD_CASES])
def test_jit_forward_refuses_before_compiling(kwargs: dict, error: type[Exception], match: str) -> None:
    call = jit_forward(tiny_model())
    args = {"tokens": TOKENS, **kwargs}
    with pytest.raises(error, match=match):
        call(args.pop("tokens"), **args)


def test_jit_forward_without_value_checks_still_checks_types_and_the_cache() -> None:
    """check_values=False skips only the checks that read values (a host sync per call)."""
    call = jit_forward(tiny_model(), check_values=False)
    with pytest.raises(TypeError, match="jit_forward: tokens must hold integers"):
        call(jnp.asarray([[1.0, 2.0]]))
    with pytest.raises(ValueError, match="jit_forward: cache has layers"):
        call(TOKENS, cache=_cache(num_layers=1))
    with pytest.raises(TypeError, match="jit_forward: positions must hold integers"):
        call(TOKENS, positions=jnp.asarray([[0.0, 1.0, 2.0]]))
    checked = jit_forward(tiny_model())
    np.testing.assert_array_equal(np.asarray(call(TOKENS)[0]), np.asarray(checked(TOKENS)[0]))


def test_jit_forward_refuses_a_config() -> None:
    with pytest.raises(TypeError, match="jit_forward: model must be"):
        jit_forward(TINY)


# --------------------------------------------------------------- generate and speculative_generate

GENERATE_CASES = [
    ("model_none", dict(model=None), TypeError, "generate: model must be .*got NoneType"),
    ("model_config", dict(model=TINY), TypeError, "generate: model must be .*got ModelConfig"),
    ("sampling_str", dict(sampling="greedy"), TypeError, "generate: sampling must be Greedy.*got str 'greedy'"),
    ("sampling_none", dict(sampling=None), TypeError, "generate: sampling must be"),
    ("sampling_dict", dict(sampling={"kind": "greedy"}), TypeError, "generate: sampling must be"),
    ("cache_instance", dict(cache=_cache()), TypeError, "generate: cache must be a factory.*got DenseKVCache"),
    ("factory_layers", dict(cache=_factory(num_layers=1, capacity=64)), ValueError,
     r"generate: cache has layers \(num_layers\) 1"),
    ("factory_batch", dict(cache=_factory(batch_size=2, capacity=64)), ValueError, "generate: cache batch_size 2"),
    ("factory_not_a_cache", dict(cache=lambda config, batch, capacity: "cache"), TypeError,
     "generate: cache must be a KV cache.*got str"),
    ("capacity_zero", dict(capacity=0), ValueError, "capacity must be a positive int, got 0"),
    ("max_new_zero", dict(max_new_tokens=0), ValueError, "max_new_tokens"),
    ("stop_tokens_int", dict(stop_tokens=5), TypeError, "stop_tokens"),
    ("stop_token_out_of_vocab", dict(stop_tokens=[99]), ValueError, "stop token 99"),
    ("key_str", dict(key="seed"), TypeError, "key must be"),
    ("prompts_str", dict(prompts="hello"), TypeError, "prompts must be"),
    ("pad_id_out_of_vocab", dict(pad_id=99), ValueError, "pad_id 99"),
    ("prompt_lengths_float", dict(prompts=np.ones((1, 3), np.int32), prompt_lengths=[2.0]), TypeError,
     "lengths must be integers"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in GENERATE_CASES], ids=[c[0] for c in GENERATE_CASES])
def test_generate_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"model": tiny_model(), "prompts": PROMPTS, "max_new_tokens": 4, **kwargs}
    with pytest.raises(error, match=match):
        generate(args.pop("model"), args.pop("prompts"), **args)


SPECULATIVE_CASES = [
    ("model_none", dict(model=None), TypeError, "speculative_generate: model must be"),
    ("sampling_str", dict(sampling="greedy"), TypeError, "speculative_generate: sampling must be"),
    ("drafter_none", dict(drafter=None), TypeError, "drafter must implement"),
    ("typical_str", dict(typical="yes"), TypeError, "typical must be"),
    ("cache_instance", dict(cache=_cache()), TypeError, "speculative_generate: cache must be a factory"),
    ("factory_head_dim", dict(cache=_factory(head_dim=4, capacity=64)), ValueError,
     r"speculative_generate: cache has head size \(head_dim\) 4"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in SPECULATIVE_CASES],
                         ids=[c[0] for c in SPECULATIVE_CASES])
def test_speculative_generate_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"model": tiny_model(), "prompts": PROMPTS, "drafter": PromptLookupDrafter.create(), "max_new_tokens": 4,
            **kwargs}
    with pytest.raises(error, match=match):
        speculative_generate(args.pop("model"), args.pop("prompts"), **args)


def test_typical_acceptance_is_still_accepted_type() -> None:
    """The type check on `typical` does not refuse the real thing (sanity of the cases above)."""
    assert isinstance(TypicalAcceptance(), TypicalAcceptance)


# --------------------------------------------------------------- sampling rules

SAMPLE_CASES = [
    (dict(temperature=-0.5), ValueError, "temperature"),
    (dict(top_p=math.inf), ValueError, "top_p"),
    (dict(top_p=0.0), ValueError, "top_p"),
    (dict(top_p=math.nan), ValueError, "top_p"),
    (dict(top_k=-1), ValueError, "top_k"),
    (dict(min_p=math.nan), ValueError, "min_p"),
    (dict(min_p=1.0), ValueError, "min_p"),
    (dict(temperature="hot"), TypeError, "temperature"),
    (dict(temperature=True), TypeError, "temperature"),
    (dict(top_k=2.5), TypeError, "top_k"),
    (dict(top_k=True), TypeError, "top_k"),
    (dict(top_p=None), TypeError, "top_p"),
    (dict(min_p="0.1"), TypeError, "min_p"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), SAMPLE_CASES, ids=[f"{list(c[0])[0]}={c[0][list(c[0])[0]]!r}"
                                                                          for c in SAMPLE_CASES])
def test_sample_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        Sample(**kwargs)


def test_sample_normalises_numbers_to_python_types() -> None:
    rule = Sample(temperature=np.float32(0.5), top_k=np.int64(3))
    assert type(rule.temperature) is float and type(rule.top_k) is int
    assert rule == Sample(temperature=0.5, top_k=3) and hash(rule) == hash(Sample(temperature=0.5, top_k=3))


@pytest.mark.parametrize(("params", "match"), [({"kind": "beam"}, "beam"), ({"temprature": 0.7}, "temprature"),
                                               ({"kind": "greedy", "top_k": 3}, "top_k")])
def test_sampling_from_dict_refuses(params: dict, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        sampling_from_dict(params)


# --------------------------------------------------------------- caches

DENSE_CACHE_CASES = [
    (dict(dtype=jnp.int8), ValueError, "dtype must be a floating dtype"),
    (dict(dtype="int32"), ValueError, "dtype must be a floating dtype"),
    (dict(dtype=bool), ValueError, "dtype must be a floating dtype"),
    (dict(dtype="float33"), TypeError, "dtype must be a floating dtype, got 'float33'"),
    (dict(num_layers=True), ValueError, "num_layers must be a positive int"),
    (dict(capacity=0), ValueError, "capacity must be a positive int"),
]


@pytest.mark.parametrize(("changes", "error", "match"), DENSE_CACHE_CASES,
                         ids=[f"{k}={v!r}" for c in DENSE_CACHE_CASES for k, v in c[0].items()])
def test_dense_cache_init_refuses(changes: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        _cache(**changes)


def test_dense_cache_exposes_what_the_checks_read() -> None:
    cache = _cache(dtype=jnp.bfloat16)
    assert (cache.num_layers, cache.batch_size, cache.num_kv_heads, cache.capacity, cache.head_dim) == (2, 1, 2, 8, 8)
    assert cache.dtype == jnp.bfloat16  # a floating cache in another dtype than the model is allowed


# --------------------------------------------------------------- tokenizers

BYTE_CASES = [
    ("decode", [65.0], TypeError, "ids: expected integer token ids, got float64"),
    ("decode", None, TypeError, "ids: expected a sequence of integer token ids, got NoneType"),
    ("decode", b"AB", TypeError, "ids: expected a sequence .* got bytes"),
    ("decode", "AB", TypeError, "ids: expected a sequence .* got str"),
    ("decode", ["A"], TypeError, "ids: expected integer token ids"),
    ("decode", [True, False], TypeError, "ids: expected integer token ids, got bool"),
    ("decode", [300], ValueError, r"ids: 300 is outside the vocabulary \[0, 259\)"),
    ("decode", [-1], ValueError, "ids: -1 is outside"),
    ("num_bytes", [1.5], TypeError, "ids: expected integer token ids"),
    ("num_bytes", None, TypeError, "ids: expected a sequence"),
    ("encode", b"AB", TypeError, "text: expected a str, got bytes"),
    ("encode", None, TypeError, "text: expected a str, got NoneType"),
    ("encode", 65, TypeError, "text: expected a str, got int"),
    ("encode_array", b"AB", TypeError, "text: expected a str, got bytes"),
]


@pytest.mark.parametrize(("method", "value", "error", "match"), BYTE_CASES,
                         ids=[f"{c[0]}-{c[1]!r}" for c in BYTE_CASES])
def test_byte_tokenizer_refuses(method: str, value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        getattr(ByteTokenizer(), method)(value)


def test_byte_tokenizer_still_takes_arrays_and_empty_lists() -> None:
    tok = ByteTokenizer()
    assert tok.decode(np.asarray([72, 105], np.int32)) == "Hi" == tok.decode(jnp.asarray([72, 105]))
    assert tok.decode([]) == "" and tok.num_bytes([72, 256, 105]) == 2


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A 4-token WordLevel tokenizer.json (no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("word")
    raw = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize(("method", "value", "error", "match"), [
    ("decode", [0.5], TypeError, "ids: expected integer"),
    ("decode", None, TypeError, "ids: expected a sequence"),
    ("decode", [7], ValueError, r"ids: 7 is outside the vocabulary \[0, 4\)"),
    ("num_bytes", ["a"], TypeError, "ids: expected integer"),
    ("encode", b"a b", TypeError, "text: expected a str, got bytes"),
    ("encode", None, TypeError, "text: expected a str"),
])
def test_hf_tokenizer_refuses(word_tokenizer: HFTokenizer, method: str, value: object, error: type[Exception],
                              match: str) -> None:
    assert word_tokenizer.decode([0, 1]) == "a b"
    with pytest.raises(error, match=match):
        getattr(word_tokenizer, method)(value)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"model": 5}'], ids=["empty", "garbage", "list", "bad"])
def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"path: cannot read tokenizer file .*tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(word_tokenizer: HFTokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(word_tokenizer.path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*is not valid JSON"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_none_and_a_plain_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="folder: expected a path"):
        load_tokenizer(None)
    (tmp_path / "vocab.txt").write_text("a")
    with pytest.raises(ValueError, match=r"folder: .*vocab\.txt' is a file"):
        load_tokenizer(tmp_path / "vocab.txt")


GGUF_METADATA = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
                 "tokenizer.ggml.tokens": ["a", "b", "ab", "<|endoftext|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
                 "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize(("method", "value", "error", "match"), [
    ("decode", [1.5], TypeError, "ids: expected integers"),
    ("decode", None, TypeError, "ids: expected a sequence of ints"),
    ("decode", b"ab", TypeError, "ids: expected a sequence of ints, got bytes"),
    ("decode", [4], ValueError, r"ids: 4 is outside the vocabulary \[0, 4\)"),
    ("encode", b"ab", TypeError, "text: expected a str, got bytes"),
])
def test_gguf_tokenizer_refuses(method: str, value: object, error: type[Exception], match: str) -> None:
    tok = GGUFTokenizer(GGUF_METADATA)
    assert tok.decode(tok.encode("abab")) == "abab"
    with pytest.raises(error, match=match):
        getattr(tok, method)(value)


def test_gguf_tokenizer_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"path: no GGUF file at .*absent\.gguf"):
        GGUFTokenizer.from_file(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_bytes(b"plain text, not gguf")
    with pytest.raises(ValueError, match=r"path: .*text\.gguf' is not a GGUF file"):
        GGUFTokenizer.from_file(tmp_path / "text.gguf")
    with pytest.raises(ValueError, match="path: .*has no tokenizer metadata"):
        GGUFTokenizer({})


# --------------------------------------------------------------- loading checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(tiny_model(), folder)
    return folder


def _folder_with(tmp_path: Path, checkpoint: Path, **files: bytes | str) -> Path:
    """A copy of `checkpoint` with `files` (name -> content; "" names are removed) replaced."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    for name, content in files.items():
        name = name.replace("__", ".")
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return folder


CONFIG_CASES = [("empty", "", "is empty"), ("not_json", "{model_type: llama", "is not valid JSON"),
                ("list", "[1, 2]", "must hold a JSON object, got a JSON list"),
                ("string", '"llama"', "must hold a JSON object, got a JSON str"),
                ("missing_keys", '{"model_type": "llama"}', "does not describe a valid model.*lacks required keys")]


@pytest.mark.parametrize(("content", "match"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json_names_the_file(tmp_path: Path, checkpoint: Path, content: str, match: str) -> None:
    folder = _folder_with(tmp_path, checkpoint, config__json=content)
    with pytest.raises(CheckpointError, match=rf"config\.json' {match}"):
        from_pretrained(folder)


def test_model_config_from_hf_refuses_non_objects(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="hf must be a dict.*got list"):
        ModelConfig.from_hf([1, 2])
    (tmp_path / "c.json").write_text("nope")
    with pytest.raises(ValueError, match=r"path: .*c\.json' is not a valid JSON config file"):
        ModelConfig.from_hf_file(tmp_path / "c.json")


def test_garbage_safetensors_names_the_file(tmp_path: Path, checkpoint: Path) -> None:
    folder = _folder_with(tmp_path, checkpoint, model__safetensors=b"garbage" * 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is not a readable safetensors file"):
        from_pretrained(folder)


@pytest.mark.parametrize("keep", [100, -100], ids=["header", "data"])
def test_truncated_safetensors_names_the_file(tmp_path: Path, checkpoint: Path, keep: int) -> None:
    whole = (checkpoint / "model.safetensors").read_bytes()
    folder = _folder_with(tmp_path, checkpoint, model__safetensors=whole[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is not a readable safetensors file"):
        from_pretrained(folder)


INDEX_CASES = [("no_weight_map", json.dumps({"metadata": {}}), "has no 'weight_map' object"),
               ("weight_map_list", json.dumps({"weight_map": ["a"]}), "has no 'weight_map' object"),
               ("not_json", "{", "is not valid JSON"),
               ("missing_shard", json.dumps({"weight_map": {"model.norm.weight": "shard-2.safetensors"}}),
                r"names shard files that do not exist: \['shard-2.safetensors'\]")]


@pytest.mark.parametrize(("content", "match"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_bad_shard_index_names_the_file(tmp_path: Path, checkpoint: Path, content: str, match: str) -> None:
    folder = _folder_with(tmp_path, checkpoint, model__safetensors__index__json=content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json' {match}"):
        from_pretrained(folder)


def test_a_file_where_a_folder_is_expected(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint path .*config\.json' is a file; expected a folder"):
        load_config(checkpoint / "config.json")
    with pytest.raises(CheckpointError, match=r"expected an HF checkpoint folder or a \.gguf file.*config\.json"):
        from_pretrained(checkpoint / "config.json")
    with pytest.raises(TypeError, match="path: expected a checkpoint folder or .gguf file path"):
        from_pretrained(None)
    with pytest.raises(TypeError, match="path: expected a checkpoint folder path"):
        load_config(3)


def _tiny_gguf(path: Path) -> Path:
    """A small GGUF file (metadata and one tensor), written with the gguf package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("cut", ["header", "metadata", "tensor data"])
def test_truncated_gguf_names_the_file(tmp_path: Path, cut: str) -> None:
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    keep = {"header": 10, "metadata": 60, "tensor data": len(whole) - 64}[cut]
    (tmp_path / "cut.gguf").write_bytes(whole[:keep])
    with pytest.raises(GGUFError, match=r"cut\.gguf' is truncated or corrupt"):
        from_pretrained(tmp_path / "cut.gguf")


def test_non_gguf_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf" * 4)
    with pytest.raises(GGUFError, match=r"model\.gguf' is not a GGUF file"):
        from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(GGUFError, match=r"absent\.gguf' does not exist"):
        config_from_gguf(tmp_path / "absent.gguf")


# --------------------------------------------------------------- attention

Q = jnp.zeros((1, 2, 4, 8), jnp.float32)
VIEW = DenseView(k=jnp.zeros((1, 3, 2, 8)), v=jnp.zeros((1, 3, 2, 8)), positions=jnp.arange(3)[None])

ATTENTION_CASES = [
    ("spec_str", dict(spec="causal"), TypeError, "spec must be an AttentionSpec, got str"),
    ("view_tuple", dict(view=(VIEW.k, VIEW.v)), TypeError, "view must be a KV view.*got tuple"),
    ("q_list", dict(q=[[0.0]]), TypeError, "q must be a float array.*got list"),
    ("implementation_unknown", dict(implementation="nope"), ValueError, "unknown attention implementation 'nope'"),
    ("implementation_int", dict(implementation=5), TypeError, "implementation must be a name.*got 5"),
    ("implementation_empty", dict(implementation=()), ValueError, "implementation must name at least one"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), [c[1:] for c in ATTENTION_CASES],
                         ids=[c[0] for c in ATTENTION_CASES])
def test_attention_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    args = {"q": Q, "view": VIEW, **kwargs}
    with pytest.raises(error, match=match):
        attention(args.pop("q"), args.pop("view"), **args)


SPEC_CASES = [
    (dict(softcap=math.inf), ValueError, "softcap must be finite and > 0"),
    (dict(scale=math.inf), ValueError, "scale must be finite and > 0"),
    (dict(scale=0.0), ValueError, "scale must be finite and > 0"),
    (dict(softcap="3"), TypeError, "softcap must be a number"),
    (dict(window=0), ValueError, "window must be a positive int"),
    (dict(window=2.5), ValueError, "window must be a positive int"),
    (dict(causal="yes"), TypeError, "causal must be a bool"),
]


@pytest.mark.parametrize(("kwargs", "error", "match"), SPEC_CASES,
                         ids=[f"{k}={v!r}" for c in SPEC_CASES for k, v in c[0].items()])
def test_attention_spec_refuses(kwargs: dict, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=rf"AttentionSpec\.{match}"):
        AttentionSpec(**kwargs)


# --------------------------------------------------------------- experiment scripts


def test_run_and_train_import_in_one_process() -> None:
    """Importing a script defines no absl flag (both used to define --config)."""
    code = "import experiments.run, experiments.train; print('ok')"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


@pytest.mark.parametrize(("script", "config", "override", "key", "valid"), [
    ("run", "configs/quickstart.py", "--config.nosuch=1", "config.nosuch", "'model'"),
    ("train", "configs/train_draft.py", "--config.train.stepz=5", "config.train.stepz", "'steps'"),
])
def test_unknown_config_key_is_one_line_naming_it(script: str, config: str, override: str, key: str,
                                                  valid: str) -> None:
    done = subprocess.run([sys.executable, "-m", f"experiments.{script}", "--config", config, override],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 1 and len(lines) == 1, done.stderr[-2000:]
    assert f"unknown config key {key!r}" in lines[0] and valid in lines[0] and "Traceback" not in done.stderr


def test_config_flag_error_names_nested_keys_and_unloadable_files() -> None:
    from experiments.common import config_flag_error

    message = config_flag_error(["run", "--config=configs/quickstart.py", "--config.model.pth=x"])
    assert message is not None and "'config.model.pth'" in message and "'path'" in message
    assert config_flag_error(["run", "--config", "configs/quickstart.py", "--config.model.path=x"]) is None
    message = config_flag_error(["run", "--config", "configs/absent.py"])
    assert message is not None and "--config 'configs/absent.py' cannot be loaded" in message


# --------------------------------------------------------------- the greedy reference still holds


def test_valid_calls_still_run() -> None:
    """The checks refuse nothing valid: a cache that matches the model."""
    model = tiny_model()
    logits, cache = forward(model, TOKENS, cache=DenseKVCache.for_model(model.config, 1, 8))
    assert logits.shape == (1, 3, TINY.vocab_size) and int(cache.lengths[0]) == 3
