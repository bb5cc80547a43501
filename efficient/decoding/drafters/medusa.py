"""Medusa-1 heads: K residual blocks over the target's last hidden state draft a token tree.

    heads = load_medusa_heads("checkpoints/medusa-smollm2", target.config)
    drafter = MedusaDrafter.create(target, heads, accuracy=heads.accuracy, tree_size=16)
    out = speculative_generate(target, prompts, drafter=drafter, max_new_tokens=128)

Head k (1-based) reads the final-normed hidden state h_t at the position whose
logits chose the current root token x_{t+1}, and predicts x_{t+1+k}:
z_k = h_t + SiLU(W_k h_t + b_k), logits_k = E_d z_k (Cai et al. 2024, Medusa;
W_k starts at zero, so an untrained head repeats the LM head's guess).

Two choices of ours, both to keep drafting cheap on a bandwidth-bound device:
the heads share the target's (frozen) LM head instead of owning one each, and
read only a draft vocabulary E_d of the Vd most frequent tokens of the target's
own generations (FR-Spec, Zhao et al. 2025): a token outside it is never
drafted (its loss is the measured coverage, `MedusaHeads.coverage`).

The tree is static (Medusa's sparse tree): node = (depth d, rank r) below a
parent, its token the rank-r candidate of head d. `medusa_tree` picks the
`tree_size` nodes of largest estimated path acceptance, the product of each
head's measured accuracy at each rank (the paper's construction). Verification
is the shared lossless verifier; Medusa's typical acceptance is its lossy
option (`speculative_generate(..., typical=TypicalAcceptance())`).
"""

from __future__ import annotations

import dataclasses
import heapq
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from efficient.decoding.drafters.base import DraftContext, PromptContext, VerifyOutcome
from efficient.decoding.tree import DraftTree
from efficient.models.config import ModelConfig

HEADS_FILE = "medusa_heads.npz"
META_FILE = "medusa.json"


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MedusaHeads:
    """K residual heads (parameters only) and the draft vocabulary they score."""

    weight: Float[Array, "K D D"]
    bias: Float[Array, "K D"]
    vocab: Int[Array, " Vd"]  # target token ids of the draft vocabulary, most frequent first

    @property
    def num_heads(self) -> int:
        return int(self.weight.shape[0])

    @staticmethod
    def init(num_heads: int, hidden_size: int, vocab: np.ndarray) -> MedusaHeads:
        """Zero blocks: every head starts as the LM head (Medusa's initialisation)."""
        if not isinstance(num_heads, int) or num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
        vocab = np.asarray(vocab, np.int32)
        if vocab.ndim != 1 or vocab.size == 0 or len(np.unique(vocab)) != vocab.size:
            raise ValueError(f"vocab must be a non-empty 1-D array of distinct token ids, got shape {vocab.shape}")
        return MedusaHeads(weight=jnp.zeros((num_heads, hidden_size, hidden_size), jnp.float32),
                           bias=jnp.zeros((num_heads, hidden_size), jnp.float32), vocab=jnp.asarray(vocab))

    def features(self, hidden: Float[Array, "*B D"]) -> Float[Array, "*B K D"]:
        h = hidden.astype(jnp.float32)[..., None, :]
        inner = jnp.einsum("...d,kde->...ke", hidden.astype(jnp.float32), self.weight.astype(jnp.float32))
        return h + jax.nn.silu(inner + self.bias.astype(jnp.float32))

    def logits(self, hidden: Float[Array, "*B D"], head_weight: Float[Array, "Vd D"]) -> Float[Array, "*B K Vd"]:
        """Draft-vocabulary logits of every head (float32)."""
        return jnp.einsum("...kd,vd->...kv", self.features(hidden), head_weight.astype(jnp.float32))


def frequent_vocab(tokens: np.ndarray, size: int, vocab_size: int) -> np.ndarray:
    """The `size` most frequent ids of `tokens` (ties by id), padded with the lowest unused ids."""
    if not isinstance(size, int) or not 0 < size <= vocab_size:
        raise ValueError(f"draft vocabulary size must be in [1, {vocab_size}], got {size!r}")
    counts = np.bincount(np.asarray(tokens).ravel(), minlength=vocab_size)
    order = np.lexsort((np.arange(vocab_size), -counts))
    return order[:size].astype(np.int32)


