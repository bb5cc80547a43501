"""The drafter protocol: what a speculative method plugs into the one verifier.

A drafter is a pytree (`jax.tree_util.register_dataclass`): its array fields
(a draft model's parameters, a calibrated table) are traced jit arguments, its
other fields (sizes, thresholds, a GraphDef) are static and hashable. Inside
the jitted decode loop the loop calls, per row batch:

    state = drafter.init(prompt)                         # once, after the target prefill
    tree, state, cache = drafter.propose(state, ctx)     # every step
    state = drafter.update(state, ctx, outcome)          # after the verifier

`propose` may write into the target's cache beyond the committed length (a
self-speculative draft does); the loop truncates it back before verifying.
Trees have a static size `tree_size` (W nodes) and depth at most `max_depth`.
A drafter whose `is_chain` is True is committed by `truncate`; the loop
enforces the chain shape (parents i - 1, existing nodes a prefix).
"""

from __future__ import annotations

import dataclasses
from typing import Any, Protocol, runtime_checkable

import jax
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.protocol import KVCache
from efficient.decoding.sampling import SamplingRule
from efficient.decoding.tree import DraftTree
from efficient.models.llama import LlamaModel


@dataclasses.dataclass(frozen=True)
class PromptContext:
    """What `init` sees: the right-padded prompts and the token history buffer."""

    tokens: Int[Array, "B Tp"]  # right-padded prompts
    lengths: Int[Array, " B"]
    history: Int[Array, "B C"]  # token at each position (prompt + first generated token), pad after
    first_token: Int[Array, " B"]  # the target's first generated token (position lengths[b])
    target: LlamaModel
    rule: SamplingRule
    key: jax.Array = dataclasses.field(default_factory=lambda: jax.random.key(0))
    # The target's final-normed hidden state at each row's last prompt token (whose logits
    # gave first_token): what Medusa-style heads draft from.
    hidden: Float[Array, "B D"] | None = None
    # The same at every prompt token, for a drafter whose `reads_prompt_hidden` is True (a
    # feature-level drafter builds its own cache over the prompt's features); None otherwise.
    prompt_hidden: Float[Array, "B Tp D"] | None = None


@dataclasses.dataclass(frozen=True)
class DraftContext:
    """What `propose` / `update` see at one step (before the verification forward)."""

    history: Int[Array, "B C"]  # tokens by position; valid up to last_position (inclusive)
    last_position: Int[Array, " B"]  # position of the last committed token (the tree's root)
    last_token: Int[Array, " B"]
    active: Bool[Array, " B"]  # rows still generating
    key: jax.Array
    target: LlamaModel
    cache: KVCache  # the target cache, holding positions < last_position
    rule: SamplingRule


@dataclasses.dataclass(frozen=True)
class VerifyOutcome:
    """What the verifier decided at one step (given to `update`)."""

    tree: DraftTree
    valid: Bool[Array, "B W"]  # node existence after ancestry closure
    logits: Float[Array, "B T V"]  # target logits at the root (0) and node i (1 + i)
    hidden: Float[Array, "B T D"] | None  # the target's final-normed hidden state, same indices
    path: Int[Array, "B W"]  # accepted node ids, -1 after num_accepted
    num_accepted: Int[Array, " B"]
    new_tokens: Int[Array, "B W1"]  # accepted tokens then the target's next token
    num_new: Int[Array, " B"]  # tokens appended to each row this step
    history: Int[Array, "B C"]  # updated history (new tokens written)
    last_position: Int[Array, " B"]  # position of the new last committed token


@runtime_checkable
class Drafter(Protocol):
    @property
    def tree_size(self) -> int: ...

    @property
    def max_depth(self) -> int: ...

    @property
    def is_chain(self) -> bool: ...

    def init(self, prompt: PromptContext) -> Any: ...

    def propose(self, state: Any, ctx: DraftContext) -> tuple[DraftTree, Any, KVCache]: ...

    def update(self, state: Any, ctx: DraftContext, outcome: VerifyOutcome) -> Any: ...

    def check(self, target_config: Any) -> None:
        """Raise a ValueError naming the problem if this drafter cannot serve the target."""
        ...
