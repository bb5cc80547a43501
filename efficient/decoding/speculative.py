"""Speculative decoding: any drafter, one verifier, one jitted `lax.while_loop`.

    out = speculative_generate(model, prompts, drafter=DraftModelDrafter.create(draft, model.config),
                               max_new_tokens=64, sampling=Greedy())

Each step: the drafter proposes a token tree below the last committed token;
the target scores root + tree in one forward with the tree's ancestor mask
(positions = root position + depth); `accept_tree` picks the accepted path and
the next token (greedy: identical to greedy decoding; sampling: the target's
law exactly; typical acceptance: lossy); the cache keeps root + accepted path
(`truncate` for chains, `select` for trees) and each row advances by its own
number of tokens. Stops, ragged prompts and shape buckets work as in
`generate`; no recompilation per step or per prompt of the same bucket.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Int

from efficient.cache.hybrid import default_cache
from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.base import DraftContext, Drafter, PromptContext, VerifyOutcome
from efficient.decoding.generate import (
    TRACE_COUNTS,
    CacheFactory,
    GenerateOutput,
    GenerateStats,
    LoopStatic,
    finish_output,
    prepare_request,
    replicated_outputs,
    run_prefill,
    stop_hit,
)
from efficient.decoding.prompts import bucket_length
from efficient.decoding.sampling import Greedy, SamplingRule, sample_tokens
from efficient.decoding.tree import DraftTree, check_tree_size, verification_inputs
from efficient.decoding.verify import TypicalAcceptance, Verdict, accept_tree
from efficient.models.checks import check_cache_factory, check_cache_matches, check_model, check_sampling
from efficient.models.forward import forward
from efficient.models.llama import LlamaModel
from efficient.models.model import fit_cache_to_layers
from efficient.parallel.cache import build_cache


@dataclasses.dataclass(frozen=True)
class SpeculativeStats(GenerateStats):
    draft_tokens_accepted: int = 0  # summed over rows
    row_steps: int = 0  # verification steps summed over rows (a row counts while active)
    proposed_by_depth: tuple[int, ...] = ()  # row-steps that proposed a node at depth d + 1
    accepted_by_depth: tuple[int, ...] = ()  # row-steps that accepted a node at depth d + 1

    @property
    def mean_accepted_tokens(self) -> float:
        """Tokens appended per verification forward per row (accepted drafts + 1)."""
        return (self.draft_tokens_accepted + self.row_steps) / max(self.row_steps, 1)

    @property
    def acceptance_by_depth(self) -> tuple[float, ...]:
        """P(depth d accepted | a node at depth d was proposed), d = 1, 2, ..."""
        return tuple(a / p if p else float("nan")
                     for a, p in zip(self.accepted_by_depth, self.proposed_by_depth, strict=True))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class SpecState:
    out: Int[Array, "B N"]
    num_generated: Int[Array, " B"]
    done: jax.Array  # bool[B]
    cache: KVCache
    history: Int[Array, "B C"]
    drafter_state: object
    key: jax.Array
    steps: jax.Array  # int32[]: verification forwards
    accepted: Int[Array, " B"]  # draft tokens accepted per row
    row_steps: Int[Array, " B"]
    proposed_by_depth: Int[Array, " D"]
    accepted_by_depth: Int[Array, " D"]


@dataclasses.dataclass(frozen=True)
class _SpecStatic:
    graphdef: nnx.GraphDef
    rule: SamplingRule
    implementation: str | tuple[str, ...] | None
    pad_id: int
    out_len: int
    typical: TypicalAcceptance | None


def _initial_history(tokens: jax.Array, lengths: jax.Array, first: jax.Array, capacity: int,
                     pad_id: int) -> jax.Array:
    b, t = tokens.shape
    t = min(t, capacity)  # the bucket's padding may run past the capacity; real tokens fit
    index = jnp.arange(t)[None, :]
    history = jnp.full((b, capacity), pad_id, jnp.int32)
    history = history.at[:, :t].set(jnp.where(index < lengths[:, None], tokens[:, :t], pad_id))
    return history.at[jnp.arange(b), lengths].set(first, mode="drop")


def verify_widths(tree_size: int, is_chain: bool, prefix_widths: Sequence[int] | None = None) -> tuple[int, ...]:
    """Draft widths the verification forward is compiled for: a chain step runs the
    narrowest that holds every row's draft (on CPU a T-token forward costs far more
    than a 1-token one once T > 2); a tree runs at full width, or at the narrowest of its
    drafter's `prefix_widths` (a drafter whose first w nodes are themselves a tree, for
    each such w, and that leaves the nodes past its chosen width missing)."""
    if not is_chain:
        if prefix_widths is None:
            return (tree_size,)
        return tuple(sorted({w for w in prefix_widths if 0 <= w < tree_size} | {tree_size}))
    return tuple(sorted({0, max(1, tree_size // 4), tree_size}))


def _verify(model: LlamaModel, static: _SpecStatic, tree: DraftTree, last_token: jax.Array,
            last_position: jax.Array, active: jax.Array, cache: KVCache, key: jax.Array) -> tuple:
    """One target forward over root + tree, then acceptance."""
    tokens, positions, tree_mask, ancestors, depths, valid = verification_inputs(
        tree, last_token, last_position, active)
    logits, cache, hidden = forward(model, tokens, positions=positions, cache=cache, tree_mask=tree_mask,
                                    implementation=static.implementation, return_hidden=True)
    verdict = accept_tree(static.rule, logits, tree, valid, key, static.typical, ancestors=ancestors, depths=depths)
    return tokens, logits, hidden, verdict, depths, valid, cache


def _pad_nodes(w: int, tokens: jax.Array, logits: jax.Array, hidden: jax.Array, verdict: Verdict,
               depths: jax.Array, valid: jax.Array) -> tuple:
    """Pad a narrow verification's node axis to the tree's width (missing nodes, logits and
    hidden 0, path -1)."""
    pad = w - valid.shape[1]

    def nodes(x: jax.Array, value: object) -> jax.Array:
        return jnp.pad(x, ((0, 0), (0, pad)) + ((0, 0),) * (x.ndim - 2), constant_values=value)

    verdict = Verdict(path=nodes(verdict.path, -1), num_accepted=verdict.num_accepted, next_token=verdict.next_token)
    return nodes(tokens, 0), nodes(logits, 0.0), nodes(hidden, 0.0), verdict, nodes(depths, 0), nodes(valid, False)


def _root_only(model: LlamaModel, static: _SpecStatic, tree: DraftTree, last_token: jax.Array,
               last_position: jax.Array, active: jax.Array, cache: KVCache, key: jax.Array) -> tuple:
    """No row has a draft: a plain one-token decode step, shaped like `_verify`'s outputs."""
    b = last_token.shape[0]
    positions = jnp.where(active, last_position, -1)[:, None]
    logits, cache, hidden = forward(model, last_token[:, None].astype(jnp.int32), positions=positions,
                                    cache=cache, implementation=static.implementation, return_hidden=True)
    next_token = sample_tokens(static.rule, logits[:, 0], key)
    verdict = Verdict(path=jnp.full((b, 0), -1, jnp.int32), num_accepted=jnp.zeros((b,), jnp.int32),
                      next_token=next_token)
    tokens = last_token[:, None].astype(jnp.int32)
    empty = jnp.zeros((b, 0), jnp.int32)
    return _pad_nodes(tree.size, tokens, logits, hidden, verdict, empty, empty.astype(bool)) + (cache,)


