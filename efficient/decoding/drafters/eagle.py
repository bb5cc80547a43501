"""EAGLE-style feature-level drafting with EAGLE-2's dynamic tree.

    loaded = load_feature_drafter("checkpoints/eagle-smollm2", target.config)
    drafter = EagleDrafter.create(target, loaded.model, loaded.vocab, tree_size=16, depth=5, beam=4, branch=4)
    out = speculative_generate(target, prompts, drafter=drafter, max_new_tokens=128)

The draft model (`eagle_model.FeatureDraftModel`, Li et al. 2024) keeps its own
one-layer KV cache over (feature, token) pairs: the entry at position p reads
the target's feature f_{p-1} and token x_p and predicts f_p. Each step:

1. The pairs committed since the last step are fed with the target's *true*
   features (the verifier returns them at the root and every node), replacing
   what was drafted there from predicted features; the output at the root
   predicts the root's feature, whose LM-head logits give depth 1.
2. Dynamic tree (EAGLE-2, Li et al. 2024b; DySpec): `depth` levels; at each, the
   `beam` nodes of highest path probability (the product of the draft's
   probabilities along the path) are expanded into their `branch` most likely
   children; a node's children are scored from the draft's feature predicted at
   that node (the model runs over the beam nodes so far, each attending to the
   committed context and its own ancestors). The `tree_size` nodes of highest
   path probability among all candidates form the tree: it grows where the draft
   is confident and stays shallow where it is not.

With `online` (an `OnlineWidth` from the start-up goodput table), each step keeps
only the best w nodes, w chosen per row from the acceptance seen so far (0: no
draft, and the loop runs a plain step); nodes are ordered best first, so every
prefix is a tree and the loop verifies only as many as the widest row kept.

Drafted tokens are point masses (the recursive verifier is lossless for them
under sampling, as for Medusa's top-k). Drafting scores only the draft
vocabulary (FR-Spec); the draft model reads the target's own embeddings and
LM-head rows, so the drafter holds no vocabulary-sized parameters.
"""

from __future__ import annotations

import dataclasses
from typing import Any, ClassVar

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Bool, Float, Int

