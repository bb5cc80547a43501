"""Autoregressive generation: one jitted prefill, then a jitted `lax.while_loop`.

    out = generate(model, prompts, max_new_tokens=64, sampling=Sample(0.8, top_p=0.9))
    out.tokens[b, :out.lengths[b]]   # the generated continuation of prompt b

Ragged prompts share a batch (right-padded to a bucketed length). Each row
stops at a stop token or its own max length and then stops changing. The same
key gives the same output. Shapes are bucketed (prompt length and capacity to
powers of two), so new prompts of a similar length do not recompile.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from efficient.cache.hybrid import default_cache
from efficient.cache.protocol import CacheFactory, KVCache
from efficient.decoding.prompts import PromptBatch, bucket_length, capacity_bucket, make_prompt_batch
from efficient.decoding.sampling import Greedy, SamplingRule, sample_tokens
from efficient.models.checks import check_cache_factory, check_cache_matches, check_model, check_sampling
from efficient.models.config import ModelConfig
from efficient.models.forward import forward
from efficient.models.llama import LlamaModel
from efficient.models.model import fit_cache_to_layers
from efficient.parallel.cache import build_cache


# Number of times each jitted stage was traced (a test asserts on it).
TRACE_COUNTS: collections.Counter[str] = collections.Counter()


@dataclasses.dataclass(frozen=True)
class GenerateStats:
    target_forwards: int  # prefill + one per decode step
    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float  # = time to first token (includes compilation on a new bucket)
    decode_seconds: float  # includes compilation on a new bucket

    @property
    def prefill_tokens_per_second(self) -> float:
        return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

    batch_size: int = 1

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens produced by the decode loop (all but each row's first) per second."""
        return (self.generated_tokens - self.batch_size) / max(self.decode_seconds, 1e-9)

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / max(self.prefill_seconds + self.decode_seconds, 1e-9)


@dataclasses.dataclass(frozen=True)
class GenerateOutput:
    tokens: np.ndarray  # [B, max_new] generated ids, pad_id after each row's length
    lengths: np.ndarray  # [B] tokens generated per row (a final stop token included)
    stopped: np.ndarray  # [B] bool: the row ended on a stop token
    stats: GenerateStats

    def sequences(self) -> list[list[int]]:
        return [row[:n].tolist() for row, n in zip(self.tokens, self.lengths, strict=True)]


@dataclasses.dataclass(frozen=True)
class LoopStatic:
    """The static (hashed, not traced) arguments of the jitted prefill and decode loops,
    shared with speculative decoding."""

    graphdef: nnx.GraphDef
    rule: SamplingRule
    implementation: str | tuple[str, ...] | None
    pad_id: int
    out_len: int  # static width of the generated-token buffer
    all_prompt_hidden: bool = False  # the prefill returns the hidden state at every prompt token


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DecodeState:
    out: Int[Array, "B N"]  # generated tokens
    num_generated: Int[Array, " B"]
    done: jax.Array  # bool[B]
    cache: KVCache
    key: jax.Array
    steps: jax.Array  # int32[]: decode forwards run


def stop_hit(tokens: Int[Array, " B"], stop_ids: Int[Array, " S"]) -> jax.Array:
    """bool[B]: the token of row b is one of the stop ids."""
    return jnp.any(tokens[:, None] == stop_ids[None, :], axis=-1)


