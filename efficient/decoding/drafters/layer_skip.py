"""Self-speculative decoding by layer skipping: the target drafts for itself with some
decoder layers skipped (Draft & Verify, Zhang et al. 2023; SWIFT, Xia et al. 2024).

    calibration = calibrate_skip_layers(target, calibration_tokens, length=4)
    drafter = LayerSkipDrafter.create(target.config, skip_layers=calibration.skip_layers, length=4)
    drafter = LayerSkipDrafter.calibrated(target, calibration_tokens, length=4)  # the same, in one call

The drafter has no parameters of its own: it runs `ctx.target` with `skip_layers`
skipped (identity residual) through the target's own KV cache, as both papers do.
The committed prefix's keys/values, written by full-model verification forwards,
are reused at the kept layers; the draft writes its own entries past the committed
length (the last committed token, then the drafted tokens but the last) and the
speculative loop truncates them away before verifying. A skipped layer's cache is
never read while drafting, so the stale slots it holds there are harmless.

Which layers to skip is found by `calibrate_skip_layers`: a greedy search on the
task's own text, scoring each candidate set by the skipped model's top-1 agreement
with the full model (teacher forced) and a cost model of speculative decoding.
"""

from __future__ import annotations

import dataclasses
import functools
import warnings
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.autoregressive import draft_chain
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import DraftTree, chain, check_tree_size
from efficient.models.config import ModelConfig
from efficient.models.forward import forward, validate_tokens
from efficient.models.llama import LlamaModel


def _check_skip_layers(skip_layers: object, num_layers: int) -> tuple[int, ...]:
    """A sorted tuple of distinct layer ids in [0, num_layers), not all of them."""
    if not isinstance(skip_layers, tuple | list) or not skip_layers:
        raise ValueError(f"skip_layers must be a non-empty tuple of layer ids, got {skip_layers!r}")
    if any(not isinstance(i, int | np.integer) or isinstance(i, bool) for i in skip_layers):
        raise ValueError(f"skip_layers must hold ints, got {skip_layers!r}")
    ids = tuple(int(i) for i in skip_layers)
    if len(set(ids)) != len(ids):
        raise ValueError(f"skip_layers must be distinct, got {skip_layers!r}")
    bad = [i for i in ids if not 0 <= i < num_layers]
    if bad:
        raise ValueError(f"skip_layers: layer ids {bad} outside [0, {num_layers}) for this target")
    if len(ids) >= num_layers:
        raise ValueError(f"skip_layers {skip_layers!r} skips all {num_layers} layers: keep at least one")
    return tuple(sorted(ids))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class LayerSkipDrafter:
    """The target with `skip_layers` skipped drafts a chain of `length` tokens (every field static)."""

    skip_layers: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(default=4, metadata=dict(static=True))
    stop_threshold: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    implementation: str | tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def create(cls, target_config: ModelConfig, *, skip_layers: Sequence[int], length: int = 4,
               stop_threshold: float | None = None,
               implementation: str | tuple[str, ...] | None = None) -> LayerSkipDrafter:
        """skip_layers: decoder layer ids the draft skips (distinct, not all layers); length:
        tokens drafted per step (the most, with `stop_threshold`); stop_threshold:
        SpecDec++'s threshold on P(some drafted token is rejected), in (0, 1)."""
        if not isinstance(target_config, ModelConfig):
            raise TypeError(f"target_config must be a ModelConfig, got {type(target_config).__name__}")
        skip = _check_skip_layers(skip_layers, target_config.num_layers)
        check_tree_size(length, "length")
        if stop_threshold is not None and not (isinstance(stop_threshold, int | float)
                                               and not isinstance(stop_threshold, bool)
                                               and 0 < stop_threshold < 1):
            raise ValueError(f"stop_threshold must be in (0, 1) or None, got {stop_threshold!r}")
        drafter = cls(skip_layers=skip, length=int(length),
                      stop_threshold=None if stop_threshold is None else float(stop_threshold),
                      implementation=tuple(implementation) if isinstance(implementation, list) else implementation)
        drafter.check(target_config)
        return drafter

    @classmethod
    def calibrated(cls, model: LlamaModel, tokens: Int[Array, "B T"], *, length: int = 4,
                   stop_threshold: float | None = None, implementation: str | tuple[str, ...] | None = None,
                   **calibrate_kwargs: object) -> LayerSkipDrafter:
        """Skip the layers `calibrate_skip_layers(model, tokens, length=length, ...)` picks."""
        calibration = calibrate_skip_layers(model, tokens, length=length, implementation=implementation,
                                            **calibrate_kwargs)
        return cls.create(model.config, skip_layers=calibration.skip_layers, length=length,
                          stop_threshold=stop_threshold, implementation=implementation)

    # -------------------------------------------------------------- protocol
    @property
    def tree_size(self) -> int:
        return self.length

    @property
    def max_depth(self) -> int:
        return self.length

    @property
    def is_chain(self) -> bool:
        return True

    def check(self, target_config: ModelConfig) -> None:
        _check_skip_layers(self.skip_layers, target_config.num_layers)

    def init(self, prompt: PromptContext) -> None:
        return None

    def propose(self, state: None, ctx: DraftContext) -> tuple[DraftTree, None, KVCache]:
        target, skip = ctx.target, self.skip_layers

        def step(cache: KVCache, token: Int[Array, " B"], position: Int[Array, " B"]) -> tuple[jax.Array, KVCache]:
            logits, cache = forward(target, token[:, None], positions=position[:, None], cache=cache,
                                    skip_layers=skip, implementation=self.implementation)
            return logits[:, 0], cache

        # The last committed token is not in the cache yet: its skipped-model logits predict draft token 1.
        root = jnp.where(ctx.active, ctx.last_position, -1)
        first_logits, cache = step(ctx.cache, ctx.last_token, root)
        drafted, counts, laws, cache = draft_chain(step, cache, first_logits, ctx.last_position, self.length,
                                                   ctx.rule, ctx.key, ctx.active, self.stop_threshold)
        return chain(drafted, counts, laws), state, cache

    def update(self, state: None, ctx: DraftContext, outcome: VerifyOutcome) -> None:
        return state


