"""Jitted pure functions of (params, batch): next-token loss, the train step, eval.

Modules are split once into (graphdef, params); these functions merge inside
jit. Parameters stay float32; with a bfloat16 compute graphdef the forward
casts them to bfloat16 (gradients flow back to float32 through the cast).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.models import LlamaModel, ModelConfig, forward

Params = Any  # nnx.State of float32 parameters
Metrics = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class TrainFns:
    """The compiled functions of one run and the graphdef they merge into."""

    graphdef: nnx.GraphDef
    step: Callable[[Params, optax.OptState, Int[Array, "B T+1"]], tuple[Params, optax.OptState, Metrics]]
    eval_sums: Callable[[Params, Int[Array, "B T+1"], Bool[Array, "B T"]], tuple[jax.Array, jax.Array]]


def compute_graphdef(config: ModelConfig, compute_dtype: str, sharding: Any = None) -> nnx.GraphDef:
    """The graphdef of a model whose modules compute (and hold params) in `compute_dtype`
    (carrying `sharding`, an `efficient.parallel.ModelSharding`, when given)."""
    abstract = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0), dtype=compute_dtype))
    if sharding is not None:
        abstract.sharding = sharding
    return nnx.split(abstract)[0]


def token_nll(
    graphdef: nnx.GraphDef, params: Params, windows: Int[Array, "B T+1"], compute_dtype: str
) -> Float[Array, "B T"]:
    """Per-token negative log-likelihood (nats) of windows[:, 1:] given windows[:, :-1]."""
    dtype = jnp.dtype(compute_dtype)
    cast = jax.tree.map(lambda p: p.astype(dtype) if p.dtype != dtype else p, params)
    model = nnx.merge(graphdef, cast)
    logits, _ = forward(model, windows[:, :-1])  # float32 [B T V]
    return optax.softmax_cross_entropy_with_integer_labels(logits, windows[:, 1:])


def make_train_fns(
    model_config: ModelConfig, optimizer: optax.GradientTransformation, compute_dtype: str,
    microbatches: int = 1, sharding: Any = None,
) -> TrainFns:
    """Jitted train step (params and optimizer state donated) and masked eval sums.

    microbatches > 1 accumulates gradients over that many equal chunks of the
    batch (a `lax.scan`), dividing activation memory by it.
    sharding: an `efficient.parallel.ModelSharding`: data parallel (the batch split on
        the rules' batch axis; XLA sums the gradients across it), with the parameters and
        optimizer state split by the rules (Megatron over "model"; with `FSDP_RULES` also
        over "data", ZeRO-3 / FSDP style). Place the initial params with `place_params`.
    """
    if microbatches < 1:
        raise ValueError(f"microbatches must be >= 1, got {microbatches}")
    if sharding is not None:
        from efficient.parallel.params import as_sharding, param_shardings  # parallel imports models

        sharding = as_sharding(sharding)
    graphdef = compute_graphdef(model_config, compute_dtype, sharding)

    def constrain(params: Params, windows: jax.Array) -> tuple[Params, jax.Array]:
        if sharding is None:
            return params, windows
        params = jax.lax.with_sharding_constraint(params, param_shardings(params, model_config, sharding))
        return params, sharding.constrain(windows, ("batch", None))

    def loss_fn(params: Params, windows: Int[Array, "B T+1"]) -> jax.Array:
        return jnp.mean(token_nll(graphdef, params, windows, compute_dtype))

    grad_fn = jax.value_and_grad(loss_fn)

    def accumulated(params: Params, windows: Int[Array, "B T+1"]) -> tuple[jax.Array, Params]:
        if microbatches == 1:
            return grad_fn(params, windows)
        b, width = windows.shape
        if b % microbatches:
            raise ValueError(f"microbatches={microbatches} must divide the batch size {b}")
        chunks = windows.reshape(microbatches, b // microbatches, width)

        def body(carry, chunk):  # noqa: ANN001, ANN202
            loss, grads = grad_fn(params, chunk)
            return jax.tree.map(jnp.add, carry, (loss, grads)), None

        zeros = (jnp.zeros((), jnp.float32), jax.tree.map(jnp.zeros_like, params))
        (loss, grads), _ = jax.lax.scan(body, zeros, chunks)
        return jax.tree.map(lambda x: x / microbatches, (loss, grads))

    def step(params: Params, opt_state: optax.OptState, windows: Int[Array, "B T+1"]):  # noqa: ANN202
        params, windows = constrain(params, windows)
        loss, grads = accumulated(params, windows)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params, _ = constrain(optax.apply_updates(params, updates), windows)
        return params, opt_state, {"loss": loss, "grad_norm": optax.tree.norm(grads)}

    def eval_sums(params: Params, windows: Int[Array, "B T+1"], mask: Bool[Array, "B T"]):  # noqa: ANN202
        params, windows = constrain(params, windows)
        nll = token_nll(graphdef, params, windows, compute_dtype)
        return jnp.sum(jnp.where(mask, nll, 0.0)), jnp.sum(mask)

    return TrainFns(
        graphdef=graphdef,
        step=jax.jit(step, donate_argnums=(0, 1)),
        eval_sums=jax.jit(eval_sums),
    )


def bits_per_byte(nll_nats: float, num_bytes: int) -> float:
    """Summed NLL in nats over the bytes it covers, in bits per byte."""
    if num_bytes <= 0:
        raise ValueError(f"num_bytes must be > 0, got {num_bytes}")
    return nll_nats / math.log(2.0) / num_bytes
