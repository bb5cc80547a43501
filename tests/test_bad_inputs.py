"""Bad input across the public API raises a typed error naming the argument, before any
compilation (issue 13, "Reliability").

Each case asserts the exception type and that the message names the argument (and, where
it matters, the value). The first section pins the four silent wrong outputs the issue
found (a cache of another model, a cache factory giving too few slots, an infinite
temperature, float positions / an integer cache / float token ids): each used to return
garbage without an error. Everything here fails in validation, so nothing big compiles.
Bad tokenizer and checkpoint files are in test_bad_files.py.
"""

from __future__ import annotations

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
from efficient.data import ByteTokenizer
from efficient.decoding import Sample, generate, sampling_from_dict, speculative_generate
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter
from efficient.decoding.verify import TypicalAcceptance
from efficient.models import ModelConfig, RopeConfig, forward, jit_forward

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