from efficient.cache.dense import DenseKVCache
from efficient.cache.protocol import KVCache
from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.drafters.eagle_model import FeatureDraftModel
from efficient.decoding.online_width import OnlineWidth
from efficient.decoding.tree import DraftTree, check_tree_size
from efficient.models.model import fit_cache_to_layers


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleState:
    cache: KVCache  # the draft layer's cache: positions < start hold (true feature, token) pairs
    features: Float[Array, "B P D"]  # pending pairs: the target's feature f_{start + i - 1}
    start: Int[Array, " B"]  # position of the first pending token (its token is in the history)
    count: Int[Array, " B"]  # pending pairs; the last one's position is the root's
    scale: Float[Array, " B"]  # online acceptance scale r (`OnlineWidth`; 1 without it)
    width: Int[Array, " B"]  # nodes the last proposal kept per row


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class EagleDrafter:
    params: nnx.State
    vocab: Int[Array, " Vd"]  # draft vocabulary (target ids)
    head_weight: Float[Array, "Vd D"]  # the target LM head's rows for `vocab`
    graphdef: nnx.GraphDef = dataclasses.field(metadata=dict(static=True))
    size: int = dataclasses.field(metadata=dict(static=True))
    depth: int = dataclasses.field(metadata=dict(static=True))
    beam: int = dataclasses.field(metadata=dict(static=True))
    branch: int = dataclasses.field(metadata=dict(static=True))
    hidden_size: int = dataclasses.field(metadata=dict(static=True))
    vocab_size: int = dataclasses.field(metadata=dict(static=True))
    online: OnlineWidth | None = dataclasses.field(default=None, metadata=dict(static=True))
    reads_prompt_hidden: ClassVar[bool] = True  # the prefill hands `init` every prompt feature

    @staticmethod
    def create(target: Any, model: FeatureDraftModel, vocab: np.ndarray, *, tree_size: int = 16, depth: int = 5,
               beam: int = 4, branch: int = 4, online: OnlineWidth | None = None) -> EagleDrafter:
        """A drafter of at most `tree_size` nodes chosen from `depth` levels of `beam` expanded
        nodes x `branch` children each (EAGLE-2's top-k and depth). `online`: each step keeps
        the best nodes up to the width its goodput table picks for the acceptance seen so far
        (0: no draft, the loop runs a plain step); its widths must not exceed `tree_size`."""
        config = target.config
        check_tree_size(tree_size)
        for name, value in (("depth", depth), ("beam", beam), ("branch", branch)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        vocab = np.asarray(vocab, np.int32)
        if beam > branch:
            raise ValueError(f"beam {beam} exceeds branch {branch}: the first beam is the root's children")
        if branch > vocab.size:
            raise ValueError(f"branch {branch} exceeds the draft vocabulary's {vocab.size} tokens")
        candidates = branch + (depth - 1) * beam * branch
        if tree_size > candidates:
            raise ValueError(f"tree_size {tree_size} exceeds the {candidates} candidates that depth {depth}, "
                             f"beam {beam} and branch {branch} produce")
        if online is not None and (not isinstance(online, OnlineWidth) or max(online.widths) > tree_size):
            raise ValueError(f"online must be an OnlineWidth whose widths are <= tree_size {tree_size}, got {online!r}")
        if model.hidden_size != config.hidden_size:
            raise ValueError(f"the feature drafter has hidden size {model.hidden_size}, the target "
                             f"{config.hidden_size}: it belongs to another model")
        if vocab.ndim != 1 or vocab.size == 0 or vocab.min() < 0 or vocab.max() >= config.vocab_size:
            raise ValueError(f"vocab must be draft-vocabulary ids inside the target's [0, {config.vocab_size})")
        graphdef, params = nnx.split(model)
        return EagleDrafter(params=params, vocab=jnp.asarray(vocab),
                            head_weight=jnp.asarray(target.lm_head_rows(jnp.asarray(vocab)), jnp.float32),
                            graphdef=graphdef, size=int(tree_size), depth=depth, beam=beam, branch=branch,
                            hidden_size=config.hidden_size, vocab_size=config.vocab_size, online=online)

    # -------------------------------------------------------------- protocol
    @property
    def tree_size(self) -> int:
        return self.size

    @property
    def max_depth(self) -> int:
        return self.depth

    @property
    def is_chain(self) -> bool:
        return False

    @property
    def prefix_widths(self) -> tuple[int, ...] | None:
        """Nodes are ordered best first, so every prefix is a tree: with `online`, the loop
        verifies only as many as the widest row kept."""
        return None if self.online is None else self.online.widths

    def check(self, target_config: Any) -> None:
        if target_config.hidden_size != self.hidden_size or target_config.vocab_size != self.vocab_size:
            raise ValueError(f"EagleDrafter was built for hidden_size {self.hidden_size} / vocab_size "
                             f"{self.vocab_size}, the target has {target_config.hidden_size} / "
                             f"{target_config.vocab_size}")

    def _model(self) -> FeatureDraftModel:
        return nnx.merge(self.graphdef, self.params)

    def init(self, prompt: PromptContext) -> EagleState:
        """Prefill the draft cache with the prompt's pairs (f_{p-1}, x_p), p < length (f_{-1} = 0);
        the root's pair (f_{length-1}, first token) is pending."""
        if prompt.prompt_hidden is None:
            raise ValueError("EagleDrafter needs the target's feature at every prompt token "
                             "(PromptContext.prompt_hidden; speculative_generate asks the prefill for it)")
        model = self._model()
        b, t = prompt.tokens.shape
        scratch = max(self.depth + 1, (self.depth - 1) * self.beam)
        cache = fit_cache_to_layers(model.body, DenseKVCache.for_model(model.body.config, b,
                                                                       prompt.history.shape[1] + scratch))
        shifted = jnp.concatenate([jnp.zeros_like(prompt.prompt_hidden[:, :1]), prompt.prompt_hidden[:, :-1]], 1)
        index = jnp.arange(t, dtype=jnp.int32)[None, :]
        positions = jnp.where(index < prompt.lengths[:, None], index, -1)
        _, cache = model(shifted, prompt.target.embed(prompt.tokens), positions=positions, cache=cache,
                         fresh_cache=True)
        features = jnp.zeros((b, self.depth + 1, self.hidden_size), jnp.float32).at[:, 0].set(
            prompt.hidden.astype(jnp.float32))
        return EagleState(cache=cache.truncate(prompt.lengths), features=features, start=prompt.lengths,
                          count=jnp.ones((b,), jnp.int32), scale=jnp.ones((b,), jnp.float32),
                          width=jnp.full((b,), self.size, jnp.int32))

    def _log_probs(self, feature: Float[Array, "*B D"]) -> Float[Array, "*B Vd"]:
        logits = jnp.einsum("...d,vd->...v", feature.astype(jnp.float32), self.head_weight)
        return jax.nn.log_softmax(logits, axis=-1)

    def propose(self, state: EagleState, ctx: DraftContext) -> tuple[DraftTree, EagleState, KVCache]:
        model = self._model()
        embed = ctx.target.embed
        b, p = state.features.shape[:2]
        # 1. Feed the pending pairs with the target's true features.
        index = jnp.arange(p, dtype=jnp.int32)[None, :]
        pending = state.start[:, None] + index
        tokens = jnp.take_along_axis(ctx.history, jnp.minimum(pending, ctx.history.shape[1] - 1), axis=1)
        live = (index < state.count[:, None]) & ctx.active[:, None]
        out, cache = model(state.features, embed(tokens), positions=jnp.where(live, pending, -1),
                           cache=state.cache.truncate(state.start))
        root = jnp.take_along_axis(out, jnp.maximum(state.count - 1, 0)[:, None, None], axis=1)[:, 0]  # B D
        cache = cache.truncate(ctx.last_position + 1)
        width = (jnp.full((b,), self.size, jnp.int32) if self.online is None
                 else jnp.where(ctx.active, self.online.choose(state.scale), 0))

        def expand(_: None) -> DraftTree:
            return self._expand(model, embed, root, cache, ctx)

        def nothing(_: None) -> DraftTree:
            zeros = jnp.zeros((b, self.size), jnp.int32)
            return DraftTree(tokens=zeros, parents=zeros - 1, valid=zeros > 0)

        tree = (expand(None) if self.online is None
                else jax.lax.cond(jnp.any(width > 0), expand, nothing, None))
        tree = dataclasses.replace(tree, valid=tree.valid & (jnp.arange(self.size)[None, :] < width[:, None]))
        return tree, dataclasses.replace(state, cache=cache, width=width), ctx.cache

    def _expand(self, model: FeatureDraftModel, embed: Any, root: Float[Array, "B D"], cache: KVCache,
                ctx: DraftContext) -> DraftTree:
        """EAGLE-2's expansion from the root's predicted feature (see the module docstring)."""
        b = root.shape[0]
        k, m = self.beam, self.branch
        # Depth 1: the root's `branch` children; the beam is the first `beam` of them.
        scores, ids = jax.lax.top_k(self._log_probs(root), m)  # B m (sorted)
        all_scores, all_ids, all_parent = [scores], [ids], [jnp.full((b, m), -1, jnp.int32)]
        beam_gid = jnp.broadcast_to(jnp.arange(k, dtype=jnp.int32), (b, k))
        beam_score, beam_id = scores[:, :k], ids[:, :k]
        beam_input = jnp.broadcast_to(root[:, None], (b, k, self.hidden_size))
        beam_parent = jnp.full((b, k), -1, jnp.int32)  # index among the scratch nodes (-1: the root)
        s_feats = jnp.zeros((b, 0, self.hidden_size), jnp.float32)
        s_ids = jnp.zeros((b, 0), jnp.int32)
        s_anc = jnp.zeros((b, 0, 0), bool)
        offset = m
        for d in range(2, self.depth + 1):
            # The beam of depth d - 1 joins the scratch nodes: its ancestors are its parent's, and itself.
            n = s_ids.shape[1]
            parent_anc = jnp.take_along_axis(
                jnp.pad(s_anc, ((0, 0), (0, 1), (0, 0))), jnp.where(beam_parent < 0, n, beam_parent)[:, :, None],
                axis=1) if n else jnp.zeros((b, k, 0), bool)
            new_anc = jnp.concatenate([parent_anc, jnp.broadcast_to(jnp.eye(k, dtype=bool), (b, k, k))], axis=2)
            s_anc = jnp.concatenate([jnp.pad(s_anc, ((0, 0), (0, 0), (0, k))), new_anc], axis=1)
            s_feats = jnp.concatenate([s_feats, beam_input], axis=1)
            s_ids = jnp.concatenate([s_ids, beam_id], axis=1)
            positions = jnp.where(ctx.active[:, None], ctx.last_position[:, None] + (
                jnp.arange(n + k, dtype=jnp.int32) // k + 1)[None, :], -1)
            predicted, _ = model(s_feats, embed(self.vocab[s_ids]), positions=positions, cache=cache,
                                 tree_mask=s_anc)
            at_beam = predicted[:, n:]  # B k D: the feature predicted at each beam node
            child_scores, child_ids = jax.lax.top_k(self._log_probs(at_beam), m)  # B k m
            flat_scores = (beam_score[:, :, None] + child_scores).reshape(b, k * m)
            flat_ids = child_ids.reshape(b, k * m)
            all_scores.append(flat_scores)
            all_ids.append(flat_ids)
            all_parent.append(jnp.repeat(beam_gid, m, axis=1))
            top_scores, top = jax.lax.top_k(flat_scores, k)
            beam_gid, beam_score = offset + top, top_scores
            beam_id = jnp.take_along_axis(flat_ids, top, axis=1)
            beam_input = jnp.take_along_axis(at_beam, (top // m)[:, :, None], axis=1)
            beam_parent = n + top // m
            offset += k * m
        return self._select(jnp.concatenate(all_scores, 1), jnp.concatenate(all_ids, 1),
                            jnp.concatenate(all_parent, 1), ctx.active)

    def _select(self, scores: Float[Array, "B G"], ids: Int[Array, "B G"], parent_gid: Int[Array, "B G"],
                active: Bool[Array, " B"]) -> DraftTree:
        """The `tree_size` candidates of highest path log-probability, best first (a parent's path
        probability is at least its child's, and ties keep candidate order, in which parents come
        first: every prefix is a tree), parents re-indexed into the tree (-1: the root)."""
        _, chosen = jax.lax.top_k(scores, self.size)  # B W
        parent = jnp.take_along_axis(parent_gid, chosen, axis=1)
        match = parent[:, :, None] == chosen[:, None, :]  # B W W: node i's parent is node j
        found = jnp.any(match, axis=2)
        at = jnp.argmax(match, axis=2)
        parents = jnp.where(parent < 0, -1, jnp.where(found, at, jnp.arange(self.size)))
        found &= at < jnp.arange(self.size)  # never after the child
        valid = active[:, None] & ((parent < 0) | found)
        tokens = self.vocab[jnp.take_along_axis(ids, chosen, axis=1)]
        return DraftTree(tokens=tokens.astype(jnp.int32), parents=parents.astype(jnp.int32), valid=valid)

    def update(self, state: EagleState, ctx: DraftContext, outcome: VerifyOutcome) -> EagleState:
        """Pending: the committed tokens after the old root (accepted nodes, then the target's
        token), with the target's features at the root and at each accepted node."""
        p = state.features.shape[1]
        path = jnp.pad(outcome.path, ((0, 0), (0, max(0, p - 1 - outcome.path.shape[1]))),
                       constant_values=-1)[:, : p - 1]
        index = jnp.concatenate([jnp.zeros_like(path[:, :1]), jnp.maximum(path, 0) + 1], axis=1)  # B P
        features = jnp.take_along_axis(outcome.hidden, index[:, :, None], axis=1).astype(jnp.float32)
        active = ctx.active
        scale = state.scale if self.online is None else jnp.where(
            active, self.online.observe(state.scale, state.width, outcome.num_accepted), state.scale)
        return EagleState(cache=state.cache,
                          features=jnp.where(active[:, None, None], features, state.features),
                          start=jnp.where(active, ctx.last_position + 1, state.start),
                          count=jnp.where(active, outcome.num_accepted + 1, state.count),
                          scale=scale, width=state.width)