def medusa_tree(accuracy: np.ndarray, tree_size: int) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
    """(depth, parent, rank) per node, nodes in best-first order: the `tree_size` nodes of
    largest estimated acceptance, a node's estimate being the product over its path of
    accuracy[d - 1, r] (head d's rank-r candidate is the target's token). Parents precede
    children, so node ids are a valid DraftTree order."""
    accuracy = np.asarray(accuracy, np.float64)
    if accuracy.ndim != 2 or accuracy.size == 0:
        raise ValueError(f"accuracy must be [heads, ranks], got shape {accuracy.shape}")
    if not isinstance(tree_size, int) or isinstance(tree_size, bool) or tree_size < 1:
        raise ValueError(f"tree_size must be a positive int (a node budget of at least 1), got {tree_size!r}")
    k, r = accuracy.shape
    depth, parent, rank = [], [], []
    frontier: list[tuple[float, int, int, int, int]] = []  # (-prob, order, depth, parent, rank)
    order = 0
    for j in range(r):
        heapq.heappush(frontier, (-accuracy[0, j], order, 1, -1, j))
        order += 1
    while frontier and len(depth) < tree_size:
        neg, _, d, p, j = heapq.heappop(frontier)
        node = len(depth)
        depth.append(d)
        parent.append(p)
        rank.append(j)
        if d < k:
            for jj in range(r):
                heapq.heappush(frontier, (neg * accuracy[d, jj], order, d + 1, node, jj))
                order += 1
    return tuple(depth), tuple(parent), tuple(rank)


def expected_accepted(accuracy: np.ndarray, tree: tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]) -> float:
    """Tokens per verification the estimate promises: 1 + the summed path acceptance of every node."""
    depth, parent, rank = tree
    prob = []
    for d, p, j in zip(depth, parent, rank, strict=True):
        prob.append(float(accuracy[d - 1, j]) * (1.0 if p < 0 else prob[p]))
    return 1.0 + float(np.sum(prob))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class MedusaDrafter:
    """A static Medusa tree drafted from the heads (see the module docstring); state: h_t [B, D]."""

    heads: MedusaHeads
    head_weight: Float[Array, "Vd D"]  # the target LM head's rows for heads.vocab
    depth: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    parent: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    rank: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    hidden_size: int = dataclasses.field(metadata=dict(static=True))
    vocab_size: int = dataclasses.field(metadata=dict(static=True))

    @staticmethod
    def create(target: Any, heads: MedusaHeads, *, accuracy: np.ndarray, tree_size: int = 16) -> MedusaDrafter:
        """The drafter of `heads` for `target`, with the `tree_size`-node tree `accuracy` [K, R]
        (head d's measured rank-r accuracy) estimates best."""
        config = target.config
        check_heads(heads, config)
        accuracy = np.asarray(accuracy)
        if accuracy.ndim != 2 or accuracy.shape[0] != heads.num_heads:
            raise ValueError(f"accuracy must be [{heads.num_heads} heads, ranks], got shape {accuracy.shape}")
        depth, parent, rank = medusa_tree(accuracy, tree_size)
        return MedusaDrafter(heads=heads, head_weight=target.lm_head_rows(heads.vocab), depth=depth,
                             parent=parent, rank=rank, hidden_size=config.hidden_size,
                             vocab_size=config.vocab_size)

    @property
    def tree_size(self) -> int:
        return len(self.depth)

    @property
    def max_depth(self) -> int:
        return max(self.depth)

    @property
    def is_chain(self) -> bool:
        return False

    def check(self, target_config: Any) -> None:
        if target_config.hidden_size != self.hidden_size or target_config.vocab_size != self.vocab_size:
            raise ValueError(f"MedusaDrafter was built for hidden_size {self.hidden_size} / vocab_size "
                             f"{self.vocab_size}, the target has {target_config.hidden_size} / "
                             f"{target_config.vocab_size}")

    def init(self, prompt: PromptContext) -> Float[Array, "B D"]:
        if prompt.hidden is None:
            raise ValueError("MedusaDrafter needs the target's hidden state at the prompt's end (PromptContext.hidden)")
        return prompt.hidden.astype(jnp.float32)

    def propose(self, state: Float[Array, "B D"], ctx: DraftContext) -> tuple[DraftTree, Any, Any]:
        b = state.shape[0]
        top = max(self.rank) + 1
        logits = self.heads.logits(state, self.head_weight)  # B K Vd
        _, best = jax.lax.top_k(logits, top)  # B K R (draft-vocabulary indices)
        candidates = self.heads.vocab[best]  # B K R (token ids)
        depth = np.asarray(self.depth) - 1
        tokens = candidates[:, depth, np.asarray(self.rank)]  # B W
        parents = jnp.broadcast_to(jnp.asarray(self.parent, jnp.int32), (b, self.tree_size))
        valid = jnp.broadcast_to(ctx.active[:, None], (b, self.tree_size))
        return DraftTree(tokens=tokens.astype(jnp.int32), parents=parents, valid=valid), state, ctx.cache

    def update(self, state: Float[Array, "B D"], ctx: DraftContext, outcome: VerifyOutcome) -> Float[Array, "B D"]:
        """The hidden state where the target chose its next token: the last accepted node's
        (index path + 1), or the root's (index 0) when nothing was accepted."""
        count = outcome.num_accepted
        last = jnp.take_along_axis(outcome.path, jnp.maximum(count - 1, 0)[:, None], axis=1)[:, 0]
        index = jnp.where(count > 0, last + 1, 0)
        hidden = jnp.take_along_axis(outcome.hidden, index[:, None, None], axis=1)[:, 0]
        return jnp.where(ctx.active[:, None], hidden.astype(jnp.float32), state)


