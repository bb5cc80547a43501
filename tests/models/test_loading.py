"""from_pretrained / save_pretrained: formats, sharding, dtypes, and clear errors."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.hf_models import save_hf_model
from safetensors.numpy import load_file, save_file

from efficient.models import CheckpointError, forward, from_pretrained, save_pretrained

TOKENS = jnp.asarray([[3, 4, 5, 6, 7, 8]])


@pytest.fixture(scope="module")
def llama_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("llama3")
    save_hf_model("llama3", folder)
    return folder


def _copy(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def test_sharded_checkpoint_with_index_loads_identically(llama_folder: Path, tmp_path: Path) -> None:
    tensors = load_file(llama_folder / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    sharded = tmp_path / "sharded"
    sharded.mkdir()
    shutil.copy(llama_folder / "config.json", sharded / "config.json")
    weight_map = {}
    for file, keys in shards.items():
        save_file({k: tensors[k] for k in keys}, sharded / file)
        weight_map.update({k: file for k in keys})
    (sharded / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    a, _ = forward(from_pretrained(llama_folder), TOKENS)
    b, _ = forward(from_pretrained(sharded), TOKENS)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_dtype_override_and_save_round_trip(llama_folder: Path, tmp_path: Path) -> None:
    model = from_pretrained(llama_folder, dtype="bfloat16")
    assert model.dtype == jnp.bfloat16
    logits, _ = forward(model, TOKENS)
    assert logits.dtype == jnp.float32
    save_pretrained(model, tmp_path / "again")
    again = from_pretrained(tmp_path / "again")
    assert again.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(forward(again, TOKENS)[0]), np.asarray(logits))


def test_our_export_loads_in_transformers(llama_folder: Path, tmp_path: Path) -> None:
    import torch
    import transformers

    ours = from_pretrained(llama_folder)
    save_pretrained(ours, tmp_path / "export")
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    with torch.no_grad():
        expected = hf(torch.tensor(np.asarray(TOKENS))).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(ours, TOKENS)[0]), expected, atol=1e-4)


def test_missing_folder_and_missing_config(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        from_pretrained(tmp_path / "empty")


def test_missing_tensor_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = _copy(llama_folder, tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight.*missing"):
        from_pretrained(folder)


def test_mismatched_tensor_shape_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = _copy(llama_folder, tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.k_proj.weight"] = np.zeros((3, 32), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"k_proj\.weight' in .* has shape \(3, 32\), expected \(16, 32\)"):
        from_pretrained(folder)


def test_unexpected_tensor_is_named(llama_folder: Path, tmp_path: Path) -> None:
    folder = _copy(llama_folder, tmp_path / "c")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2,), np.float32)
    save_file(tensors, folder / "model.safetensors")
    with pytest.raises(CheckpointError, match="extra.weight"):
        from_pretrained(folder)


def test_unsupported_architecture_and_no_weights(llama_folder: Path, tmp_path: Path) -> None:
    folder = _copy(llama_folder, tmp_path / "c")
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "model_type": "gpt_neox"}))
    with pytest.raises(NotImplementedError, match="gpt_neox"):
        from_pretrained(folder)
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="safetensors"):
        from_pretrained(folder)


def test_gemma3_export_round_trips_through_transformers(tmp_path: Path) -> None:
    """Our Gemma 3 save writes per-layer HF tensors and a config transformers rebuilds exactly."""
    import torch
    import transformers

    save_hf_model("gemma3_7layer", tmp_path / "hf")
    ours = from_pretrained(tmp_path / "hf")
    save_pretrained(ours, tmp_path / "export")
    assert set(load_file(tmp_path / "export" / "model.safetensors")) == set(
        load_file(tmp_path / "hf" / "model.safetensors")) - {"lm_head.weight"}
    hf = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "export").float().eval()
    assert type(hf).__name__ == "Gemma3ForCausalLM"
    tokens = np.random.RandomState(3).randint(3, 97, size=(1, 12))
    with torch.no_grad():
        expected = hf(torch.tensor(tokens)).logits.numpy()
    np.testing.assert_allclose(np.asarray(forward(ours, jnp.asarray(tokens))[0]), expected, atol=1e-4)
