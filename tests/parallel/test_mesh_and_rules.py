"""Mesh construction, logical-axis rules and the sharding of every cache layout."""

from __future__ import annotations

import jax
import pytest
from helpers.sharded import CONFIG
from jax.sharding import PartitionSpec as P

from efficient.cache import DenseKVCache
from efficient.parallel import AxisRules, ModelSharding, cache_shardings, make_mesh, param_axes, shard_model
import efficient.variants  # noqa: F401  (registers the caches)
from efficient.registry import get_cache



def test_mesh_must_use_every_device() -> None:
    with pytest.raises(ValueError, match=r"data=3 x model=1 x sequence=1 = 3 devices, but 8"):
        make_mesh(data=3)
    with pytest.raises(ValueError, match="model must be a positive int"):
        make_mesh(data=8, model=0)
    assert make_mesh(data=2, model=2, sequence=2).shape == {"data": 2, "model": 2, "sequence": 2}


def test_rules_naming_a_missing_axis_or_unknown_logical_axis_are_refused() -> None:
    with pytest.raises(ValueError, match=r"mesh axes \['pipeline'\]"):
        ModelSharding(make_mesh(data=8), AxisRules.of({"batch": "pipeline"}))
    with pytest.raises(ValueError, match=r"unknown logical axes \['tokens'\]"):
        AxisRules.of({"tokens": "sequence"})
    with pytest.raises(TypeError, match="mesh must be a jax.sharding.Mesh"):
        ModelSharding("2x4")
    with pytest.raises(ValueError, match="sequence_parallel must be 'ring' or 'ulysses', got 'tree'"):
        ModelSharding(make_mesh(sequence=8), sequence_parallel="tree")
    with pytest.raises(TypeError, match="shard_model: model must be an efficient.models.DecoderModel"):
        shard_model(CONFIG, make_mesh(data=8))


def test_megatron_parameter_axes() -> None:
    assert param_axes(("layers", "self_attn", "q_proj", "kernel"), 3) == ("layers", "embed", "heads")
    assert param_axes(("layers", "self_attn", "k_proj", "bias"), 2) == ("layers", "kv_heads")
    assert param_axes(("layers", "self_attn", "o_proj", "kernel"), 3) == ("layers", "heads", "embed")
    assert param_axes(("layers", "mlp", "down_proj", "kernel"), 3) == ("layers", "mlp", "embed")
    assert param_axes(("layers", 3, "mlp", "gate_proj", "kernel"), 2) == ("embed", "mlp")  # unstacked
    assert param_axes(("embed_tokens", "embedding"), 2) == ("vocab", "embed")
    assert param_axes(("lm_head", "kernel"), 2) == ("embed", "vocab")
    assert param_axes(("layers", "input_layernorm", "weight"), 2) == (None, None)


def test_a_dimension_is_split_only_on_whole_units() -> None:
    sharding = ModelSharding(make_mesh(data=2, model=4))
    # 4 KV heads of 8 channels on a model axis of 4: one head per device.
    assert sharding.spec(("embed", "kv_heads"), (32, 32), {"kv_heads": 4}) == P(None, "model")
    # 3 KV heads: 24 channels divide by 4, heads do not: replicated, no head cut in two.
    assert sharding.spec(("embed", "kv_heads"), (32, 24), {"kv_heads": 3}) == P(None, None)
    # A mesh axis serves one dimension only; batch 3 does not divide data=2.
    assert sharding.spec(("heads", "heads"), (8, 8)) == P("model", None)
    assert sharding.spec(("batch", "seq", "embed"), (3, 5, 32)) == P(None, None, None)


@pytest.mark.parametrize("name", ["dense", "paged", "kivi4", "quest", "h2o"])
def test_caches_are_split_by_batch_and_kv_heads(name: str) -> None:
    """The rule reads each field's jaxtyping letters: B on "data", K on "model"."""
    sharding = ModelSharding(make_mesh(data=2, model=4))
    cache = jax.eval_shape(lambda: get_cache(name).factory(CONFIG, 4, 256))
    specs = jax.tree.leaves(cache_shardings(cache, sharding), is_leaf=lambda x: isinstance(x, jax.sharding.Sharding))
    leaves = jax.tree.leaves(cache)
    assert len(specs) == len(leaves)
    split = [s.spec for s in specs]
    assert any("model" in spec for spec in split), split  # KV heads
    assert any("data" in spec for spec in split), split  # rows
    for leaf, sharding_ in zip(leaves, specs, strict=True):  # every split is even
        for size, axis in zip(leaf.shape, sharding_.spec, strict=False):
            if axis is not None:
                assert size % sharding.mesh.shape[axis] == 0


def test_dense_cache_layout_stacked_and_per_layer() -> None:
    sharding = ModelSharding(make_mesh(data=2, model=4))
    cache = DenseKVCache.for_model(CONFIG, 4, 16)
    specs = cache_shardings(cache, sharding)
    assert specs.k.spec == P(None, "data", "model", None, None)
    assert specs.positions.spec == P("data", None)
    assert specs.lengths.spec == P("data")
    split = cache_shardings(cache.split_layers(), sharding)
    assert [s.spec for s in split.k] == [P("data", "model", None, None)] * CONFIG.num_layers
    placed = jax.device_put(cache, specs)
    assert placed.k.addressable_shards[0].data.shape == (2, 2, 1, 16, 8)  # [L, B/2, K/4, S, H]