def _as_chain(tree: DraftTree) -> DraftTree:
    """Enforce what `is_chain` promises (node i follows i - 1; existing nodes form a prefix),
    so a chain commit by `truncate` keeps exactly the accepted slots."""
    w = tree.size
    parents = jnp.broadcast_to(jnp.arange(w, dtype=jnp.int32) - 1, tree.parents.shape)
    valid = jnp.cumprod(tree.valid.astype(jnp.int32), axis=1).astype(bool)
    return DraftTree(tokens=tree.tokens, parents=parents, valid=valid, probs=tree.probs)


def _verify_narrowest(model: LlamaModel, static: _SpecStatic, drafter: Drafter, tree: DraftTree,
                      last_token: jax.Array, last_position: jax.Array, active: jax.Array, cache: KVCache,
                      key: jax.Array) -> tuple:
    """`_verify` at the narrowest compiled width holding every active row's chain (the
    outputs padded back to the tree's width: missing nodes, logits 0, path -1)."""
    w = tree.size
    widths = verify_widths(w, drafter.is_chain, getattr(drafter, "prefix_widths", None))
    if len(widths) == 1:
        return _verify(model, static, tree, last_token, last_position, active, cache, key)
    # The last existing node of any active row: every node before it is kept.
    last = jnp.max(jnp.where(tree.valid, jnp.arange(1, w + 1)[None, :], 0), axis=1)
    needed = jnp.max(jnp.where(active, last, 0))
    branch = jnp.sum(jnp.asarray(widths) < needed)

    def run_width(width: int):  # noqa: ANN202
        def run(cache: KVCache) -> tuple:
            if width == 0:
                return _root_only(model, static, tree, last_token, last_position, active, cache, key)
            narrow = jax.tree_util.tree_map(lambda x: x[:, :width], tree)
            tokens, logits, hidden, verdict, depths, valid, cache = _verify(
                model, static, narrow, last_token, last_position, active, cache, key)
            return _pad_nodes(w, tokens, logits, hidden, verdict, depths, valid) + (cache,)
        return run

    return jax.lax.switch(branch, [run_width(width) for width in widths], cache)


