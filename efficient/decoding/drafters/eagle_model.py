"""EAGLE's feature-level draft model: one decoder layer over [feature; next token's embedding].

    model = FeatureDraftModel.create(target, rngs=nnx.Rngs(0))
    out, cache = model(features, target.embed(tokens), positions=positions, cache=cache)

Li et al. 2024 (EAGLE): the target's final-normed hidden state f_t (the feature
its LM head reads) and the embedding of the token x_{t+1} sampled from it are
fused by a linear layer [2D -> D], one decoder layer of the target's family runs
over the fused sequence (with its own KV cache, RoPE at the token positions), and
its normed output predicts the next feature f_{t+1}; the target's frozen LM head
turns a predicted feature into draft logits. The feature carries what sampling
threw away, so the draft resolves the ambiguity of the token alone.

The decoder layer is an `efficient` DecoderModel with one layer (and a one-token
vocabulary it never uses: embeddings and LM head are the target's), so it runs
through the same `forward_embeddings`, caches and attention dispatcher as the
target. `create` starts the layer from the target's last layer.

Saved as bfloat16 npz plus JSON (`save_feature_drafter` / `load_feature_drafter`)
with the target's fingerprint; a drafter for another model is refused.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jaxtyping import Array, Float, Int

from efficient.cache.protocol import KVCache
from efficient.models.config import ModelConfig
from efficient.models.forward import forward_embeddings
from efficient.models.model import DecoderModel

PARAMS_FILE = "feature_drafter.npz"
META_FILE = "feature_drafter.json"


def layer_config(target_config: ModelConfig) -> ModelConfig:
    """The one-layer config of the draft layer: the target's layer, global attention, no vocabulary."""
    return target_config.replace(num_layers=1, vocab_size=1, tie_embeddings=True, sliding_window=None,
                                 sliding_layers=(), dtype="float32", eos_token_ids=(), bos_token_id=None,
                                 pad_token_id=None, final_logit_softcapping=None)


class FeatureDraftModel(nnx.Module):
    """fuse: Linear [2D -> D] (with bias); body: a one-layer DecoderModel (its norm is the output norm)."""

    def __init__(self, target_config: ModelConfig, *, rngs: nnx.Rngs) -> None:
        d = target_config.hidden_size
        self.hidden_size = d
        self.fuse = nnx.Linear(2 * d, d, use_bias=True, rngs=rngs)
        self.body = DecoderModel(layer_config(target_config), rngs=rngs)

    @staticmethod
    def create(target: DecoderModel, *, rngs: nnx.Rngs) -> FeatureDraftModel:
        """A draft model for `target` whose layer starts as the target's last layer."""
        model = FeatureDraftModel(target.config, rngs=rngs)
        layers = target.layers
        last = (nnx.state(layers[-1]) if isinstance(layers, nnx.List)
                else jax.tree.map(lambda x: x[-1], nnx.state(layers)))
        nnx.update(model.body.layers, jax.tree.map(lambda x: jnp.asarray(x, jnp.float32)[None], last))
        return model

    def __call__(self, features: Float[Array, "B T D"], token_embeddings: Float[Array, "B T D"], *,
                 positions: Int[Array, "B T"], cache: KVCache | None = None,
                 tree_mask: jax.Array | None = None,
                 fresh_cache: bool = False) -> tuple[Float[Array, "B T D"], KVCache | None]:
        """Predicted next features [B, T, D] (normed: what the LM head reads) and the cache."""
        x = self.fuse(jnp.concatenate([features.astype(jnp.float32), token_embeddings.astype(jnp.float32)], -1))
        return forward_embeddings(self.body, x, positions=positions, cache=cache, tree_mask=tree_mask,
                                  fresh_cache=fresh_cache)


def _flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
    out: dict[str, np.ndarray] = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flat(value, name + "/"))
        else:
            out[name] = np.asarray(value)
    return out


def _nest(flat: dict[str, np.ndarray]) -> dict[Any, Any]:
    out: dict[Any, Any] = {}
    for name, value in flat.items():
        node = out
        *parents, leaf = [int(p) if p.isdigit() else p for p in name.split("/")]
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def save_feature_drafter(model: FeatureDraftModel, vocab: np.ndarray, folder: str | Path,
                         meta: dict[str, Any]) -> Path:
    """Parameters as bfloat16 and the draft vocabulary (int32) in `folder/feature_drafter.npz`;
    `meta` (target fingerprint, training record, measured acceptance) in `feature_drafter.json`."""
    import ml_dtypes

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    flat = _flat(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    arrays = {f"param:{k}": v.astype(ml_dtypes.bfloat16).view(np.uint16) for k, v in flat.items()}
    np.savez(folder / PARAMS_FILE, vocab=np.asarray(vocab, np.int32), **arrays)
    (folder / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True, default=float))
    return folder


@dataclasses.dataclass(frozen=True)
class LoadedFeatureDrafter:
    model: FeatureDraftModel
    vocab: Int[np.ndarray, " Vd"]  # draft vocabulary (target ids)
    meta: dict[str, Any]  # target fingerprint, held-out top-1, training record


def load_feature_drafter(folder: str | Path, target_config: ModelConfig) -> LoadedFeatureDrafter:
    """The drafter saved by `save_feature_drafter`; ValueError naming the mismatched field if it
    was trained for another target."""
    import ml_dtypes

    from efficient.train.distill import check_fingerprint

    folder = Path(folder)
    if not (folder / PARAMS_FILE).is_file() or not (folder / META_FILE).is_file():
        raise FileNotFoundError(f"{str(folder)!r} holds no feature drafter ({PARAMS_FILE} and {META_FILE})")
    meta = json.loads((folder / META_FILE).read_text())
    check_fingerprint(meta.get("target", {}), target_config, f"feature drafter {str(folder)!r}")
    model = FeatureDraftModel(target_config, rngs=nnx.Rngs(0))
    state = nnx.state(model, nnx.Param)
    with np.load(folder / PARAMS_FILE) as f:
        vocab = f["vocab"]
        flat = {k[len("param:"):]: f[k].view(ml_dtypes.bfloat16).astype(np.float32)
                for k in f.files if k.startswith("param:")}
    expected = _flat(nnx.to_pure_dict(state))
    wrong = sorted(k for k in expected if k not in flat or flat[k].shape != expected[k].shape)
    if wrong:
        raise ValueError(f"feature drafter {str(folder)!r} does not fit the target: parameter {wrong[0]!r} "
                         "is missing or has another shape")
    if vocab.ndim != 1 or vocab.size == 0 or vocab.min() < 0 or vocab.max() >= target_config.vocab_size:
        raise ValueError(f"feature drafter {str(folder)!r}: draft vocabulary outside the target's "
                         f"[0, {target_config.vocab_size})")
    nnx.replace_by_pure_dict(state, jax.tree.map(jnp.asarray, _nest(flat)))
    nnx.update(model, state)
    return LoadedFeatureDrafter(model=model, vocab=vocab, meta=meta)
