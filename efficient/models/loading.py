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
from efficient.models.llama import LlamaModel

_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A checkpoint folder that does not match its config."""


def _param_map(config: ModelConfig) -> Iterator[tuple[str, tuple[Any, ...], bool]]:
    """(HF tensor name, attribute path in LlamaModel, transpose?) for every parameter."""
    yield "model.embed_tokens.weight", ("embed_tokens", "embedding"), False
    yield "model.norm.weight", ("norm", "weight"), False
    if not config.tie_embeddings:
        yield "lm_head.weight", ("lm_head", "kernel"), True
    for i in range(config.num_layers):
        pre = f"model.layers.{i}."
        yield pre + "input_layernorm.weight", ("layers", i, "input_layernorm", "weight"), False
        yield (pre + "post_attention_layernorm.weight",
               ("layers", i, "post_attention_layernorm", "weight"), False)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            yield pre + f"self_attn.{proj}.weight", ("layers", i, "self_attn", proj, "kernel"), True
            has_bias = config.o_bias if proj == "o_proj" else config.qkv_bias
            if has_bias:
                yield pre + f"self_attn.{proj}.bias", ("layers", i, "self_attn", proj, "bias"), False
        if config.qk_norm:
            for norm in ("q_norm", "k_norm"):
                yield pre + f"self_attn.{norm}.weight", ("layers", i, "self_attn", norm, "weight"), False
        for proj in ("gate_proj", "up_proj", "down_proj"):
            yield pre + f"mlp.{proj}.weight", ("layers", i, "mlp", proj, "kernel"), True
            if config.mlp_bias:
                yield pre + f"mlp.{proj}.bias", ("layers", i, "mlp", proj, "bias"), False


def _get_variable(model: LlamaModel, path: tuple[Any, ...]) -> nnx.Variable:
    obj: Any = model
    for key in path:
        obj = obj[key] if isinstance(key, int) else getattr(obj, key)
    return obj


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        with open(index) as f:
            weight_map = json.load(f)["weight_map"]
        return {name: folder / file for name, file in weight_map.items()}
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in checkpoint folder {str(folder)!r}")
    mapping: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="flax") as f:
            for name in f.keys():
                mapping[name] = file
    return mapping


def load_config(path: str | os.PathLike[str], dtype: str | None = None) -> ModelConfig:
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} does not exist")
    config_file = folder / "config.json"
    if not config_file.exists():
        raise FileNotFoundError(f"checkpoint folder {str(folder)!r} has no config.json")
    return ModelConfig.from_hf_file(config_file, dtype=dtype)


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
            self._handles[file] = safe_open(file, framework="numpy").__enter__()
        return self._handles[file].get_tensor(name)

    def close(self) -> None:
        for handle in self._handles.values():
            handle.__exit__(None, None, None)
        self._handles.clear()


def load_tensors(config: ModelConfig, source: TensorSource) -> LlamaModel:
    """A model for `config` with every parameter read from `source` (cast to config.dtype).

    Each parameter must be present with the right shape; tensors the config does not
    use are refused. Errors name the tensor and `source.location`.
    """
    target_dtype = jnp.dtype(config.dtype)
    model = nnx.eval_shape(lambda: LlamaModel(config, rngs=nnx.Rngs(0)))
    available = set(source.names())
    expected = set()
    for name, attr_path, transpose in _param_map(config):
        expected.add(name)
        if name not in available:
            raise CheckpointError(f"tensor {name!r} is missing from checkpoint {source.location!r}")
        tensor = source.get(name)
        if transpose:
            tensor = tensor.T
        variable = _get_variable(model, attr_path)
        want = tuple(variable.get_value().shape)
        if tuple(tensor.shape) != want:
            shape = tuple(tensor.T.shape if transpose else tensor.shape)
            raise CheckpointError(
                f"tensor {name!r} in {source.location!r} has shape {shape}, expected "
                f"{want[::-1] if transpose else want} for this config"
            )
        variable.set_value(jnp.asarray(tensor, dtype=target_dtype))
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
    return model


def from_pretrained(path: str | os.PathLike[str], dtype: str | None = None) -> LlamaModel:
    """Load a local HF checkpoint folder (Llama, Mistral, Qwen2, Qwen3) into a model.

    dtype: parameter/compute dtype ("float32", "bfloat16", "float16"); default
    the checkpoint's own.
    """
    folder = Path(path)
    config = load_config(folder, dtype=dtype)
    source = SafetensorsSource(folder)
    try:
        return load_tensors(config, source)
    finally:
        source.close()


def to_hf_config(config: ModelConfig) -> dict[str, Any]:
    """An HF `config.json` dict for `config` (Llama/Mistral/Qwen2/Qwen3 layouts)."""
    rope = config.rope
    rope_parameters: dict[str, Any] = {"rope_type": rope.rope_type, "rope_theta": rope.theta}
    if rope.rope_type != "default":
        rope_parameters["factor"] = rope.factor
    if rope.original_max_position_embeddings is not None:
        rope_parameters["original_max_position_embeddings"] = rope.original_max_position_embeddings
    if rope.rope_type == "llama3":
        rope_parameters.update(low_freq_factor=rope.low_freq_factor, high_freq_factor=rope.high_freq_factor)
    if rope.rope_type == "yarn":
        rope_parameters.update(beta_fast=rope.beta_fast, beta_slow=rope.beta_slow, truncate=rope.truncate)
        for key in ("attention_factor", "mscale", "mscale_all_dim"):
            if getattr(rope, key) is not None:
                rope_parameters[key] = getattr(rope, key)
    architectures = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                     "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM"}
    hf: dict[str, Any] = {
        "architectures": [architectures[config.model_type]],
        "model_type": config.model_type,
        "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size,
        "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.num_layers,
        "num_attention_heads": config.num_heads,
        "num_key_value_heads": config.num_kv_heads,
        "head_dim": config.head_dim,
        "max_position_embeddings": config.max_position_embeddings,
        "rms_norm_eps": config.rms_norm_eps,
        "rope_theta": rope.theta,
        "rope_parameters": rope_parameters,
        "attention_bias": config.qkv_bias if config.model_type != "qwen2" else False,
        "mlp_bias": config.mlp_bias,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "bos_token_id": config.bos_token_id,
        "eos_token_id": list(config.eos_token_ids) if len(config.eos_token_ids) > 1
        else (config.eos_token_ids[0] if config.eos_token_ids else None),
        "pad_token_id": config.pad_token_id,
        "torch_dtype": config.dtype,
    }
    if config.sliding_layers:
        hf["sliding_window"] = config.sliding_window
        hf["layer_types"] = ["sliding_attention" if s else "full_attention" for s in config.sliding_layers]
        if config.model_type in ("qwen2", "qwen3"):  # their configs drop the window without this
            hf["use_sliding_window"] = True
            hf["max_window_layers"] = config.sliding_layers.index(True)
    return hf


def save_pretrained(model: LlamaModel, path: str | os.PathLike[str], dtype: str | None = None) -> None:
    """Write `model` as an HF folder: config.json + model.safetensors."""
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    config = model.config if dtype is None else model.config.replace(dtype=dtype)
    tensors: dict[str, np.ndarray] = {}
    for name, attr_path, transpose in _param_map(model.config):
        value = jnp.asarray(_get_variable(model, attr_path)[...], jnp.dtype(config.dtype))
        tensors[name] = np.ascontiguousarray(np.asarray(jax.device_get(value.T if transpose else value)))
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with open(folder / "config.json", "w") as f:
        json.dump(to_hf_config(config), f, indent=2)