@jax.jit(static_argnums=0, donate_argnums=(7,))
def _speculative_loop(static: _SpecStatic, params, drafter: Drafter, tokens, first, prompt_lengths,  # noqa: ANN001, ANN202
                      max_new, cache, key, stop_ids, prompt_hidden):
    TRACE_COUNTS["speculative"] += 1
    model = nnx.merge(static.graphdef, params)
    b = first.shape[0]
    w = drafter.tree_size
    depth_slots = drafter.max_depth
    history = _initial_history(tokens, prompt_lengths, first, cache.capacity, static.pad_id)
    key, init_key = jax.random.split(key)
    every_hidden = None
    if prompt_hidden.ndim == 3:  # [B, T, D] at every prompt token (a drafter asked for it)
        every_hidden = prompt_hidden
        prompt_hidden = jnp.take_along_axis(prompt_hidden, (prompt_lengths - 1)[:, None, None], axis=1)[:, 0]
    drafter_state = drafter.init(PromptContext(tokens=tokens, lengths=prompt_lengths, history=history,
                                               first_token=first, target=model, rule=static.rule, key=init_key,
                                               hidden=prompt_hidden, prompt_hidden=every_hidden))
    out = jnp.full((b, static.out_len), static.pad_id, jnp.int32).at[:, 0].set(first)
    ones = jnp.ones((b,), jnp.int32)
    zeros_d = jnp.zeros((depth_slots,), jnp.int32)
    state = SpecState(out=out, num_generated=ones, done=stop_hit(first, stop_ids) | (ones >= max_new),
                      cache=cache, history=history, drafter_state=drafter_state, key=key,
                      steps=jnp.zeros((), jnp.int32), accepted=jnp.zeros((b,), jnp.int32),
                      row_steps=jnp.zeros((b,), jnp.int32), proposed_by_depth=zeros_d,
                      accepted_by_depth=zeros_d)
    rows = jnp.arange(b)

    def cond(s: SpecState) -> jax.Array:
        return ~jnp.all(s.done) & (s.steps < static.out_len - 1)

    def body(s: SpecState) -> SpecState:
        active = ~s.done
        last_position = prompt_lengths + s.num_generated - 1
        last_token = jnp.take_along_axis(s.out, (s.num_generated - 1)[:, None], axis=1)[:, 0]
        key, draft_key, accept_key = jax.random.split(s.key, 3)
        ctx = DraftContext(history=s.history, last_position=last_position, last_token=last_token,
                           active=active, key=draft_key, target=model, cache=s.cache, rule=static.rule)
        tree, drafter_state, cache = drafter.propose(s.drafter_state, ctx)
        if drafter.is_chain:
            tree = _as_chain(tree)
        committed = s.cache.lengths
        cache = cache.truncate(committed)
        verify_tokens, logits, hidden, verdict, depths, valid, cache = _verify_narrowest(
            model, static, drafter, tree, last_token, last_position, active, cache, accept_key)
        count = jnp.where(active, verdict.num_accepted, 0)
        # Keep the root and the accepted path (slot of verify token t = committed + t).
        path_t = jnp.where(verdict.path >= 0, verdict.path + 1, 0)
        if drafter.is_chain:
            cache = cache.truncate(committed + jnp.where(active, 1 + count, 0))
        else:
            source = committed[:, None] + jnp.concatenate([jnp.zeros((b, 1), jnp.int32), path_t], axis=1)
            cache = cache.select(source, jnp.where(active, 1 + count, 0), committed)
        # New tokens: the accepted path, then the target's next token.
        path_tokens = jnp.take_along_axis(verify_tokens, path_t, axis=1)  # B W
        index = jnp.arange(w + 1)[None, :]
        new_tokens = jnp.concatenate([path_tokens, jnp.zeros((b, 1), jnp.int32)], axis=1)
        new_tokens = jnp.where(index == count[:, None], verdict.next_token[:, None], new_tokens)
        num_new = count + 1
        is_stop = jnp.any(new_tokens[:, :, None] == stop_ids[None, None, :], axis=-1) & (index < num_new[:, None])
        first_stop = jnp.min(jnp.where(is_stop, index, w + 1), axis=1)
        num_new = jnp.minimum(jnp.minimum(num_new, first_stop + 1), max_new - s.num_generated)
        num_new = jnp.where(active, num_new, 0)
        keep = index < num_new[:, None]
        out_cols = jnp.where(keep, s.num_generated[:, None] + index, static.out_len)
        out = s.out.at[rows[:, None], out_cols].set(new_tokens, mode="drop")
        hist_cols = jnp.where(keep, last_position[:, None] + 1 + index, s.history.shape[1])
        history = s.history.at[rows[:, None], hist_cols].set(new_tokens, mode="drop")
        num_generated = s.num_generated + num_new
        done = s.done | (first_stop < num_new) | (num_generated >= max_new)
        outcome = VerifyOutcome(tree=tree, valid=valid, logits=logits, hidden=hidden, path=verdict.path,
                                num_accepted=count, new_tokens=new_tokens, num_new=num_new, history=history,
                                last_position=last_position + num_new)
        drafter_state = drafter.update(drafter_state, ctx, outcome)
        # Statistics by depth: proposed = a node existed at depth d; accepted = path reached d.
        depth_index = jnp.arange(1, depth_slots + 1)
        proposed = jnp.any(valid[:, :, None] & (depths[:, :, None] == depth_index[None, None, :]), axis=1)
        reached = depth_index[None, :] <= count[:, None]
        proposed_d = jnp.sum(proposed & active[:, None], axis=0, dtype=jnp.int32)
        accepted_d = jnp.sum(reached & active[:, None], axis=0, dtype=jnp.int32)
        return SpecState(out=out, num_generated=num_generated, done=done, cache=cache, history=history,
                         drafter_state=drafter_state, key=key, steps=s.steps + 1,
                         accepted=s.accepted + count, row_steps=s.row_steps + active.astype(jnp.int32),
                         proposed_by_depth=s.proposed_by_depth + proposed_d,
                         accepted_by_depth=s.accepted_by_depth + accepted_d)

    final = jax.lax.while_loop(cond, body, state)
    stopped = stop_hit(jnp.take_along_axis(final.out, (final.num_generated - 1)[:, None], axis=1)[:, 0],
                        stop_ids)
    counters = (final.steps, final.accepted, final.row_steps, final.proposed_by_depth, final.accepted_by_depth)
    return (*replicated_outputs(model, (final.out, final.num_generated, stopped, counters)), final.cache)


