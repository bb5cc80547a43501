"""The registry of decoding and KV-cache variants the experiment harness compares.

This module imports no variant: variants live beside what they implement
(`efficient.cache.variants`, `efficient.decoding.variants`,
`efficient.decoding.speculative_variants`) and register themselves here;
`efficient.variants` imports them all, so `from efficient import variants`
sees every built-in entry.

    register_cache("dense", DenseKVCache.for_model, lossless=True, description="...")
    register_decoder("greedy", greedy_decoder, lossless=True, description="...")
    for cache in caches(): ...          # every registered cache, in registration order

A *cache factory* is `factory(config: ModelConfig, batch: int, capacity: int)
-> KVCache` (what `generate(cache=...)` takes). A *decoder* is

    fn(model, prompts, *, max_new_tokens, cache, key, stop_tokens, **options) -> GenerateOutput

where `cache` is a cache factory and `options` are the keyword arguments the
decoder declares in `needs` (e.g. a draft model, supplied by the harness) or
its own tuning knobs (with defaults). `lossless` means the variant leaves the
model's outputs unchanged: a lossless cache gives the dense cache's logits; a
lossless greedy decoder gives greedy output, a lossless `sampling=True`
decoder samples the model's own distribution.

A new variant adds one `register_*` call in its own module and one import in
`efficient.variants`; every experiment that iterates the registry picks it up.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

from typing import TYPE_CHECKING

import jax

from efficient.cache.protocol import CacheFactory

if TYPE_CHECKING:
    from efficient.decoding.generate import GenerateOutput
    from efficient.models import LlamaModel

class Decoder(Protocol):
    def __call__(
        self,
        model: LlamaModel,
        prompts: Sequence[Sequence[int]],
        *,
        max_new_tokens: int,
        cache: CacheFactory | None,
        key: jax.Array | int | None,
        stop_tokens: Sequence[int],
        **options: Any,
    ) -> GenerateOutput: ...


@dataclasses.dataclass(frozen=True)
class CacheVariant:
    name: str
    factory: CacheFactory
    lossless: bool
    description: str
    paper: str | None = None


@dataclasses.dataclass(frozen=True)
class DecoderVariant:
    name: str
    fn: Decoder
    lossless: bool
    description: str
    paper: str | None = None
    # Keyword arguments the harness must supply (e.g. "draft_model").
    needs: tuple[str, ...] = ()
    # True: the output is a sample of the model's distribution (a lossless sampling
    # decoder need not reproduce greedy output); False: deterministic greedy.
    sampling: bool = False


_CACHES: dict[str, CacheVariant] = {}
_DECODERS: dict[str, DecoderVariant] = {}


def _check_entry(kind: str, name: str, fn: object, lossless: object, description: object,
                 table: Mapping[str, object], replace: bool) -> None:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"name: a {kind} name must be an identifier-like string, got {name!r}")
    if name in table and not replace:
        raise ValueError(f"name: {kind} {name!r} is already registered (pass replace=True to override)")
    if not callable(fn):
        raise TypeError(f"{kind} {name!r}: expected a callable, got {type(fn).__name__}")
    if not isinstance(lossless, bool):
        raise TypeError(f"lossless: expected a bool for {kind} {name!r}, got {lossless!r}")
    if not isinstance(description, str) or not description.strip():
        raise ValueError(f"description: {kind} {name!r} needs a one-line description, got {description!r}")


def register_cache(name: str, factory: CacheFactory, *, lossless: bool, description: str,
                   paper: str | None = None, replace: bool = False) -> CacheVariant:
    """Register a cache factory `(config, batch, capacity) -> KVCache` under `name`."""
    _check_entry("cache", name, factory, lossless, description, _CACHES, replace)
    variant = CacheVariant(name, factory, lossless, description, paper)
    _CACHES[name] = variant
    return variant


def register_decoder(name: str, fn: Decoder, *, lossless: bool, description: str,
                     paper: str | None = None, needs: Sequence[str] = (), sampling: bool = False,
                     replace: bool = False) -> DecoderVariant:
    """Register a decoder (see the module docstring for its signature) under `name`."""
    _check_entry("decoder", name, fn, lossless, description, _DECODERS, replace)
    if isinstance(needs, str) or not all(isinstance(n, str) and n.isidentifier() for n in needs):
        raise ValueError(f"needs: expected a sequence of keyword names for decoder {name!r}, got {needs!r}")
    if not isinstance(sampling, bool):
        raise TypeError(f"sampling: expected a bool for decoder {name!r}, got {sampling!r}")
    variant = DecoderVariant(name, fn, lossless, description, paper, tuple(needs), sampling)
    _DECODERS[name] = variant
    return variant


def unregister(name: str) -> None:
    """Remove a cache or decoder (tests and notebooks that register temporary variants)."""
    if _CACHES.pop(name, None) is None and _DECODERS.pop(name, None) is None:
        raise KeyError(f"name: no cache or decoder registered as {name!r}")


def _select(kind: str, table: Mapping[str, Any], names: Sequence[str] | str | None) -> list[Any]:
    if names is None or names == "all":
        return list(table.values())
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    unknown = [n for n in names if n not in table]
    if unknown:
        raise ValueError(f"{kind}s: unknown {kind} {unknown}; registered: {sorted(table)}")
    return [table[n] for n in names]


def caches(names: Sequence[str] | str | None = None) -> list[CacheVariant]:
    """Registered caches in registration order; `names` ("all", "a,b" or a list) selects some."""
    return _select("cache", _CACHES, names)


def decoders(names: Sequence[str] | str | None = None) -> list[DecoderVariant]:
    """Registered decoders in registration order; `names` ("all", "a,b" or a list) selects some."""
    return _select("decoder", _DECODERS, names)


def get_cache(name: str) -> CacheVariant:
    return caches([name])[0]


def get_decoder(name: str) -> DecoderVariant:
    return decoders([name])[0]