def prefill_in_chunks(model, tokens: Int[Array, "B T"], positions: Int[Array, "B T"],  # noqa: ANN001
                      prompt_lengths: Int[Array, " B"], cache: KVCache,
                      implementation: str | tuple[str, ...] | None,
                      all_hidden: bool = False) -> tuple[jax.Array, KVCache, jax.Array]:
    """A prefill into an empty cache; logits [B, 1, V] and the final-normed hidden state
    [B, 1, D] at each row's last prompt token (`all_hidden`: [B, T, D] at every token).

    A cache that holds only so many tokens per forward (an evicting cache:
    `max_tokens_per_fresh_forward`) is prefilled in chunks of that size: the first
    chunk fresh, the rest under one `lax.scan` (one compiled chunk, however long the
    prompt), with the prompt padded to a whole number of chunks (padding takes no
    position and is truncated away by the caller)."""
    t = tokens.shape[1]
    last = prompt_lengths - 1
    chunk = getattr(cache, "max_tokens_per_fresh_forward", None)
    which = "all" if all_hidden else True
    if chunk is None or t <= chunk:
        return forward(model, tokens, positions=positions, cache=cache, logits_indices=last[:, None],
                       implementation=implementation, fresh_cache=True, return_hidden=which)
    logits, cache, hidden = forward(model, tokens[:, :chunk], positions=positions[:, :chunk], cache=cache,
                                    logits_indices=jnp.clip(last, 0, chunk - 1)[:, None],
                                    implementation=implementation, fresh_cache=True, return_hidden=which)
    rest = -(-(t - chunk) // chunk)
    pad = chunk + rest * chunk - t
    tokens = jnp.pad(tokens[:, chunk:], ((0, 0), (0, pad)))
    positions = jnp.pad(positions[:, chunk:], ((0, 0), (0, pad)), constant_values=-1)
    b = tokens.shape[0]
    xs = (tokens.reshape(b, rest, chunk).swapaxes(0, 1), positions.reshape(b, rest, chunk).swapaxes(0, 1),
          chunk + chunk * jnp.arange(rest, dtype=jnp.int32))

    def step(carry: tuple, x: tuple) -> tuple[tuple, None]:
        logits, cache, hidden = carry
        ids, pos, start = x
        out, cache, out_hidden = forward(model, ids, positions=pos, cache=cache,
                                         logits_indices=jnp.clip(last - start, 0, chunk - 1)[:, None],
                                         implementation=implementation, return_hidden=which)
        inside = (last >= start) & (last < start + chunk)
        if all_hidden:
            return (jnp.where(inside[:, None, None], out, logits), cache, hidden), out_hidden
        return (jnp.where(inside[:, None, None], out, logits), cache,
                jnp.where(inside[:, None, None], out_hidden, hidden)), None

    (logits, cache, hidden), chunks = jax.lax.scan(step, (logits, cache, hidden), xs)
    if all_hidden:  # [B, chunk, D] then rest x [B, chunk, D], cut to the prompt's T tokens
        rest_hidden = chunks.swapaxes(0, 1).reshape(b, rest * chunk, -1)
        hidden = jnp.concatenate([hidden, rest_hidden], axis=1)[:, :t]
    return logits, cache, hidden


@jax.jit(static_argnums=0, donate_argnums=4)
def _prefill(static: LoopStatic, params: nnx.State, tokens, prompt_lengths, cache, key):  # noqa: ANN001, ANN202
    TRACE_COUNTS["prefill"] += 1
    model = nnx.merge(static.graphdef, params)
    t = tokens.shape[1]
    index = jnp.arange(t, dtype=jnp.int32)[None, :]
    positions = jnp.where(index < prompt_lengths[:, None], index, -1)
    logits, cache, hidden = prefill_in_chunks(model, tokens, positions, prompt_lengths, cache,
                                              static.implementation, static.all_prompt_hidden)
    # Drop the padded slots: each row continues at its own length. Trailing padding past
    # the capacity was never written (the cache drops writes past its capacity), so a
    # prompt's bucket needs no cache slots beyond its real length.
    cache = cache.truncate(prompt_lengths)
    key, sub = jax.random.split(key)
    return sample_tokens(static.rule, logits[:, 0], sub), cache, key, (
        hidden if static.all_prompt_hidden else hidden[:, 0])


@jax.jit(static_argnums=0, donate_argnums=5)
def _decode_loop(static: LoopStatic, params, first, prompt_lengths, max_new, cache, key, stop_ids):  # noqa: ANN001, ANN202
    TRACE_COUNTS["decode"] += 1
    model = nnx.merge(static.graphdef, params)
    b = first.shape[0]
    out = jnp.full((b, static.out_len), static.pad_id, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((b,), jnp.int32)
    state = DecodeState(out=out, num_generated=ones, done=stop_hit(first, stop_ids) | (ones >= max_new),
                        cache=cache, key=key, steps=jnp.zeros((), jnp.int32))

    def cond(s: DecodeState) -> jax.Array:
        return ~jnp.all(s.done) & (s.steps < static.out_len - 1)

    def body(s: DecodeState) -> DecodeState:
        last = jnp.take_along_axis(s.out, (s.num_generated - 1)[:, None], axis=1)  # B 1
        positions = jnp.where(s.done, -1, prompt_lengths + s.num_generated - 1)[:, None]
        logits, cache = forward(model, last, positions=positions, cache=s.cache,
                                implementation=static.implementation)
        key, sub = jax.random.split(s.key)
        token = sample_tokens(static.rule, logits[:, 0], sub)
        token = jnp.where(s.done, static.pad_id, token)
        rows = jnp.arange(b)
        out = s.out.at[rows, jnp.where(s.done, static.out_len, s.num_generated)].set(token, mode="drop")
        num_generated = s.num_generated + (~s.done).astype(jnp.int32)
        done = s.done | stop_hit(token, stop_ids) | (num_generated >= max_new)
        return DecodeState(out=out, num_generated=num_generated, done=done, cache=cache, key=key,
                           steps=s.steps + 1)

    final = jax.lax.while_loop(cond, body, state)
    stopped = stop_hit(jnp.take_along_axis(final.out, (final.num_generated - 1)[:, None], axis=1)[:, 0],
                        stop_ids)
    return (*replicated_outputs(model, (final.out, final.num_generated, stopped, final.steps)), final.cache)


def replicated_outputs(model: LlamaModel, outputs: tuple) -> tuple:
    """`outputs` replicated on every device of a sharded model's mesh, so that every process
    of a multi-host job can read the tokens (a few bytes per row); unchanged otherwise."""
    sharding = getattr(model, "sharding", None)
    return outputs if sharding is None else jax.lax.with_sharding_constraint(outputs, sharding.replicated())


def _as_key(key: jax.Array | int | None) -> jax.Array:
    if key is None:
        return jax.random.key(0)
    if isinstance(key, int | np.integer):
        return jax.random.key(int(key))
    if not isinstance(key, jax.Array):
        raise TypeError(f"key must be a jax PRNG key, an int seed or None, got {type(key).__name__}")
    return key


@dataclasses.dataclass(frozen=True)
class Request:
    """A validated generation request (shared by `generate` and speculative decoding)."""

    batch: PromptBatch
    max_new: np.ndarray  # [B] int64
    stop_ids: jax.Array  # int32[S] (-1 when stopping is disabled)
    pad_id: int
    capacity: int
    implementation: str | tuple[str, ...] | None


def prepare_request(
    config: ModelConfig,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int | Sequence[int],
    capacity: int | None,
    stop_tokens: Sequence[int] | None,
    pad_id: int | None,
    prompt_lengths: Sequence[int] | np.ndarray | None,
    implementation: str | tuple[str, ...] | None,
    extra_slots: int = 0,
) -> Request:
    """Validate the arguments of a generation call; `extra_slots` are cache slots needed
    beyond prompt + max_new_tokens (a speculative tree written past the end)."""
    pad = config.pad_token_id if pad_id is None else pad_id
    pad = 0 if pad is None else pad
    batch = make_prompt_batch(prompts, config.vocab_size, pad_id=pad, lengths=prompt_lengths)
    b = batch.batch_size
    requested = np.asarray(max_new_tokens)
    if requested.ndim > 1 or (requested.ndim == 1 and requested.shape[0] != b):
        raise ValueError(f"max_new_tokens must be an int or one per prompt ({b}), got {max_new_tokens!r}")
    if not np.issubdtype(requested.dtype, np.integer) or requested.min() < 1:
        raise ValueError(f"max_new_tokens must be integers >= 1, got {max_new_tokens!r}")
    max_new = np.broadcast_to(requested, (b,)).astype(np.int64)
    if stop_tokens is None:
        stop_tokens = config.eos_token_ids
    if isinstance(stop_tokens, int | np.integer | str) or not isinstance(stop_tokens, Sequence | np.ndarray):
        raise TypeError(f"stop_tokens must be a sequence of token ids, got {stop_tokens!r}")
    for stop in stop_tokens:
        if not isinstance(stop, int | np.integer) or not 0 <= stop < config.vocab_size:
            raise ValueError(f"stop token {stop!r} is outside the vocabulary [0, {config.vocab_size})")
    if isinstance(implementation, list):
        implementation = tuple(implementation)
    # Padding to the prompt bucket takes no slot (writes past the capacity are dropped and
    # truncated away after prefill): a row needs its prompt + max_new_tokens (+ extra).
    needed = int((batch.lengths + max_new).max()) + extra_slots
    if capacity is None:
        capacity = capacity_bucket(needed, 64)
    elif not isinstance(capacity, int | np.integer) or isinstance(capacity, bool) or capacity < 1:
        raise ValueError(f"capacity must be a positive int, got {capacity!r}")
    capacity = int(capacity)
    if needed > capacity:
        worst = int(np.argmax(batch.lengths + max_new))
        extra = f" + {extra_slots} draft-tree slots" if extra_slots else ""
        raise ValueError(
            f"prompt {worst} ({int(batch.lengths[worst])} tokens) + "
            f"max_new_tokens {int(max_new[worst])}{extra} needs {needed} cache slots, beyond capacity {capacity}"
        )
    stop_ids = jnp.asarray(list(stop_tokens) or [-1], jnp.int32)
    return Request(batch=batch, max_new=max_new, stop_ids=stop_ids, pad_id=pad, capacity=capacity,
                   implementation=implementation)


def run_prefill(static: LoopStatic, params: nnx.State, request: Request, cache: KVCache,
                key: jax.Array | int | None) -> tuple[jax.Array, KVCache, jax.Array, float, jax.Array]:
    """The jitted prefill; returns (first tokens, cache, key, seconds, final-normed hidden
    state [B, D] at each row's last prompt token, or [B, T, D] at every prompt token when
    `static.all_prompt_hidden`)."""
    start = time.perf_counter()
    first, cache, rng, hidden = _prefill(static, params, jnp.asarray(request.batch.tokens),
                                 jnp.asarray(request.batch.lengths), cache, _as_key(key))
    first.block_until_ready()
    return first, cache, rng, time.perf_counter() - start, hidden


def generate(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    max_new_tokens: int | Sequence[int],
    sampling: SamplingRule = Greedy(),
    cache: CacheFactory | None = None,
    capacity: int | None = None,
    key: jax.Array | int | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int | None = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    implementation: str | tuple[str, ...] | None = None,
) -> GenerateOutput:
    """Generate up to `max_new_tokens` (an int, or one per row) after each prompt.

    cache: a factory `(config, batch, capacity) -> cache` (default: `default_cache`, dense, or
        hybrid with a ring buffer for sliding-window layers).
    capacity: cache slots per row; default: the longest prompt + max_new_tokens, rounded
        up to a quarter-octave size (`capacity_bucket`, at least 64). Exactly prompt +
        max_new_tokens is enough: the prompt's padding to its shape bucket takes no
        slot. A prompt that cannot fit raises ValueError.
    key: PRNG key or int seed (sampling only; deterministic for a given key).
    stop_tokens: ids that end a row (the stop token is kept in the output);
        None: the model config's eos_token_ids; () disables stopping.
    """
    config = check_model(model, "generate")
    check_sampling(sampling, "generate")
    check_cache_factory(cache, "generate")
    request = prepare_request(config, prompts, max_new_tokens=max_new_tokens, capacity=capacity,
                              stop_tokens=stop_tokens, pad_id=pad_id, prompt_lengths=prompt_lengths,
                              implementation=implementation)
    batch, max_new = request.batch, request.max_new
    b = batch.batch_size
    factory = cache or default_cache
    kv_cache = build_cache(factory, config, b, request.capacity, getattr(model, "sharding", None))
    check_cache_matches(config, kv_cache, b, "generate", capacity=request.capacity)
    kv_cache = fit_cache_to_layers(model, kv_cache)
    graphdef, params = nnx.split(model)
    static = LoopStatic(graphdef=graphdef, rule=sampling, implementation=request.implementation,
                     pad_id=request.pad_id, out_len=bucket_length(int(max_new.max()), 16))
    lengths = jnp.asarray(batch.lengths)
    first, kv_cache, rng, prefill_seconds, _ = run_prefill(static, params, request, kv_cache, key)
    start = time.perf_counter()
    out, num_generated, stopped, steps, _ = _decode_loop(
        static, params, first, lengths, jnp.asarray(max_new, jnp.int32), kv_cache, rng, request.stop_ids
    )
    out, num_generated, stopped, steps = jax.device_get((out, num_generated, stopped, steps))
    decode_seconds = time.perf_counter() - start
    return finish_output(request, out, num_generated, stopped, steps, prefill_seconds, decode_seconds)


def finish_output(request: Request, out: np.ndarray, num_generated: np.ndarray, stopped: np.ndarray,
                  steps: int, prefill_seconds: float, decode_seconds: float,
                  stats_type: type[GenerateStats] = GenerateStats, **extra_stats: object) -> GenerateOutput:
    """The host-side result of a decode loop: tokens cut to max_new_tokens and the stats
    (`stats_type` with `extra_stats`, e.g. a speculative loop's counters)."""
    batch = request.batch
    stats = stats_type(
        target_forwards=1 + int(steps),
        prompt_tokens=int(batch.lengths.sum()),
        generated_tokens=int(np.sum(num_generated)),
        prefill_seconds=prefill_seconds,
        decode_seconds=decode_seconds,
        batch_size=batch.batch_size,
        **extra_stats,
    )
    width = int(request.max_new.max())
    return GenerateOutput(tokens=np.asarray(out)[:, :width], lengths=np.asarray(num_generated),
                          stopped=np.asarray(stopped), stats=stats)
