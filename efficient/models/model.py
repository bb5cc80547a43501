"""The decoder model: embeddings, L stacked layers of the config's family, norm, LM head.

Parameters of the L layers are stacked on a leading L axis (the layer module is
created under `nnx.vmap`), so the shared `forward` runs them with one
`lax.scan` and compile time is flat in depth (`set_layer_loop` unstacks them for
XLA:CPU, which copies a stacked slice before every dot). Modules hold parameters only.
"""

from __future__ import annotations

from typing import TypeVar

import jax
import jax.numpy as jnp
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient.models.config import ModelConfig
from efficient.models.families import get_family
from efficient.models.modules import INIT, linear


class DecoderModel(nnx.Module):
    """Embeddings, `layers` (one module whose parameters have a leading L axis), final norm
    and LM head (tied or not)."""

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs, dtype: str | None = None) -> None:
        family = get_family(config.model_type)
        self.config = config
        param_dtype = jnp.dtype(dtype or config.dtype)
        self.embed_tokens = nnx.Embed(config.vocab_size, config.hidden_size, dtype=param_dtype,
                                      param_dtype=param_dtype, embedding_init=INIT, rngs=rngs)

        @nnx.split_rngs(splits=config.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0)
        def make_layers(rngs: nnx.Rngs) -> nnx.Module:
            return family.layer(config, param_dtype, rngs)

        self.layers = make_layers(rngs)
        self.norm = family.norm(config.hidden_size, config.rms_norm_eps, param_dtype)
        if not config.tie_embeddings:
            self.lm_head = linear(config.hidden_size, config.vocab_size, False, param_dtype, rngs)

    @property
    def dtype(self) -> jnp.dtype:
        return self.embed_tokens.embedding[...].dtype

    def embed(self, tokens: Int[Array, "B T"]) -> Float[Array, "B T D"]:
        """Token embeddings, times the family's scale (Gemma: sqrt(D), in the compute dtype)."""
        x = self.embed_tokens(tokens)
        scale = get_family(self.config.model_type).embed_scale(self.config)
        return x if scale is None else x * jnp.asarray(scale, x.dtype)

    def lm_head_rows(self, ids: Int[Array, " I"]) -> Float[Array, "I D"]:
        """The LM head's rows for token `ids` (the tied embedding, or the untied kernel's columns):
        what a drafter head scoring a sub-vocabulary with the target's head reads."""
        if self.config.tie_embeddings:
            return self.embed_tokens.embedding[...][ids]
        return self.lm_head.kernel[...].T[ids]

    def logits(self, hidden: Float[Array, "B T D"]) -> Float[Array, "B T V"]:
        """LM head in float32 accumulation (then final soft-capping, Gemma); float32 logits."""
        if self.config.tie_embeddings:
            weight = self.embed_tokens.embedding[...]
            logits = jnp.einsum("btd,vd->btv", hidden, weight, preferred_element_type=jnp.float32)
        else:
            kernel = self.lm_head.kernel[...]
            logits = jnp.einsum("btd,dv->btv", hidden, kernel, preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcapping
        return logits if cap is None else jnp.tanh(logits / cap) * cap


def unstack_layers(model: DecoderModel) -> DecoderModel:
    """Give each layer its own parameter buffers (in place; returns `model`).

    The shared `forward` then runs the layers as a Python loop instead of one
    `lax.scan`: compile time grows with depth again, but no layer's weights are
    sliced out of a stacked [L, ...] array. XLA:CPU copies such a slice before
    every dot (decode of SmolLM2-135M lost about a fifth of its speed to it);
    GPU and TPU backends fuse the slice, so this pays on CPU only. Loading,
    saving and training expect stacked layers: unstack a model for inference.
    While it runs, the layers' weights are held twice (stacked and per layer)."""
    if isinstance(model.layers, nnx.List):
        return model
    graphdef, stacked = nnx.split(model.layers)
    model.layers = nnx.List([nnx.merge(graphdef, jax.tree.map(lambda a, i=i: a[i], stacked))
                             for i in range(model.config.num_layers)])
    return model


LAYER_LOOPS = ("scan", "unrolled", "auto")
T = TypeVar("T")


def fit_cache_to_layers(model: DecoderModel, cache: T) -> T:
    """`cache` in the storage `model`'s layer loop reads without copies, for caches
    that offer both (`split_layers` / `stack_layers`: the dense, ring, paged, KIVI/GEAR and
    VidKV caches):
    per-layer buffers for unrolled layers, stacked arrays for layers under scan.
    Anything else is returned as it is. A conversion copies the keys and values once
    (meant right after the cache is built, as `generate` does)."""
    if isinstance(model.layers, nnx.List):
        return cache.split_layers() if hasattr(cache, "split_layers") else cache
    return cache.stack_layers() if getattr(cache, "per_layer", False) else cache


def check_layer_loop(layer_loop: object, name: str = "layer_loop") -> None:
    """ValueError naming `name` unless `layer_loop` is one of `LAYER_LOOPS`."""
    if layer_loop not in LAYER_LOOPS:
        raise ValueError(f"{name} must be one of {LAYER_LOOPS}, got {layer_loop!r}")


def set_layer_loop(model: DecoderModel, layer_loop: str) -> DecoderModel:
    """`layer_loop`: "scan" (stacked layers, compile time flat in depth; a loaded model
    is stacked), "unrolled" (`unstack_layers`), or "auto" (unrolled on the CPU backend,
    where the stacked slices are copied; scan elsewhere). In place; returns `model`."""
    check_layer_loop(layer_loop)
    if layer_loop == "auto":
        layer_loop = "unrolled" if jax.default_backend() == "cpu" else "scan"
    if layer_loop == "unrolled":
        return unstack_layers(model)
    if isinstance(model.layers, nnx.List):
        raise ValueError("layer_loop='scan' needs stacked layers; this model's were unstacked "
                         "(load it again to scan over its layers)")
    return model