# ------------------------------------------------------------------ calibration
@dataclasses.dataclass(frozen=True)
class SkipSearchStep:
    """One size of the greedy search: the set chosen and how it scored."""

    skip_layers: tuple[int, ...]
    agreement: float  # top-1 agreement with the full model
    overlap: float  # mean sum_v min(p, q): the acceptance rate of lossless sampling at temperature 1
    speedup: float  # `estimated_speedup` at this agreement
    candidates: tuple[tuple[int, float, float], ...]  # (layer added, agreement, overlap) for each one tried


@dataclasses.dataclass(frozen=True)
class SkipCalibration:
    """The chosen skip set (the search step with the best estimated speedup) and the trace."""

    skip_layers: tuple[int, ...]
    agreement: float
    overlap: float
    speedup: float
    length: int
    num_layers: int
    trace: tuple[SkipSearchStep, ...]  # trace[s]: the best set of s layers (trace[0]: no skip)


def estimated_speedup(agreement: float, num_skipped: int, num_layers: int, length: int,
                      fixed_fraction: float = 0.0) -> float:
    """Tokens per step over the cost of a step, in full forwards (Leviathan et al. 2023, eq. 1):
    E = (1 - a^(k+1)) / (1 - a) tokens for cost 1 + k c, where a draft forward costs
    c = f + (1 - f) (L - s) / L of a full one and f (`fixed_fraction`) is the share a skip
    cannot remove (embedding and LM head: on SmolLM2-135M the tied 49152 x 576 head is
    a fifth of the weights a decode step reads). Attention-length effects are ignored."""
    expected = sum(agreement**i for i in range(length + 1))
    draft_cost = fixed_fraction + (1.0 - fixed_fraction) * (num_layers - num_skipped) / num_layers
    return expected / (1.0 + length * draft_cost)


def fixed_cost_fraction(model: LlamaModel) -> float:
    """The share of a decode step's weight reads outside the layers (LM head, final norm):
    decode is bound by reading weights, so this is the cost no layer skip removes."""
    sizes = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
    layers = sizes(nnx.state(model.layers))
    head = sizes(nnx.state(model)) - layers  # embedding table, LM head (if untied), final norm
    if not model.config.tie_embeddings:
        head -= model.config.vocab_size * model.config.hidden_size  # a lookup reads B rows only
    return head / (head + layers)


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation"))
def _reference(params: nnx.State, tokens: jax.Array, *, graphdef: nnx.GraphDef,
               implementation: str | tuple[str, ...] | None) -> tuple[Int[Array, "B T"], Float[Array, "B T V"]]:
    logits, _ = forward(nnx.merge(graphdef, params), tokens, implementation=implementation)
    return jnp.argmax(logits, axis=-1), jax.nn.softmax(logits, axis=-1)


@functools.partial(jax.jit, static_argnames=("graphdef", "implementation"))
def _score(params: nnx.State, tokens: jax.Array, weights: Float[Array, "B T"], skip: Bool[Array, " L"],
           top1: Int[Array, "B T"], probs: Float[Array, "B T V"], *, graphdef: nnx.GraphDef,
           implementation: str | tuple[str, ...] | None) -> tuple[jax.Array, jax.Array]:
    """(top-1 agreement, probability overlap) of the skipped model with the full one; `skip`
    is a traced mask, so every candidate set shares one compile."""
    logits, _ = forward(nnx.merge(graphdef, params), tokens, skip_layers=skip, implementation=implementation)
    agree = (jnp.argmax(logits, axis=-1) == top1).astype(jnp.float32)
    overlap = jnp.sum(jnp.minimum(jax.nn.softmax(logits, axis=-1), probs), axis=-1)
    total = jnp.sum(weights)
    return jnp.sum(agree * weights) / total, jnp.sum(overlap * weights) / total