def speculative_generate(
    model: LlamaModel,
    prompts: Sequence[Sequence[int]] | np.ndarray,
    *,
    drafter: Drafter,
    max_new_tokens: int | Sequence[int],
    sampling: SamplingRule = Greedy(),
    typical: TypicalAcceptance | None = None,
    cache: CacheFactory | None = None,
    capacity: int | None = None,
    key: jax.Array | int | None = None,
    stop_tokens: Sequence[int] | None = None,
    pad_id: int | None = None,
    prompt_lengths: Sequence[int] | np.ndarray | None = None,
    implementation: str | tuple[str, ...] | None = None,
) -> GenerateOutput:
    """Generate like `generate`, drafting with `drafter` and verifying with the target.

    sampling: Greedy() reproduces greedy decoding exactly; a Sample rule draws
        from the target's filtered law exactly (lossless rejection sampling),
        unless `typical` (Medusa's typical acceptance, lossy) is given.
    capacity: default longest prompt + max_new_tokens + tree size + 1, rounded up
        to a quarter-octave size (`capacity_bucket`; the prompt's bucket padding takes no slot).
    Returns a GenerateOutput whose `stats` is a `SpeculativeStats`.
    """
    config = check_model(model, "speculative_generate")
    check_sampling(sampling, "speculative_generate")
    check_cache_factory(cache, "speculative_generate")
    if not isinstance(drafter, Drafter):
        raise TypeError(f"drafter must implement efficient.decoding.drafters.Drafter, got {type(drafter).__name__}")
    if typical is not None and not isinstance(typical, TypicalAcceptance):
        raise TypeError(f"typical must be a TypicalAcceptance or None, got {type(typical).__name__}")
    check_tree_size(drafter.tree_size, "drafter.tree_size")
    drafter.check(config)
    request = prepare_request(config, prompts, max_new_tokens=max_new_tokens, capacity=capacity,
                              stop_tokens=stop_tokens, pad_id=pad_id, prompt_lengths=prompt_lengths,
                              implementation=implementation, extra_slots=drafter.tree_size + 1)
    batch, max_new = request.batch, request.max_new
    reach = int((batch.lengths + max_new).max()) + drafter.tree_size
    if config.rope.rope_type == "dynamic" and reach > config.max_position_embeddings:
        # Dynamic NTK scales RoPE by the largest position in a forward: tree nodes past the
        # limit would change the committed tokens' keys, and the output would differ.
        raise ValueError(f"rope_type 'dynamic': prompt + max_new_tokens + tree ({reach} positions) exceeds "
                         f"max_position_embeddings {config.max_position_embeddings}; speculative decoding "
                         "would not be lossless there")
    b = batch.batch_size
    kv_cache = build_cache(cache or default_cache, config, b, request.capacity, getattr(model, "sharding", None))
    check_cache_matches(config, kv_cache, b, "speculative_generate", capacity=request.capacity)
    kv_cache = fit_cache_to_layers(model, kv_cache)
    graphdef, params = nnx.split(model)
    out_len = bucket_length(int(max_new.max()), 16)
    prefill_static = LoopStatic(graphdef=graphdef, rule=sampling, implementation=request.implementation,
                                pad_id=request.pad_id, out_len=out_len,
                                all_prompt_hidden=bool(getattr(drafter, "reads_prompt_hidden", False)))
    first, kv_cache, rng, prefill_seconds, prompt_hidden = run_prefill(prefill_static, params, request, kv_cache, key)
    static = _SpecStatic(graphdef=graphdef, rule=sampling, implementation=request.implementation,
                         pad_id=request.pad_id, out_len=out_len, typical=typical)
    start = time.perf_counter()
    out, num_generated, stopped, counters, _ = _speculative_loop(
        static, params, drafter, jnp.asarray(batch.tokens), first, jnp.asarray(batch.lengths),
        jnp.asarray(max_new, jnp.int32), kv_cache, rng, request.stop_ids, prompt_hidden)
    out, num_generated, stopped, counters = jax.device_get((out, num_generated, stopped, counters))
    decode_seconds = time.perf_counter() - start
    steps, accepted, row_steps, proposed_d, accepted_d = counters
    return finish_output(request, out, num_generated, stopped, steps, prefill_seconds, decode_seconds,
                         SpeculativeStats, draft_tokens_accepted=int(accepted.sum()),
                         row_steps=int(row_steps.sum()), proposed_by_depth=tuple(int(x) for x in proposed_d),
                         accepted_by_depth=tuple(int(x) for x in accepted_d))
