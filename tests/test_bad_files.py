"""Bad tokenizer and checkpoint files raise a typed error naming the file and the field
(issue 13, "Reliability"): tokenizers given bytes, None, non-integers or ids outside the
vocabulary; corrupt tokenizer.json / tokenizer_config.json; empty, non-JSON or non-object
config.json; garbage or truncated safetensors; shard indexes without a weight map; a
file where a folder is expected; truncated and non-GGUF files. The API-level bad inputs
are in test_bad_inputs.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers.tiny import tiny_model

from efficient.data import ByteTokenizer, GGUFTokenizer, HFTokenizer, load_tokenizer
from efficient.models import (
    CheckpointError,
    GGUFError,
    ModelConfig,
    config_from_gguf,
    from_pretrained,
    load_config,
    save_pretrained,
)


# --------------------------------------------------------------- tokenizers

BYTE_CASES = [
    ("decode", [65.0], TypeError, "ids: expected integer token ids, got float64"),
    ("decode", None, TypeError, "ids: expected a sequence of integer token ids, got NoneType"),
    ("decode", b"AB", TypeError, "ids: expected a sequence .* got bytes"),
    ("decode", "AB", TypeError, "ids: expected a sequence .* got str"),
    ("decode", ["A"], TypeError, "ids: expected integer token ids"),
    ("decode", [True, False], TypeError, "ids: expected integer token ids, got bool"),
    ("decode", [300], ValueError, r"ids: 300 is outside the vocabulary \[0, 259\)"),
    ("decode", [-1], ValueError, "ids: -1 is outside"),
    ("num_bytes", [1.5], TypeError, "ids: expected integer token ids"),
    ("num_bytes", None, TypeError, "ids: expected a sequence"),
    ("encode", b"AB", TypeError, "text: expected a str, got bytes"),
    ("encode", None, TypeError, "text: expected a str, got NoneType"),
    ("encode", 65, TypeError, "text: expected a str, got int"),
    ("encode_array", b"AB", TypeError, "text: expected a str, got bytes"),
]


@pytest.mark.parametrize(("method", "value", "error", "match"), BYTE_CASES,
                         ids=[f"{c[0]}-{c[1]!r}" for c in BYTE_CASES])
def test_byte_tokenizer_refuses(method: str, value: object, error: type[Exception], match: str) -> None:
    with pytest.raises(error, match=match):
        getattr(ByteTokenizer(), method)(value)


def test_byte_tokenizer_still_takes_arrays_and_empty_lists() -> None:
    tok = ByteTokenizer()
    assert tok.decode(np.asarray([72, 105], np.int32)) == "Hi" == tok.decode(jnp.asarray([72, 105]))
    assert tok.decode([]) == "" and tok.num_bytes([72, 256, 105]) == 2


@pytest.fixture(scope="module")
def word_tokenizer(tmp_path_factory: pytest.TempPathFactory) -> HFTokenizer:
    """A 4-token WordLevel tokenizer.json (no training)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    folder = tmp_path_factory.mktemp("word")
    raw = Tokenizer(models.WordLevel(vocab={"a": 0, "b": 1, "</s>": 2, "[UNK]": 3}, unk_token="[UNK]"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.save(str(folder / "tokenizer.json"))
    return HFTokenizer(folder / "tokenizer.json")


@pytest.mark.parametrize(("method", "value", "error", "match"), [
    ("decode", [0.5], TypeError, "ids: expected integer"),
    ("decode", None, TypeError, "ids: expected a sequence"),
    ("decode", [7], ValueError, r"ids: 7 is outside the vocabulary \[0, 4\)"),
    ("num_bytes", ["a"], TypeError, "ids: expected integer"),
    ("encode", b"a b", TypeError, "text: expected a str, got bytes"),
    ("encode", None, TypeError, "text: expected a str"),
])
def test_hf_tokenizer_refuses(word_tokenizer: HFTokenizer, method: str, value: object, error: type[Exception],
                              match: str) -> None:
    assert word_tokenizer.decode([0, 1]) == "a b"
    with pytest.raises(error, match=match):
        getattr(word_tokenizer, method)(value)


@pytest.mark.parametrize("content", ["", "{not json", "[1, 2]", '{"model": 5}'], ids=["empty", "garbage", "list", "bad"])
def test_corrupt_tokenizer_json_names_the_file(tmp_path: Path, content: str) -> None:
    (tmp_path / "tokenizer.json").write_text(content)
    with pytest.raises(ValueError, match=r"path: cannot read tokenizer file .*tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_corrupt_tokenizer_config_names_the_file(word_tokenizer: HFTokenizer, tmp_path: Path) -> None:
    (tmp_path / "tokenizer.json").write_bytes(word_tokenizer.path.read_bytes())
    (tmp_path / "tokenizer_config.json").write_text("{oops")
    with pytest.raises(ValueError, match=r"tokenizer_config\.json.*is not valid JSON"):
        load_tokenizer(tmp_path)


def test_load_tokenizer_refuses_none_and_a_plain_file(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="folder: expected a path"):
        load_tokenizer(None)
    (tmp_path / "vocab.txt").write_text("a")
    with pytest.raises(ValueError, match=r"folder: .*vocab\.txt' is a file"):
        load_tokenizer(tmp_path / "vocab.txt")


GGUF_METADATA = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "gpt2",
                 "tokenizer.ggml.tokens": ["a", "b", "ab", "<|endoftext|>"], "tokenizer.ggml.token_type": [1, 1, 1, 3],
                 "tokenizer.ggml.merges": ["a b"]}


@pytest.mark.parametrize(("method", "value", "error", "match"), [
    ("decode", [1.5], TypeError, "ids: expected integers"),
    ("decode", None, TypeError, "ids: expected a sequence of ints"),
    ("decode", b"ab", TypeError, "ids: expected a sequence of ints, got bytes"),
    ("decode", [4], ValueError, r"ids: 4 is outside the vocabulary \[0, 4\)"),
    ("encode", b"ab", TypeError, "text: expected a str, got bytes"),
])
def test_gguf_tokenizer_refuses(method: str, value: object, error: type[Exception], match: str) -> None:
    tok = GGUFTokenizer(GGUF_METADATA)
    assert tok.decode(tok.encode("abab")) == "abab"
    with pytest.raises(error, match=match):
        getattr(tok, method)(value)


def test_gguf_tokenizer_refuses_bad_files(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"path: no GGUF file at .*absent\.gguf"):
        GGUFTokenizer.from_file(tmp_path / "absent.gguf")
    (tmp_path / "text.gguf").write_bytes(b"plain text, not gguf")
    with pytest.raises(ValueError, match=r"path: .*text\.gguf' is not a GGUF file"):
        GGUFTokenizer.from_file(tmp_path / "text.gguf")
    with pytest.raises(ValueError, match="path: .*has no tokenizer metadata"):
        GGUFTokenizer({})


# --------------------------------------------------------------- loading checkpoints


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("ckpt")
    save_pretrained(tiny_model(), folder)
    return folder


def _folder_with(tmp_path: Path, checkpoint: Path, **files: bytes | str) -> Path:
    """A copy of `checkpoint` with `files` (name -> content; "" names are removed) replaced."""
    folder = tmp_path / "ckpt"
    folder.mkdir()
    for file in checkpoint.iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    for name, content in files.items():
        name = name.replace("__", ".")
        data = content.encode() if isinstance(content, str) else content
        (folder / name).write_bytes(data)
    return folder


CONFIG_CASES = [("empty", "", "is empty"), ("not_json", "{model_type: llama", "is not valid JSON"),
                ("list", "[1, 2]", "must hold a JSON object, got a JSON list"),
                ("string", '"llama"', "must hold a JSON object, got a JSON str"),
                ("missing_keys", '{"model_type": "llama"}', "does not describe a valid model.*lacks required keys")]


@pytest.mark.parametrize(("content", "match"), [c[1:] for c in CONFIG_CASES], ids=[c[0] for c in CONFIG_CASES])
def test_bad_config_json_names_the_file(tmp_path: Path, checkpoint: Path, content: str, match: str) -> None:
    folder = _folder_with(tmp_path, checkpoint, config__json=content)
    with pytest.raises(CheckpointError, match=rf"config\.json' {match}"):
        from_pretrained(folder)


def test_model_config_from_hf_refuses_non_objects(tmp_path: Path) -> None:
    with pytest.raises(TypeError, match="hf must be a dict.*got list"):
        ModelConfig.from_hf([1, 2])
    (tmp_path / "c.json").write_text("nope")
    with pytest.raises(ValueError, match=r"path: .*c\.json' is not a valid JSON config file"):
        ModelConfig.from_hf_file(tmp_path / "c.json")


def test_garbage_safetensors_names_the_file(tmp_path: Path, checkpoint: Path) -> None:
    folder = _folder_with(tmp_path, checkpoint, model__safetensors=b"garbage" * 20)
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is not a readable safetensors file"):
        from_pretrained(folder)


@pytest.mark.parametrize("keep", [100, -100], ids=["header", "data"])
def test_truncated_safetensors_names_the_file(tmp_path: Path, checkpoint: Path, keep: int) -> None:
    whole = (checkpoint / "model.safetensors").read_bytes()
    folder = _folder_with(tmp_path, checkpoint, model__safetensors=whole[:keep])
    with pytest.raises(CheckpointError, match=r"model\.safetensors' is not a readable safetensors file"):
        from_pretrained(folder)


INDEX_CASES = [("no_weight_map", json.dumps({"metadata": {}}), "has no 'weight_map' object"),
               ("weight_map_list", json.dumps({"weight_map": ["a"]}), "has no 'weight_map' object"),
               ("not_json", "{", "is not valid JSON"),
               ("missing_shard", json.dumps({"weight_map": {"model.norm.weight": "shard-2.safetensors"}}),
                r"names shard files that do not exist: \['shard-2.safetensors'\]")]


@pytest.mark.parametrize(("content", "match"), [c[1:] for c in INDEX_CASES], ids=[c[0] for c in INDEX_CASES])
def test_bad_shard_index_names_the_file(tmp_path: Path, checkpoint: Path, content: str, match: str) -> None:
    folder = _folder_with(tmp_path, checkpoint, model__safetensors__index__json=content)
    with pytest.raises(CheckpointError, match=rf"model\.safetensors\.index\.json' {match}"):
        from_pretrained(folder)


def test_a_file_where_a_folder_is_expected(checkpoint: Path) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint path .*config\.json' is a file; expected a folder"):
        load_config(checkpoint / "config.json")
    with pytest.raises(CheckpointError, match=r"expected an HF checkpoint folder or a \.gguf file.*config\.json"):
        from_pretrained(checkpoint / "config.json")
    with pytest.raises(TypeError, match="path: expected a checkpoint folder or .gguf file path"):
        from_pretrained(None)
    with pytest.raises(TypeError, match="path: expected a checkpoint folder path"):
        load_config(3)


def _tiny_gguf(path: Path) -> Path:
    """A small GGUF file (metadata and one tensor), written with the gguf package."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.mark.parametrize("cut", ["header", "metadata", "tensor data"])
def test_truncated_gguf_names_the_file(tmp_path: Path, cut: str) -> None:
    whole = _tiny_gguf(tmp_path / "whole.gguf").read_bytes()
    keep = {"header": 10, "metadata": 60, "tensor data": len(whole) - 64}[cut]
    (tmp_path / "cut.gguf").write_bytes(whole[:keep])
    with pytest.raises(GGUFError, match=r"cut\.gguf' is truncated or corrupt"):
        from_pretrained(tmp_path / "cut.gguf")


def test_non_gguf_file_names_the_file(tmp_path: Path) -> None:
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04 a zip, not a gguf" * 4)
    with pytest.raises(GGUFError, match=r"model\.gguf' is not a GGUF file"):
        from_pretrained(tmp_path / "model.gguf")
    with pytest.raises(GGUFError, match=r"absent\.gguf' does not exist"):
        config_from_gguf(tmp_path / "absent.gguf")
