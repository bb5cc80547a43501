"""Layers under one `lax.scan`: stacked parameters, traced skip gates, flat program size in depth."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers.tiny import TINY, tiny_model

from efficient.cache import DenseKVCache
from efficient.models import LlamaModel, forward

TOKENS = jnp.asarray(np.random.RandomState(0).randint(3, 61, size=(2, 7)))


def test_layer_parameters_are_stacked_and_differ_per_layer() -> None:
    model = tiny_model()
    kernel = model.layers.self_attn.q_proj.kernel[...]
    assert kernel.shape == (TINY.num_layers, TINY.hidden_size, TINY.num_heads * TINY.head_dim)
    assert not np.allclose(kernel[0], kernel[1])  # split rngs: each layer its own init
    assert model.layers.input_layernorm.weight[...].shape == (TINY.num_layers, TINY.hidden_size)


def test_program_size_is_flat_in_depth() -> None:
    """The traced forward has the same number of equations for 2 and 6 layers (one scan body)."""

    def size(num_layers: int) -> int:
        model = LlamaModel(TINY.replace(num_layers=num_layers), rngs=nnx.Rngs(0))
        graphdef, params = nnx.split(model)
        jaxpr = jax.make_jaxpr(lambda p: forward(nnx.merge(graphdef, p), TOKENS)[0])(params)
        return len(jaxpr.jaxpr.eqns)

    assert size(2) == size(6)


def test_skip_mask_equals_skip_ids_and_does_not_retrace() -> None:
    model = tiny_model()
    by_ids, _ = forward(model, TOKENS, skip_layers=(1,))
    full, _ = forward(model, TOKENS)
    graphdef, params = nnx.split(model)
    traces = []

    @jax.jit
    def run(params: nnx.State, skip: jax.Array) -> jax.Array:
        traces.append(1)
        return forward(nnx.merge(graphdef, params), TOKENS, skip_layers=skip)[0]

    by_mask = run(params, jnp.asarray([False, True]))
    none_skipped = run(params, jnp.asarray([False, False]))
    assert len(traces) == 1
    np.testing.assert_allclose(np.asarray(by_mask), np.asarray(by_ids), atol=1e-5)
    np.testing.assert_allclose(np.asarray(none_skipped), np.asarray(full), atol=1e-5)
    assert not np.allclose(np.asarray(by_ids), np.asarray(full))


def test_skipped_layer_does_not_write_the_cache() -> None:
    model = tiny_model()
    cache = DenseKVCache.for_model(model.config, batch_size=2, capacity=8)
    _, cache = forward(model, TOKENS, cache=cache, skip_layers=jnp.asarray([False, True]))
    k = np.asarray(cache.k)
    assert np.abs(k[0, :, :7]).max() > 0 and np.abs(k[1]).max() == 0


@pytest.mark.parametrize("skip", [(2,), jnp.zeros((3,), jnp.bool_), jnp.zeros((2,), jnp.int32)])
def test_bad_skip_layers_raise(skip: object) -> None:
    with pytest.raises(ValueError, match="skip_layers"):
        forward(tiny_model(), TOKENS, skip_layers=skip)


def _copy(model: LlamaModel) -> LlamaModel:
    return nnx.merge(*nnx.split(model))


def test_unrolled_layers_equal_the_scan_on_a_hybrid_model() -> None:
    """Gemma 3's 5:1 local/global kinds (static per layer when unrolled), a hybrid cache
    (ring for local layers), prefill then decode, and skip gates."""
    from cache.test_hybrid_cache import gemma3

    from efficient.cache import HybridKVCache
    from efficient.models import fit_cache_to_layers, set_layer_loop, unstack_layers

    stacked = gemma3()
    unrolled = set_layer_loop(_copy(stacked), "unrolled")
    assert isinstance(unrolled.layers, nnx.List) and len(unrolled.layers) == stacked.config.num_layers
    assert unstack_layers(unrolled) is unrolled  # idempotent
    tokens = jnp.asarray(np.random.RandomState(1).randint(3, 61, size=(2, 9)))

    def run(params: nnx.State, tokens: jax.Array, graphdef: nnx.GraphDef) -> tuple[jax.Array, ...]:
        model = nnx.merge(graphdef, params)
        # Unrolled: per-layer ring and dense buffers (static layer writes); scan: stacked.
        cache = fit_cache_to_layers(model, HybridKVCache.for_model(model.config, batch_size=2, capacity=16))
        assert cache.per_layer == isinstance(model.layers, nnx.List)
        prefill, cache = forward(model, tokens[:, :8], cache=cache)
        step, cache = forward(model, tokens[:, 8:], cache=cache)
        skipped, _ = forward(model, tokens, skip_layers=jnp.arange(7) % 4 == 1)
        return prefill, step, skipped

    outs = []
    for model in (stacked, unrolled):
        graphdef, params = nnx.split(model)
        outs.append(jax.jit(run, static_argnums=2)(params, tokens, graphdef))
    for a, b in zip(*outs, strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)
    # The unrolled program grows with depth; the scan's does not (test above).
    graphdef, params = nnx.split(unrolled)
    jaxpr = jax.make_jaxpr(lambda p: forward(nnx.merge(graphdef, p), TOKENS)[0])(params)
    assert not any(eqn.primitive.name == "scan" for eqn in jaxpr.jaxpr.eqns)


def test_unrolled_layers_evaluate_the_rope_tables_once() -> None:
    """cos and sin are computed once per forward of a 64-token chunk, not fused into every
    layer's rotation (what XLA:CPU did for unrolled layers); an all-padding chunk gets zero
    tables and its output is still finite. A one-token step keeps no conditional."""
    from efficient.models import unstack_layers

    model = unstack_layers(_copy(tiny_model()))
    graphdef, params = nnx.split(model)
    run = jax.jit(lambda p, t, pos: forward(nnx.merge(graphdef, p), t, positions=pos)[0])
    tokens = jnp.asarray(np.random.RandomState(2).randint(3, 61, size=(2, 64)))
    positions = jnp.broadcast_to(jnp.arange(64), tokens.shape)
    hlo = run.lower(params, tokens, positions).compile().as_text()
    assert hlo.count(" cosine(") == 1 and hlo.count(" sine(") == 1
    padding = run(params, tokens, jnp.full_like(positions, -1))
    assert np.isfinite(np.asarray(padding)).all()
    step = run.lower(params, tokens[:, :1], positions[:, :1]).compile().as_text()
    assert " conditional(" not in step


def test_unrolled_generate_gives_the_same_tokens() -> None:
    from efficient.decoding import generate
    from efficient.models import unstack_layers

    model = tiny_model()
    prompts = np.asarray(TOKENS)
    stacked = generate(model, prompts, max_new_tokens=5, capacity=16, stop_tokens=()).tokens
    unrolled = generate(unstack_layers(_copy(model)), prompts, max_new_tokens=5, capacity=16, stop_tokens=()).tokens
    np.testing.assert_array_equal(np.asarray(stacked), np.asarray(unrolled))


def test_unrolled_speculative_decoding_with_per_layer_cache_buffers_equals_greedy() -> None:
    """Prompt lookup drafts, the verifier truncates and compacts (select) a cache that
    `speculative_generate` split into per-layer buffers for the unrolled model."""
    from efficient.decoding import generate
    from efficient.decoding.drafters import PromptLookupDrafter
    from efficient.decoding.speculative import speculative_generate
    from efficient.models import unstack_layers

    model = tiny_model()
    prompts = [[5, 6, 7, 8, 5, 6, 7, 8, 5, 6], [9, 10, 11, 9, 10, 11, 9]]
    greedy = generate(model, prompts, max_new_tokens=8, capacity=32, stop_tokens=()).sequences()
    unrolled = unstack_layers(_copy(model))
    drafted = speculative_generate(unrolled, prompts, drafter=PromptLookupDrafter.create(length=2),
                                   max_new_tokens=8, capacity=32, stop_tokens=()).sequences()
    assert drafted == greedy


def test_cache_storage_follows_the_layer_loop() -> None:
    """`fit_cache_to_layers`: per-layer buffers for an unrolled model, stacked for a scanned
    one; a scanned forward refuses per-layer buffers, naming the fix."""
    from efficient.models import fit_cache_to_layers, unstack_layers

    model = tiny_model()
    cache = DenseKVCache.for_model(model.config, 2, 16)
    unrolled = unstack_layers(_copy(model))
    split = fit_cache_to_layers(unrolled, cache)
    assert split.per_layer and fit_cache_to_layers(unrolled, split) is split
    assert not fit_cache_to_layers(model, split).per_layer and fit_cache_to_layers(model, cache) is cache
    with pytest.raises(ValueError, match=r"per-layer buffers.*stack_layers"):
        forward(model, TOKENS, cache=split)
    a, _ = forward(model, TOKENS, cache=cache)
    b, _ = forward(unrolled, TOKENS, cache=split)
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-5)


def test_bad_layer_loop_raises() -> None:
    from efficient.models import set_layer_loop, unstack_layers

    with pytest.raises(ValueError, match=r"layer_loop must be one of .*'scan'.*got 'unroll'"):
        set_layer_loop(tiny_model(), "unroll")
    with pytest.raises(ValueError, match="layer_loop='scan' needs stacked layers"):
        set_layer_loop(unstack_layers(_copy(tiny_model())), "scan")


def test_unrolled_model_saves_the_same_checkpoint(tmp_path) -> None:  # noqa: ANN001
    from safetensors.numpy import load_file

    from efficient.models import save_pretrained, unstack_layers

    model = tiny_model()
    save_pretrained(model, tmp_path / "stacked")
    save_pretrained(unstack_layers(_copy(model)), tmp_path / "unrolled")
    stacked, unrolled = (load_file(str(tmp_path / name / "model.safetensors")) for name in ("stacked", "unrolled"))
    assert stacked.keys() == unrolled.keys()
    for name, value in stacked.items():
        np.testing.assert_array_equal(value, unrolled[name])
