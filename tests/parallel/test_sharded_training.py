"""Data-parallel and FSDP training steps equal one device's; orbax saves and restores a
sharded run in its shards."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from helpers.sharded import CONFIG
from flax import nnx

from efficient.models import LlamaModel
from efficient.parallel import FSDP_RULES, AxisRules, ModelSharding, make_mesh, place_params
from efficient.train.checkpoint import Checkpointer
from efficient.train.step import make_train_fns

# SGD with momentum, not Adam: an update linear in the gradient keeps the sharded run's
# reduction-order rounding at rounding size, where Adam's g / sqrt(v) blows it up for
# coordinates whose gradient is itself near rounding size (a 1.1e-5 parameter difference
# after two AdamW steps, on 1 of 2048 coordinates, in one CI-like run). The momentum
# trace still gives orbax an optimizer state to restore into its shards.
OPTIMIZER = optax.sgd(1e-1, momentum=0.9)


def _params() -> nnx.State:
    return nnx.split(LlamaModel(CONFIG, rngs=nnx.Rngs(0)))[1]


def _windows() -> jax.Array:
    return jnp.asarray(np.random.RandomState(0).randint(0, 64, size=(8, 17)), jnp.int32)


def _train(sharding: ModelSharding | None, steps: int = 2) -> tuple[list[float], nnx.State]:
    fns = make_train_fns(CONFIG, OPTIMIZER, "float32", sharding=sharding)
    params = _params() if sharding is None else place_params(_params(), CONFIG, sharding)
    opt_state = OPTIMIZER.init(params)
    losses = []
    for _ in range(steps):
        params, opt_state, metrics = fns.step(params, opt_state, _windows())
        losses.append(float(metrics["loss"]))
    return losses, params


@pytest.fixture(scope="module")
def one_device() -> tuple[list[float], nnx.State]:
    return _train(None)


@pytest.mark.parametrize(("mesh_shape", "rules"), [(dict(data=8), None), (dict(data=4, model=2), FSDP_RULES)],
                         ids=["data-parallel 8", "fsdp 4x2"])
def test_sharded_train_steps_equal_one_device(mesh_shape: dict, rules: dict | None, one_device: tuple) -> None:
    sharding = ModelSharding(make_mesh(**mesh_shape), AxisRules.of(rules))
    losses, params = _train(sharding)
    np.testing.assert_allclose(losses, one_device[0], rtol=1e-5)
    for got, want in zip(jax.tree.leaves(params), jax.tree.leaves(one_device[1]), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    kernel = params["layers"]["mlp"]["gate_proj"]["kernel"][...]
    expected = (None, "data", "model") if rules else ()
    assert tuple(kernel.sharding.spec) == expected  # the step kept the parameters in their shards


def test_orbax_restores_a_sharded_run_into_its_shards(tmp_path) -> None:  # noqa: ANN001
    sharding = ModelSharding(make_mesh(data=4, model=2), AxisRules.of(FSDP_RULES))
    params = place_params(_params(), CONFIG, sharding)
    opt_state = OPTIMIZER.init(params)
    ckpt = Checkpointer(tmp_path)
    ckpt.save(3, params, opt_state, {"note": "sharded"})
    like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), (params, opt_state))
    restored = ckpt.restore(*like)
    ckpt.close()
    assert restored.step == 3
    for got, want in zip(jax.tree.leaves(restored.params), jax.tree.leaves(params), strict=True):
        assert got.sharding.is_equivalent_to(want.sharding, got.ndim)
        np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_the_training_loop_runs_sharded_and_resumes_into_its_shards(tmp_path) -> None:  # noqa: ANN001
    """train() on an FSDP 4x2 mesh, stopped and resumed from its sharded checkpoint, ends
    where the one-device run ends."""
    import sysconfig
    from pathlib import Path

    from efficient.data import ByteTokenizer
    from efficient.train import TrainConfig, train

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    docs = [(stdlib / name).read_text() for name in ("bisect.py", "colorsys.py")]
    config = TrainConfig(batch_size=8, seq_len=16, steps=4, peak_lr=3e-3, warmup_steps=1, eval_every=0,
                         checkpoint_every=2, log_every=2, eval_max_windows=2)
    model_config = CONFIG.replace(vocab_size=259, max_position_embeddings=64)
    quiet = lambda _: None  # noqa: E731
    single = train(model_config, config, docs, docs, ByteTokenizer(), workdir=tmp_path / "one", log=quiet)
    sharding = ModelSharding(make_mesh(data=4, model=2), AxisRules.of(FSDP_RULES))
    part = train(model_config, config, docs, docs, ByteTokenizer(), workdir=tmp_path / "mesh", stop_at_step=2,
                 sharding=sharding, log=quiet)
    assert part.step == 2
    resumed = train(model_config, config, docs, docs, ByteTokenizer(), workdir=tmp_path / "mesh", sharding=sharding,
                    log=quiet)
    assert resumed.step == 4
    for got, want in zip(jax.tree.leaves(resumed.params), jax.tree.leaves(single.params), strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
    kernel = resumed.params["layers"]["mlp"]["up_proj"]["kernel"][...]
    assert tuple(kernel.sharding.spec) == (None, "data", "model")


def test_the_training_config_names_its_mesh() -> None:
    from configs import train_target
    from experiments.train import sharding_from

    mesh = train_target.get_config().mesh
    assert sharding_from(mesh) is None  # 1 x 1: one device
    mesh.data, mesh.model, mesh.rules = 4, 2, "fsdp"
    sharding = sharding_from(mesh)
    assert dict(sharding.mesh.shape) == {"data": 4, "model": 2, "sequence": 1}
    assert sharding.rules == AxisRules.of(FSDP_RULES)
    mesh.data = 8
    with pytest.raises(ValueError, match="config.mesh: data=8 x model=2 needs 16 devices"):
        sharding_from(mesh)
    mesh.data, mesh.rules = 4, "zero"
    with pytest.raises(ValueError, match="config.mesh.rules must be one of"):
        sharding_from(mesh)
