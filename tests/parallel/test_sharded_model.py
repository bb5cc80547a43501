"""A sharded model gives what one device gives: forward logits, greedy `generate` on dense,
paged and quantized caches, speculative decoding; parameters load straight into their
shards; each device holds its share; the decode step never gathers the cache."""

from __future__ import annotations


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers.sharded import CONFIG
from flax import nnx

from efficient.cache import DenseKVCache
from efficient.decoding import Greedy, generate, speculative_generate
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter
from efficient.models import LlamaModel, forward, from_pretrained, jit_forward, save_pretrained
from efficient.parallel import DEFAULT_RULES, AxisRules, ModelSharding, cache_shardings, device_bytes, make_mesh, shard_model
from efficient.parallel.hlo import hlo_collectives
import efficient.variants  # noqa: F401  (registers the caches)
from efficient.registry import get_cache

MESHES = {"8x1": dict(data=8), "4x2": dict(data=4, model=2), "2x4": dict(data=2, model=4), "1x8": dict(model=8)}
PROMPTS = [[1, 2, 3, 4, 5, 1, 2, 3], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16], [3, 4, 3, 4, 3, 4],
           [5, 6], [9, 9, 9, 9, 9], [20, 21, 22, 23], [30, 31, 32, 30, 31]]


def _model() -> LlamaModel:
    """A fresh copy (sharding moves parameters in place) with scaled-up weights, so greedy
    outputs vary."""
    graphdef, state = nnx.split(LlamaModel(CONFIG, rngs=nnx.Rngs(0)))
    return nnx.merge(graphdef, jax.tree.map(lambda x: x * 4.0 if x.ndim >= 2 else x, state))


@pytest.fixture(scope="module")
def reference() -> dict[str, object]:
    model = _model()
    tokens = jnp.asarray(np.random.RandomState(0).randint(1, 64, size=(8, 12)), jnp.int32)
    cache = DenseKVCache.for_model(CONFIG, 8, 16)
    prefill, cache = forward(model, tokens[:, :11], cache=cache)
    step, _ = forward(model, tokens[:, 11:], cache=cache)
    return {"tokens": tokens, "logits": np.concatenate([prefill, step], axis=1),
            "greedy": generate(model, PROMPTS, max_new_tokens=10).sequences()}


def _spec(x: jax.Array) -> tuple:
    """The array's partition spec padded with None to its rank (jax drops trailing Nones)."""
    spec = tuple(x.sharding.spec)
    return spec + (None,) * (x.ndim - len(spec))


def _prefill_then_step(model: LlamaModel, tokens: jax.Array, cache: DenseKVCache) -> tuple:
    run = jit_forward(model)
    prefill, cache = run(tokens[:, :11], cache=cache)
    step, cache = run(tokens[:, 11:], cache=cache)
    return jnp.concatenate([prefill, step], axis=1), cache


@pytest.mark.parametrize("mesh_name", list(MESHES))
def test_forward_equals_one_device_on_every_mesh(mesh_name: str, reference: dict) -> None:
    model = shard_model(_model(), make_mesh(**MESHES[mesh_name]))
    cache = DenseKVCache.for_model(CONFIG, 8, 16)
    logits, cache = _prefill_then_step(model, reference["tokens"], cache)
    np.testing.assert_allclose(np.asarray(logits), reference["logits"], atol=2e-5, rtol=2e-5)
    data, heads = MESHES[mesh_name].get("data", 1), MESHES[mesh_name].get("model", 1)
    expected = (None, "data" if data > 1 else None, "model" if 1 < heads <= 4 else None, None, None)
    assert _spec(cache.k) == expected  # the cache came out split, not gathered
    assert _spec(model.layers.self_attn.q_proj.kernel[...]) == (None, None, "model" if heads > 1 else None)


@pytest.mark.parametrize(("mesh_name", "cache_name"), [("4x2", "dense"), ("1x8", "dense"), ("2x4", "paged"),
                                                       ("4x2", "kivi4")])