def calibrate_skip_layers(
    model: LlamaModel,
    tokens: Int[Array, "B T"],
    *,
    max_skip: int | None = None,
    length: int = 4,
    lengths: Int[Array, " B"] | None = None,
    implementation: str | tuple[str, ...] | None = None,
    width: int | None = 6,
    patience: int | None = 2,
) -> SkipCalibration:
    """Choose the layers to skip on calibration text (SWIFT's idea, with a greedy search).

    From no skip, repeatedly add the layer whose removal keeps the top-1 agreement of
    the skipped model with the full model highest over `tokens` (teacher forced; ties
    broken by the probability overlap, then the lower id), up to `max_skip` layers
    (default L - 1), and return the size that maximises `estimated_speedup` for drafts
    of `length` tokens (at least one layer skipped), with the fixed cost of the LM head
    counted (`fixed_cost_fraction`): the expected speed, not the agreement, decides.
    A RuntimeWarning says so when even the best size is estimated at <= 1x (on
    SmolLM2-135M skipping one of 30 layers already drops agreement to 0.82).

    The search is pruned so that it fits in a minute on a 30-layer model on a CPU:
    the first size tries every layer; later sizes try only the `width` remaining layers
    that scored best at the previous size (None: all, O(L * max_skip) forwards), and
    the search stops once the estimated speedup has not improved for `patience` sizes
    (None: never). One compile for all of it.

    tokens: calibration text, ideally from the task. lengths: real tokens per row
        (right padding after them is ignored); default all T.
    """
    if not isinstance(model, LlamaModel):
        raise TypeError(f"model must be an efficient LlamaModel, got {type(model).__name__}")
    num_layers = model.config.num_layers
    if num_layers < 2:
        raise ValueError(f"model has num_layers={num_layers}: layer skipping needs at least 2 layers")
    tokens = jnp.asarray(tokens)
    validate_tokens(tokens, model.config.vocab_size, "tokens")
    b, t = tokens.shape
    if max_skip is None:
        max_skip = num_layers - 1
    if not isinstance(max_skip, int | np.integer) or isinstance(max_skip, bool) or not 1 <= max_skip < num_layers:
        raise ValueError(f"max_skip must be an int in [1, {num_layers - 1}] or None, got {max_skip!r}")
    for name, value in (("width", width), ("patience", patience)):
        if value is not None and (not isinstance(value, int | np.integer) or isinstance(value, bool) or value < 1):
            raise ValueError(f"{name} must be a positive int or None, got {value!r}")
    length = check_tree_size(length, "length")
    if lengths is None:
        weights = jnp.ones((b, t), jnp.float32)
    else:
        lengths = np.asarray(lengths)
        if lengths.shape != (b,) or not np.issubdtype(lengths.dtype, np.integer) or np.any(lengths < 1) \
                or np.any(lengths > t):
            raise ValueError(f"lengths must be {b} ints in [1, {t}], got {lengths.tolist()!r}")
        weights = jnp.asarray(np.arange(t)[None, :] < lengths[:, None], jnp.float32)

    graphdef, params = nnx.split(model)
    static = dict(graphdef=graphdef, implementation=implementation)
    top1, probs = _reference(params, tokens, **static)
    fixed = fixed_cost_fraction(model)

    def score(layers: Sequence[int]) -> tuple[float, float]:
        skip = np.zeros((num_layers,), bool)
        skip[list(layers)] = True
        agreement, overlap = _score(params, tokens, weights, jnp.asarray(skip), top1, probs, **static)
        return float(agreement), float(overlap)

    chosen: tuple[int, ...] = ()
    ranking = list(range(num_layers))  # remaining layers, best first (by the last size's scores)
    trace = [SkipSearchStep((), 1.0, 1.0, estimated_speedup(1.0, 0, num_layers, length, fixed), ())]
    best_size, stale = 0, 0
    for size in range(1, int(max_skip) + 1):
        tried = ranking if width is None or size == 1 else ranking[:width]
        candidates = tuple((layer, *score(chosen + (layer,))) for layer in tried)
        order = sorted(candidates, key=lambda c: (-c[1], -c[2], c[0]))
        layer, agreement, overlap = order[0]
        chosen = tuple(sorted(chosen + (layer,)))
        ranking = [c[0] for c in order[1:]] + [r for r in ranking if r not in tried]
        trace.append(SkipSearchStep(chosen, agreement, overlap,
                                    estimated_speedup(agreement, size, num_layers, length, fixed), candidates))
        if best_size == 0 or trace[-1].speedup > trace[best_size].speedup:
            best_size, stale = size, 0
        else:
            stale += 1
            if patience is not None and stale >= patience:
                break
    best = trace[best_size]
    if best.speedup <= 1.0:
        warnings.warn(f"calibrate_skip_layers: no skip set is estimated to beat plain decoding on this text (best: "
                      f"{best.speedup:.2f}x skipping {list(best.skip_layers)}, top-1 agreement {best.agreement:.2f}); "
                      "self-speculation will likely be slower than greedy", RuntimeWarning, stacklevel=2)
    return SkipCalibration(skip_layers=best.skip_layers, agreement=best.agreement, overlap=best.overlap,
                           speedup=best.speedup, length=length, num_layers=num_layers, trace=tuple(trace))
