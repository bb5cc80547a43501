"""Load and save Hugging Face checkpoint folders (config.json + safetensors).

`from_pretrained(path)` reads a local folder, sharded (with
`model.safetensors.index.json`) or not, into a `LlamaModel`. Every parameter
must be found with the right shape; a missing, misshapen or unexpected tensor
raises an error naming it. `save_pretrained` writes the same format back, so
the project's own checkpoints load in `transformers` too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from safetensors import safe_open
from safetensors.numpy import save_file

from efficient.models.config import ModelConfig
from efficient.models.families import get_family
from efficient.models.model import DecoderModel as LlamaModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config."""


def _param_map(config: ModelConfig) -> Iterator[tuple[str, tuple[str, ...], int | None, bool]]:
    """(HF tensor name, attribute path in the model, layer or None, transpose?) for every
    parameter. A layer's parameters are slices [layer] of the stacked `layers` arrays."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), None, False
    yield "model.norm.weight", ("norm", "weight"), None, False
    if not config.tie_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), None, True
    per_layer = tuple(get_family(config.model_type).layer_params(config))
    for i in range(config.num_layers):
        for suffix, path, transpose in per_layer:
            yield f"model.layers.{i}.{suffix}", ("layers", *path), i, transpose


def _get_variable(model: LlamaModel, path: tuple[str, ...]) -> nnx.Variable:
    obj: Any = model
    for key in path:
        obj = getattr(obj, key)
    return obj


def _read_json_object(file: Path) -> dict[str, Any]:
    """The JSON object in `file`; CheckpointError naming the file if it is empty, not JSON
    or not an object."""
    try:
        text = file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CheckpointError(f"{str(file)!r} is not a UTF-8 JSON file ({e})") from e
    if not text.strip():
        raise CheckpointError(f"{str(file)!r} is empty (expected a JSON object)")
    try:
        value = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{str(file)!r} is not valid JSON ({e})") from e
    if not isinstance(value, dict):
        raise CheckpointError(f"{str(file)!r} must hold a JSON object, got a JSON {type(value).__name__}")
    return value


def _safe_open(file: Path, framework: str) -> Any:
    """`safe_open`, a garbage or truncated file raising CheckpointError naming it."""
    try:
        return safe_open(file, framework=framework)
    except Exception as e:  # safetensors raises SafetensorError (or OSError) on bad bytes
        raise CheckpointError(f"{str(file)!r} is not a readable safetensors file (garbage or truncated?): "
                              f"{type(e).__name__}: {e}") from e


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = _read_json_object(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise CheckpointError(f"shard index {str(index)!r} has no 'weight_map' object "
                                  "(tensor name -> shard file)")
        missing = sorted({file for file in weight_map.values() if not (folder / str(file)).is_file()})
        if missing:
            raise CheckpointError(f"shard index {str(index)!r} names shard files that do not exist: {missing}")
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in checkpoint folder {str(folder)!r}")
    mapping: dict[str, Path] = {}
    for file in files:
        with _safe_open(file, "flax") as f:
            for name in f.keys():
                mapping[name] = file
    return mapping


def load_config(path: str | os.PathLike[str], dtype: str | None = None) -> ModelConfig:
    """The `ModelConfig` of an HF checkpoint folder's config.json; errors name the file."""
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a checkpoint folder path (str or Path), got {type(path).__name__}")
    folder = Path(path)
    if folder.is_file():
        raise CheckpointError(f"checkpoint path {str(folder)!r} is a file; expected a folder holding config.json")
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no config.json")
    hf = _read_json_object(config_file)
    try:
        return ModelConfig.from_hf(hf, dtype=dtype)
    except NotImplementedError as e:
        raise NotImplementedError(f"{str(config_file)!r}: {e}") from e
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{str(config_file)!r} does not describe a valid model: {e}") from e


class TensorSource(Protocol):
    """Tensors under their Hugging Face names, read lazily (one at a time) by the loader.

    A safetensors folder and a GGUF file both present themselves this way, so one
    function (`load_tensors`) puts tensors into the model for every file format.
    `get(name)` returns a numpy array in the HF layout ([out, in] for linear weights).
    """

    location: str

    def names(self) -> Iterable[str]: ...

    def get(self, name: str) -> np.ndarray: ...