def test_generate_greedy_equals_one_device(mesh_name: str, cache_name: str, reference: dict) -> None:
    model = shard_model(_model(), make_mesh(**MESHES[mesh_name]))
    factory = get_cache(cache_name).factory
    expected = reference["greedy"] if cache_name != "kivi4" else \
        generate(_model(), PROMPTS, max_new_tokens=10, cache=factory).sequences()
    out = generate(model, PROMPTS, max_new_tokens=10, cache=factory)
    assert out.sequences() == expected


def test_speculative_decoding_under_a_mesh_equals_greedy(reference: dict) -> None:
    model = shard_model(_model(), make_mesh(data=2, model=4))
    out = speculative_generate(model, PROMPTS, drafter=PromptLookupDrafter.create(length=4), max_new_tokens=10,
                               sampling=Greedy())
    assert out.sequences() == reference["greedy"]


def test_parameters_load_straight_into_shards_and_split_memory(tmp_path, reference: dict) -> None:  # noqa: ANN001
    save_pretrained(_model(), tmp_path)
    mesh = make_mesh(data=2, model=4)
    model = from_pretrained(tmp_path, sharding=ModelSharding(mesh))
    assert _spec(model.layers.mlp.down_proj.kernel[...]) == (None, "model", None)
    assert _spec(model.embed_tokens.embedding[...]) == ("model", None)  # vocabulary-parallel
    params = nnx.state(model, nnx.Param)
    total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(params))
    per_device = device_bytes(params)
    assert len(per_device) == 8
    # Only the norm weights are replicated: each device holds a quarter, within 10%.
    assert max(per_device.values()) <= 1.1 * total / 4, (per_device, total)
    logits, _ = jit_forward(model)(reference["tokens"])
    np.testing.assert_allclose(np.asarray(logits)[:, :11], reference["logits"][:, :11], atol=2e-5, rtol=2e-5)


def test_decode_step_never_gathers_the_cache() -> None:
    """The compiled decode step of a batch- and head-split model holds no all-gather as
    large as a layer's share of the cache (only activations are gathered)."""
    mesh = make_mesh(data=2, model=4)
    model = shard_model(_model(), mesh)
    cache = DenseKVCache.for_model(CONFIG, 8, 256)
    cache = jax.device_put(cache, cache_shardings(cache, model.sharding))
    tokens = jnp.ones((8, 1), jnp.int32)
    graphdef, params = nnx.split(model)
    step = jax.jit(lambda p, t, c: forward(nnx.merge(graphdef, p), t, cache=c))
    hlo = step.lower(params, tokens, cache).compile().as_text()
    gathered = hlo_collectives(hlo)["bytes"]["all-gather"]
    layer_share = 4 * 8 * 4 * 256 * 8 // 8  # bytes of one layer's float32 keys [B, K, S, H] over 8 devices
    assert all(size < layer_share for size in gathered), gathered


@pytest.mark.parametrize(("mesh_shape", "method"), [(dict(data=2, sequence=4), "ring"),
                                                    (dict(model=2, sequence=4), "ring"),
                                                    (dict(model=2, sequence=2, data=2), "ulysses")])
def test_a_sequence_rule_prefills_with_ring_attention_or_ulysses(mesh_shape: dict, method: str,
                                                                 reference: dict) -> None:
    """Tokens split over "sequence": the prefill's attention is ring attention (its
    collective-permutes are in the compiled program) or Ulysses (its all-to-alls), logits and
    greedy tokens as one device's."""
    rules = AxisRules.of({**DEFAULT_RULES, "seq": "sequence"})
    model = shard_model(_model(), ModelSharding(make_mesh(**mesh_shape), rules, sequence_parallel=method))
    graphdef, params = nnx.split(model)
    prefill = jax.jit(lambda p, t: forward(nnx.merge(graphdef, p), t)[0])
    tokens = reference["tokens"][:, :8]
    op = "collective-permute" if method == "ring" else "all-to-all"
    assert op in prefill.lower(params, tokens).compile().as_text()
    want, _ = forward(_model(), tokens)
    np.testing.assert_allclose(np.asarray(prefill(params, tokens)), np.asarray(want), atol=2e-5, rtol=2e-5)
    assert generate(model, PROMPTS, max_new_tokens=10).sequences() == reference["greedy"]
