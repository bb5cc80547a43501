"""Shared checks for speculative decoding tests: greedy equivalence with `generate`."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from efficient.decoding import generate
from efficient.decoding.drafters import Drafter
from efficient.decoding.speculative import speculative_generate
from efficient.decoding.sampling import Sample
from efficient.decoding.verify import target_probs
from efficient.models import LlamaModel, forward

# Ragged batch of 3 (lengths 5, 3, 9) and a single prompt, ids inside the tiny vocabulary (61).
RAGGED_PROMPTS = [[1, 2, 3, 4, 5], [7, 8, 9], [10, 11, 12, 13, 14, 15, 16, 17, 18]]
SINGLE_PROMPT = [[3, 14, 15, 9, 26, 5, 35]]


def assert_matches_greedy(model: LlamaModel, drafter: Drafter, prompts: Sequence[Sequence[int]], *,
                          max_new_tokens: int = 24, stop_tokens: Sequence[int] = (), **kwargs: object):
    """Speculative greedy output == plain greedy output (tokens, lengths, stops); returns it."""
    reference = generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=stop_tokens)
    out = speculative_generate(model, prompts, drafter=drafter, max_new_tokens=max_new_tokens,
                               stop_tokens=stop_tokens, **kwargs)
    assert out.sequences() == reference.sequences(), (out.sequences(), reference.sequences())
    np.testing.assert_array_equal(out.stopped, reference.stopped)
    assert out.stats.generated_tokens == reference.stats.generated_tokens
    return out


# ---------------------------------------------------------------- oracle drafters
import dataclasses  # noqa: E402

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from efficient.decoding.tree import DraftTree, chain, template_parents  # noqa: E402

# root -> 3 children -> 2 children each -> 1 child each: 15 nodes, depth 3.
ORACLE_TEMPLATE = ((3,), (2, 2, 2), (1, 1, 1, 1, 1, 1))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class OracleDrafter:
    """Knows the greedy continuation (`future[b, position]`). Chain mode proposes the next
    `length` tokens (shifted by one id when `wrong`); tree mode hides the right path
    under a different branch each step (chosen by the root position) among wrong siblings."""

    future: jax.Array  # int32[B, C]: the greedy token at each position
    length: int = dataclasses.field(default=4, metadata=dict(static=True))
    wrong: bool = dataclasses.field(default=False, metadata=dict(static=True))
    tree: bool = dataclasses.field(default=False, metadata=dict(static=True))
    vocab_size: int = dataclasses.field(default=61, metadata=dict(static=True))

    @property
    def tree_size(self) -> int:
        return len(template_parents(ORACLE_TEMPLATE)) if self.tree else self.length

    @property
    def max_depth(self) -> int:
        return len(ORACLE_TEMPLATE) if self.tree else self.length

    @property
    def is_chain(self) -> bool:
        return not self.tree

    def check(self, target_config) -> None:  # noqa: ANN001
        pass

    def init(self, prompt):  # noqa: ANN001, ANN201
        return jnp.zeros((), jnp.int32)

    def update(self, state, ctx, outcome):  # noqa: ANN001, ANN201
        return state

    def _truth(self, ctx, depth: int) -> jax.Array:  # noqa: ANN001
        index = jnp.clip(ctx.last_position + depth, 0, self.future.shape[1] - 1)
        return jnp.take_along_axis(self.future, index[:, None], axis=1)[:, 0]

    def propose(self, state, ctx):  # noqa: ANN001, ANN201
        b = ctx.last_position.shape[0]
        if not self.tree:
            tokens = jnp.stack([self._truth(ctx, d + 1) for d in range(self.length)], axis=1)
            if self.wrong:
                tokens = (tokens + 1) % self.vocab_size
            return chain(tokens, jnp.full((b,), self.length)), state, ctx.cache
        parents = template_parents(ORACLE_TEMPLATE)
        # The right child at each depth: rank (position // divisor) % branching.
        right = [ctx.last_position % 3, (ctx.last_position // 3) % 2, jnp.zeros_like(ctx.last_position)]
        tokens, on_path = [], []
        node_depth: list[int] = []
        counters: dict[int, int] = {}
        for parent in parents.tolist():
            depth = 1 if parent < 0 else node_depth[parent] + 1
            rank = counters.get(parent, 0)
            counters[parent] = rank + 1
            node_depth.append(depth)
            parent_ok = jnp.ones((b,), bool) if parent < 0 else on_path[parent]
            ok = parent_ok & (right[depth - 1] == rank)
            truth = self._truth(ctx, depth)
            tokens.append(jnp.where(ok, truth, (truth + 1 + rank) % self.vocab_size))
            on_path.append(ok)
        tree = DraftTree(tokens=jnp.stack(tokens, 1).astype(jnp.int32), parents=jnp.broadcast_to(jnp.asarray(parents), (b, len(tokens))),
                         valid=jnp.ones((b, len(tokens)), bool))
        return tree, state, ctx.cache


def greedy_future(model: LlamaModel, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                  width: int = 256) -> jax.Array:
    """[B, width] greedy tokens by position (prompt then greedy continuation), for OracleDrafter."""
    out = generate(model, prompts, max_new_tokens=max_new_tokens, stop_tokens=())
    future = np.zeros((len(prompts), width), np.int32)
    for i, (prompt, gen) in enumerate(zip(prompts, out.sequences(), strict=True)):
        row = list(prompt) + gen
        future[i, : len(row)] = row
    return jnp.asarray(future)


# ---------------------------------------------------------------- recording drafter
STEPS: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []  # per verification: last_position, accepted, new [B]


def _record(last: np.ndarray, accepted: np.ndarray, new: np.ndarray) -> None:
    STEPS.append((np.asarray(last).copy(), np.asarray(accepted).copy(), np.asarray(new).copy()))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RecordingDrafter:
    """Wraps a drafter and reports every verification (all rows) to STEPS."""

    inner: object
    tree_size = property(lambda self: self.inner.tree_size)
    max_depth = property(lambda self: self.inner.max_depth)
    is_chain = property(lambda self: self.inner.is_chain)

    def check(self, target_config: object) -> None:
        self.inner.check(target_config)

    def init(self, prompt: object) -> object:
        return self.inner.init(prompt)

    def propose(self, state: object, ctx: object) -> tuple:
        return self.inner.propose(state, ctx)

    def update(self, state: object, ctx: object, outcome: object) -> object:
        jax.debug.callback(_record, ctx.last_position, outcome.num_accepted, outcome.num_new)
        return self.inner.update(state, ctx, outcome)


def accepted_draft_indices(prompt_lengths: Sequence[int]) -> list[set[int]]:
    """Per row, the output indices emitted as accepted draft tokens in the recorded STEPS."""
    rows: list[set[int]] = [set() for _ in prompt_lengths]
    for last, accepted, new in STEPS:
        for b, length in enumerate(prompt_lengths):
            if new[b] > 0:
                first = int(last[b]) - length + 1  # output index of the step's first new token
                rows[b] |= set(range(first, first + min(int(accepted[b]), int(new[b]))))
    return rows


def exact_pair_law(model, prompt: list[int], rule: Sample) -> np.ndarray:  # noqa: ANN001
    """p(x1, x2 | prompt) under the rule's filtered law, by enumeration: [V, V]."""
    v = model.config.vocab_size
    logits, _ = forward(model, jnp.asarray([prompt]))
    p1 = np.asarray(target_probs(rule, logits[:, -1:]))[0, 0]
    seqs = jnp.asarray([prompt + [x] for x in range(v)])
    logits2, _ = forward(model, seqs)
    p2 = np.asarray(target_probs(rule, logits2[:, -1:]))[:, 0]
    return p1[:, None] * p2