class SafetensorsSource:
    """The tensors of an HF checkpoint folder (one file, or shards with an index)."""

    def __init__(self, folder: Path) -> None:
        self.location = str(folder)
        self._files = _tensor_files(folder)
        self._handles: dict[Path, Any] = {}

    def names(self) -> Iterable[str]:
        return self._files.keys()

    def get(self, name: str) -> np.ndarray:
        file = self._files[name]
        if file not in self._handles:
            self._handles[file] = _safe_open(file, "numpy").__enter__()
        try:
            return self._handles[file].get_tensor(name)
        except Exception as e:  # a tensor the header lists but the file cannot give
            raise CheckpointError(f"cannot read tensor {name!r} from {str(file)!r}: {type(e).__name__}: {e}") from e

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def load_tensors(config: ModelConfig, source: TensorSource, sharding: object | None = None) -> LlamaModel:
    """A model for `config` with every parameter read from `source` (cast to config.dtype).

    sharding: an `efficient.parallel.ModelSharding`: each tensor goes from host memory
    straight into its shards (no device holds a whole matrix it does not own), and the
    model carries the sharding.

    Each parameter must be present with the right shape; tensors the config does not
    use are refused. Errors name the tensor and `source.location`.
    """
    target_dtype = jnp.dtype(config.dtype)
    model = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
    if sharding is not None:
        from efficient.parallel.params import as_sharding, param_sharding  # parallel imports models

        sharding = as_sharding(sharding)

    def place(attr_path: tuple[str, ...], value: np.ndarray) -> jax.Array:
        if sharding is None:
            return jnp.asarray(value, dtype=target_dtype)
        return jax.device_put(np.asarray(value).astype(target_dtype),
                              param_sharding(sharding, config, attr_path, tuple(value.shape)))
    available = set(source.names())
    expected = set()
    stacked: dict[tuple[str, ...], np.ndarray] = {}  # per-layer tensors gathered on a leading L axis
    for name, attr_path, layer, transpose in _param_map(config):
        expected.add(name)
        if name not in available:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {source.location!r}")
        tensor = source.get(name)
        if transpose:
            tensor = tensor.T
        variable = _get_variable(model, attr_path)
        full = tuple(variable.get_value().shape)
        want = full if layer is None else full[1:]
        if tuple(tensor.shape) != want:
            shape = tuple(tensor.T.shape if transpose else tensor.shape)
            raise CheckpointError(
                f"tensor {name!r} in {source.location!r} has shape {shape}, expected "
                f"{want[::-1] if transpose else want} for this config"
            )
        if layer is None:
            variable.set_value(place(attr_path, tensor))
        else:
            if attr_path not in stacked:
                stacked[attr_path] = np.empty(full, target_dtype)
            stacked[attr_path][layer] = np.asarray(tensor).astype(target_dtype)
    for attr_path, value in stacked.items():
        _get_variable(model, attr_path).set_value(place(attr_path, value))
    unexpected = sorted(
        name for name in available
        if name not in expected
        and not name.endswith(_IGNORED_SUFFIXES)
        and not (config.tie_embeddings and name == "lm_head.weight")
    )
    if unexpected:
        raise CheckpointError(
            f"checkpoint {source.location!r} has tensors this config does not use: {unexpected[:8]}"
            + (f" (+{len(unexpected) - 8} more)" if len(unexpected) > 8 else "")
        )
    if sharding is not None:
        model.sharding = sharding
    return model


def from_pretrained(path: str | os.PathLike[str], dtype: str | None = None, sharding: object | None = None
                    ) -> LlamaModel:
    """Load a local HF checkpoint folder (Llama, Mistral, Qwen2, Qwen3, Gemma 3 text), or a llama.cpp
    `.gguf` file (see `efficient.models.gguf`), into a model. A packaged model's short name
    (`efficient.models.PACKAGED_MODELS`, e.g. "smollm2") loads its installed file.

    dtype: parameter/compute dtype ("float32", "bfloat16", "float16"); default
    the checkpoint's own (float32 for GGUF).
    sharding: an `efficient.parallel.ModelSharding` (or a mesh, with the default rules):
        parameters are loaded straight into their shards.
    """
    if not isinstance(path, str | os.PathLike):
        raise TypeError(f"path: expected a checkpoint folder or .gguf file path (str or Path), got "
                        f"{type(path).__name__}")
    from efficient.models.packaged import PACKAGED_MODELS, resolve_model_path

    folder = resolve_model_path(path) if path in PACKAGED_MODELS and not Path(path).exists() else Path(path)
    if folder.suffix.lower() == ".gguf" and not folder.is_dir():
        from efficient.models.gguf import from_gguf  # imported here: gguf.py imports this module

        return from_gguf(folder, dtype=dtype, sharding=sharding)
    if folder.is_file():
        raise CheckpointError(f"expected an HF checkpoint folder or a .gguf file, got file {str(folder)!r}")
    config = load_config(folder, dtype=dtype)
    source = SafetensorsSource(folder)
    try:
        return load_tensors(config, source, sharding)
    finally:
        source.close()


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """An HF `config.json` dict for `config`, written by the family of its model_type."""
    return get_family(config.model_type).to_hf(config)


def save_pretrained(model: LlamaModel, path: str | os.PathLike[str], dtype: str | None = None) -> None:
    """Write `model` as an HF folder: config.json + model.safetensors."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config if dtype is None else model.config.replace(dtype=dtype)
    tensors: dict[str, np.ndarray] = {}
    values: dict[tuple[str, ...], np.ndarray] = {}
    for name, attr_path, layer, transpose in _param_map(model.config):
        if attr_path not in values:
            if attr_path[0] == "layers" and isinstance(model.layers, nnx.List):  # unstacked: stack again
                value = jnp.stack([_get_variable(layer, attr_path[1:])[...] for layer in model.layers])
            else:
                value = _get_variable(model, attr_path)[...]
            values[attr_path] = np.asarray(jax.device_get(jnp.asarray(value, jnp.dtype(config.dtype))))
        value = values[attr_path] if layer is None else values[attr_path][layer]
        tensors[name] = np.ascontiguousarray(value.T if transpose else value)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with open(folder / "config.json", "w") as f:
        json.dump(to_hf_config(config), f, indent=2)
