"""A small draft model proposes a chain (Leviathan et al. 2023; Chen et al. 2023),
optionally with SpecDec++'s adaptive length (Huang et al. 2024).

    drafter = DraftModelDrafter.create(draft_model, target.config, length=4)
    drafter = DraftModelDrafter.create(draft_model, target.config, length=8, stop_threshold=0.7)

The draft keeps its own dense KV cache. Each step it is rolled back to the
committed prefix minus one token and fed the last two committed tokens (so a
fully accepted chain, whose last draft token was never fed, and a rejected one
are handled alike), then drafts `length` tokens one at a time.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from efficient.cache.dense import DenseKVCache
from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.autoregressive import draft_chain
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import DraftTree, chain, check_tree_size
from efficient.models.config import ModelConfig
from efficient.models.forward import forward
from efficient.models.llama import LlamaModel
from efficient.models.model import fit_cache_to_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class DraftModelDrafter:
    params: nnx.State
    graphdef: nnx.GraphDef = dataclasses.field(metadata=dict(static=True))
    length: int = dataclasses.field(default=4, metadata=dict(static=True))
    stop_threshold: float | None = dataclasses.field(default=None, metadata=dict(static=True))
    implementation: str | tuple[str, ...] | None = dataclasses.field(default=None, metadata=dict(static=True))

    @classmethod
    def create(cls, draft: LlamaModel, target_config: ModelConfig, *, length: int = 4,
               stop_threshold: float | None = None,
               implementation: str | tuple[str, ...] | None = None) -> DraftModelDrafter:
        """length: tokens drafted per step (the most, with `stop_threshold`); stop_threshold:
        SpecDec++'s threshold on P(some drafted token is rejected), in (0, 1)."""
        if not isinstance(draft, LlamaModel):
            raise TypeError(f"draft must be an efficient LlamaModel, got {type(draft).__name__}")
        check_tree_size(length, "length")
        ok = (isinstance(stop_threshold, int | float) and not isinstance(stop_threshold, bool)
              and 0 < stop_threshold < 1)
        if stop_threshold is not None and not ok:
            raise ValueError(f"stop_threshold must be in (0, 1) or None, got {stop_threshold!r}")
        graphdef, params = nnx.split(draft)
        drafter = cls(params=params, graphdef=graphdef, length=int(length),
                      stop_threshold=None if stop_threshold is None else float(stop_threshold),
                      implementation=tuple(implementation) if isinstance(implementation, list) else implementation)
        drafter.check(target_config)
        return drafter

    @property
    def config(self) -> ModelConfig:
        return nnx.merge(self.graphdef, self.params).config

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
        draft_vocab = self.config.vocab_size
        if draft_vocab != target_config.vocab_size:
            raise ValueError(f"draft model vocab_size {draft_vocab} != target vocab_size "
                             f"{target_config.vocab_size}: a draft must share the target's tokenizer")

    def init(self, prompt: PromptContext) -> KVCache:
        draft = nnx.merge(self.graphdef, self.params)
        b, t = prompt.tokens.shape
        cache = fit_cache_to_layers(draft, DenseKVCache.for_model(draft.config, b, prompt.history.shape[1]))
        index = jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.where(index < prompt.lengths[:, None], index, -1)
        _, cache = forward(draft, prompt.tokens, positions=positions, cache=cache,
                           logits_indices=jnp.zeros((b, 1), jnp.int32), implementation=self.implementation)
        return cache.truncate(prompt.lengths)

    def propose(self, state: KVCache, ctx: DraftContext) -> tuple[DraftTree, KVCache, KVCache]:
        draft = nnx.merge(self.graphdef, self.params)
        last = ctx.last_position
        cache = state.truncate(jnp.maximum(last - 1, 0))
        previous = jnp.take_along_axis(ctx.history, jnp.maximum(last - 1, 0)[:, None], axis=1)[:, 0]
        tokens = jnp.stack([previous, ctx.last_token], axis=1)
        positions = jnp.where(ctx.active[:, None], jnp.stack([last - 1, last], axis=1), -1)
        logits, cache = forward(draft, tokens, positions=positions, cache=cache,
                                logits_indices=jnp.ones((tokens.shape[0], 1), jnp.int32),
                                implementation=self.implementation)

        def step(carry: Any, token: jax.Array, position: jax.Array) -> tuple[jax.Array, Any]:
            step_logits, carry = forward(draft, token[:, None], positions=position[:, None], cache=carry,
                                         implementation=self.implementation)
            return step_logits[:, 0], carry

        drafted, counts, laws, cache = draft_chain(step, cache, logits[:, 0], last, self.length, ctx.rule,
                                                   ctx.key, ctx.active, self.stop_threshold)
        return chain(drafted, counts, laws), cache, ctx.cache

    def update(self, state: KVCache, ctx: DraftContext, outcome: VerifyOutcome) -> KVCache:
        return state