def check_heads(heads: MedusaHeads, config: ModelConfig) -> None:
    """ValueError naming the mismatch if `heads` cannot serve a target of `config`."""
    k, d, e = heads.weight.shape
    if d != config.hidden_size or e != config.hidden_size or heads.bias.shape != (k, d):
        raise ValueError(f"Medusa heads have hidden size {d} (weight {tuple(heads.weight.shape)}, bias "
                         f"{tuple(heads.bias.shape)}), the target has hidden_size {config.hidden_size}: "
                         "the heads belong to another model")
    vocab = np.asarray(heads.vocab)
    if vocab.size and (vocab.min() < 0 or vocab.max() >= config.vocab_size):
        raise ValueError(f"Medusa heads' draft vocabulary holds ids up to {int(vocab.max())}, outside the "
                         f"target's vocabulary [0, {config.vocab_size}): the heads belong to another model")


def save_medusa_heads(heads: MedusaHeads, folder: str | Path, meta: dict[str, Any]) -> Path:
    """heads as bfloat16 (weights) + int32 vocab in `folder/medusa_heads.npz`, `meta` (target
    fingerprint, accuracy by head and rank, training record) in `folder/medusa.json`."""
    import ml_dtypes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    np.savez(folder / HEADS_FILE, weight=np.asarray(heads.weight).astype(ml_dtypes.bfloat16).view(np.uint16),
             bias=np.asarray(heads.bias).astype(ml_dtypes.bfloat16).view(np.uint16),
             vocab=np.asarray(heads.vocab, np.int32))
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    return folder


@dataclasses.dataclass(frozen=True)
class LoadedHeads:
    heads: MedusaHeads
    accuracy: np.ndarray  # [K, R] measured on held-out data
    meta: dict[str, Any]


def load_medusa_heads(folder: str | Path, config: ModelConfig) -> LoadedHeads:
    """Heads saved by `save_medusa_heads`; ValueError if they were trained for another target."""
    import ml_dtypes

    from efficient.train.distill import check_fingerprint

    folder = Path(folder)
    if not (folder / HEADS_FILE).is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no Medusa heads ({HEADS_FILE} and {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    check_fingerprint(meta.get("target", {}), config, f"Medusa heads {str(folder)!r}")
    with np.load(folder / HEADS_FILE) as f:
        weight = f["weight"].view(ml_dtypes.bfloat16).astype(np.float32)
        bias = f["bias"].view(ml_dtypes.bfloat16).astype(np.float32)
        vocab = f["vocab"]
    heads = MedusaHeads(weight=jnp.asarray(weight), bias=jnp.asarray(bias), vocab=jnp.asarray(vocab))
    check_heads(heads, config)
    return LoadedHeads(heads=heads, accuracy=np.asarray(meta["accuracy"], np.float64), meta=meta)
