"""The model families behind the shared forward, keyed by Hugging Face `model_type`.

Each family file defines its decoder layer (parameters only, called as
`layer(x, cos, sin, attend)`), its final norm, its config mapping from and to an
HF `config.json`, and its per-layer HF parameter names. `get_family(model_type)`
is what config loading, `from_pretrained`, `save_pretrained` and the model use.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

from flax import nnx

from efficient.models.config import ModelConfig

# (HF name under `model.layers.{i}.`, attribute path inside the layer, transpose?)
LayerParam = tuple[str, tuple[str, ...], bool]


@dataclasses.dataclass(frozen=True)
class Family:
    """What one architecture family contributes to the shared decoder."""

    name: str
    model_types: tuple[str, ...]  # HF model_type values this family serves
    layer: type[nnx.Module]  # __init__(config, dtype, rngs); __call__(x, cos, sin, attend) -> x
    norm: type[nnx.Module]  # final norm: __init__(dim, eps, dtype)
    config_from_hf: Callable[[dict[str, Any], str | None], ModelConfig]
    to_hf: Callable[[ModelConfig], dict[str, Any]]
    layer_params: Callable[[ModelConfig], Iterator[LayerParam]]
    norms_per_layer: int = 2
    embed_scale: Callable[[ModelConfig], float | None] = lambda config: None


_REGISTRY: dict[str, Family] = {}


def register(family: Family) -> Family:
    for model_type in family.model_types:
        if model_type in _REGISTRY:
            raise ValueError(f"model_type {model_type!r} is already served by family {_REGISTRY[model_type].name!r}")
        _REGISTRY[model_type] = family
    return family


def supported_model_types() -> tuple[str, ...]:
    return tuple(_REGISTRY)


def get_family(model_type: object, architectures: object = None) -> Family:
    """The family serving HF `model_type`; NotImplementedError naming it and the supported ones."""
    family = _REGISTRY.get(model_type) if isinstance(model_type, str) else None
    if family is None:
        archs = f" (architectures={architectures})" if architectures else ""
        raise NotImplementedError(
            f"unsupported model_type {model_type!r}{archs}; supported: {supported_model_types()}"
        )
    return family


from efficient.models.families import llama, gemma3  # noqa: E402, I001  (they register themselves)

__all__ = ["Family", "LayerParam", "gemma3", "get_family", "llama", "register", "supported_model_types"]
