"""`GGUFTokenizer`: the tokenizer and chat template stored in a GGUF file's metadata.

A GGUF file has no `tokenizer.json`: llama.cpp stores the vocabulary
(`tokenizer.ggml.tokens`, `token_type`, `merges` or `scores`), the special
token ids and the chat template as metadata. We rebuild a `tokenizers`
tokenizer from them:

- `tokenizer.ggml.model == "gpt2"`: byte-level BPE. Text is split by the
  regexes llama.cpp uses for `tokenizer.ggml.pre` (applied in turn, each one
  splitting the pieces of the previous), then mapped to the byte alphabet and
  merged. An unknown `pre` raises NotImplementedError (llama.cpp refuses it too).
- `tokenizer.ggml.model == "llama"`: SentencePiece-style BPE over `\u2581`-spelled
  pieces; the pair merged first is the one whose result has the highest
  score, bytes missing from the vocabulary fall back to `<0xXX>` tokens.

Control and unknown tokens (types 3, 2) become special added tokens and
user-defined tokens (type 4) plain added tokens, so all are matched whole in
text and never split. Special tokens are dropped by `decode` and count 0 in
`num_bytes`; user-defined ones are kept.

Where transformers' GGUF loader differs, we follow llama.cpp (the runtime the
file was made for) and the model's original tokenizer:
- `pre` smollm/starcoder isolate every \\p{N} character before the GPT-2 regex
  (transformers uses the GPT-2 regex alone: same ids for ASCII digits, not
  for ' ½');
- llama3 pre-tokenizers ignore merges for pieces that are whole tokens;
- SentencePiece honours `add_space_prefix` and prefixes a space to every
  text segment that starts the text or follows an added token, even if it
  already starts with a space ("  a" -> "▁▁▁a"; transformers
  gives "▁▁a").
- `pre` missing or "default": llama.cpp's default splitting (punctuation
  runs, then GPT-2, then digit runs cut in threes).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["GGUFTokenizer"]

# llama.cpp's token types (gguf.TokenType).
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6
_DROPPED = (_UNKNOWN, _CONTROL)  # special tokens: matched whole, dropped by decode

_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2 = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _Pre:
    """How a byte-level vocabulary splits text before merging."""

    splits: tuple[str, ...]  # regexes applied in turn; matches and gaps both become pieces
    ignore_merges: bool = False  # a piece that is a whole vocabulary token is emitted as is


_GPT2_PRE = _Pre((_GPT2,))
_DIGITS_PRE = _Pre((r"\p{N}", _GPT2))  # every digit alone, then GPT-2 (StarCoder, SmolLM)
_LLAMA3_PRE = _Pre((_LLAMA3,), ignore_merges=True)
_QWEN2_PRE = _Pre((_QWEN2,))

# `tokenizer.ggml.pre` -> splitting, grouped as in llama.cpp's llama-vocab.cpp.
_PRE_TOKENIZERS: dict[str, _Pre] = {
    **dict.fromkeys(("gpt2", "gpt-2", "mpt", "olmo", "phi-2"), _GPT2_PRE),
    **dict.fromkeys(("smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"), _DIGITS_PRE),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral"), _LLAMA3_PRE),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _Pre((_LLAMA3,))),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez"), _QWEN2_PRE),
    # llama.cpp's fallback for files without `pre` (it warns that quality suffers).
    "default": _Pre((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, r"\p{N}+", r"[0-9][0-9][0-9]")),
}

_EOS_NAMES = ("</s>", "<|end_of_text|>", "<|endoftext|>", "<eos>", "<|im_end|>")


@lru_cache(maxsize=1)
def _byte_alphabet() -> dict[int, str]:
    """GPT-2's reversible map from the 256 bytes to printable characters."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return spelling


@lru_cache(maxsize=1)
def _reader_class() -> type:
    """`gguf.GGUFReader` parsing a plain ndarray view of its memmap (same bytes, about 3x faster:
    the metadata is read with ~10^5 tiny slices, and `np.memmap` slices are slow)."""
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise ImportError("GGUFTokenizer.from_file needs the gguf package (pip install gguf)") from e

    class Reader(GGUFReader):
        @property
        def data(self) -> np.ndarray:
            return self._plain_data

        @data.setter
        def data(self, value: np.ndarray) -> None:
            self._plain_data = value.view(np.ndarray) if isinstance(value, np.memmap) else value

    return Reader


def _read_metadata(path: Path) -> dict[str, Any]:
    """The `tokenizer.*` and `general.*` metadata of a GGUF file (arrays as lists)."""
    if not path.is_file():
        raise FileNotFoundError(f"path: no GGUF file at {str(path)!r}")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise ValueError(f"path: {str(path)!r} is not a GGUF file (magic {magic!r}, expected b'GGUF')")
    try:
        reader = _reader_class()(path, "r")
    except Exception as e:  # a damaged file fails in numpy or struct code
        raise ValueError(f"path: cannot read GGUF file {str(path)!r}: {e}") from e
    return {
        key: field.contents()
        for key, field in reader.fields.items()
        if key.startswith(("tokenizer.", "general."))
    }


class GGUFTokenizer:
    """The tokenizer described by a GGUF file's metadata; implements `Tokenizer`.

    `encode(text)` adds no special tokens (strings of control tokens inside
    `text` are still parsed as those tokens, as in transformers);
    `encode(text, add_special_tokens=True)` adds BOS/EOS as the file's
    `add_bos_token`/`add_eos_token` flags say (llama.cpp's defaults when
    absent). `decode` drops special (control, unknown) tokens and keeps
    user-defined ones. `vocab_size` is the number of
    tokens in the file (the model's embedding rows). `pad_id` falls back to
    `eos_id`.
    """

    def __init__(self, metadata: Mapping[str, Any], *, name: str = "<metadata>") -> None:
        self.name = name
        self.path: Path | None = None
        model = metadata.get("tokenizer.ggml.model")
        if model is None or "tokenizer.ggml.tokens" not in metadata:
            raise ValueError(f"path: {name!r} has no tokenizer metadata (tokenizer.ggml.model / tokenizer.ggml.tokens)")
        self.tokenizer_type: str = str(model)
        tokens = [str(t) for t in metadata["tokenizer.ggml.tokens"]]
        if not tokens:
            raise ValueError(f"path: {name!r} has an empty tokenizer.ggml.tokens")
        types = list(metadata.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"path: {name!r} has {len(types)} token types for {len(tokens)} tokens")
        self._tokens, self._types = tokens, types
        self.pre: str | None = None
        if self.tokenizer_type == "gpt2":
            self.pre = str(metadata.get("tokenizer.ggml.pre", "default"))
            self._tok = self._build_byte_level(metadata)
            default_bos = False
        elif self.tokenizer_type == "llama":
            self._tok = self._build_sentencepiece(metadata)
            default_bos = True
        else:
            raise NotImplementedError(
                f"path: tokenizer.ggml.model {self.tokenizer_type!r} of {name!r} is not supported (gpt2, llama)"
            )
        self._add_control_tokens()
        self.add_bos_token = bool(metadata.get("tokenizer.ggml.add_bos_token", default_bos))
        self.add_eos_token = bool(metadata.get("tokenizer.ggml.add_eos_token", False))
        self._bos = self._special_id(metadata, "bos_token_id")
        eos = self._special_id(metadata, "eos_token_id")
        if eos is None:
            eos = next((i for i, t in enumerate(tokens) if t in _EOS_NAMES and types[i] == _CONTROL), None)
        if eos is None:
            raise ValueError(f"path: {name!r} has no tokenizer.ggml.eos_token_id and no known end-of-sequence token")
        self._eos = eos
        pad = self._special_id(metadata, "padding_token_id")
        self._pad = eos if pad is None else pad
        self._unk = self._special_id(metadata, "unknown_token_id")
        template = metadata.get("tokenizer.chat_template")
        self.chat_template: str | None = None if template is None else str(template)
        self._template: Any = None
        self._token_bytes = self._bytes_table()

    @classmethod
    def from_file(cls, path: str | Path) -> GGUFTokenizer:
        """Reads the tokenizer metadata of the GGUF file at `path`."""
        path = Path(path)
        tok = cls(_read_metadata(path), name=str(path))
        tok.path = path
        return tok

    # ---- building -------------------------------------------------------------------------

    def _special_id(self, metadata: Mapping[str, Any], key: str) -> int | None:
        value = metadata.get(f"tokenizer.ggml.{key}")
        if value is None:
            return None
        if not 0 <= int(value) < len(self._tokens):
            raise ValueError(f"path: tokenizer.ggml.{key}={value} of {self.name!r} is outside [0, {len(self._tokens)})")
        return int(value)

    def _vocab(self, spell: Callable[[str], str]) -> dict[str, int]:
        """Token -> id; normal tokens respelled by `spell`, added ones kept as written in text."""
        vocab: dict[str, int] = {}
        for i, (token, kind) in enumerate(zip(self._tokens, self._types)):
            vocab.setdefault(token if kind in (*_DROPPED, _USER_DEFINED) else spell(token), i)
        return vocab

    def _build_byte_level(self, metadata: Mapping[str, Any]) -> Any:
        from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers

        pre = _PRE_TOKENIZERS.get(self.pre)
        if pre is None:
            raise NotImplementedError(
                f"path: tokenizer.ggml.pre {self.pre!r} of {self.name!r} is not supported; "
                f"known: {sorted(_PRE_TOKENIZERS)}"
            )
        spelling = _byte_alphabet()
        alphabet = set(spelling.values())

        def spell(token: str) -> str:
            return token if set(token) <= alphabet else "".join(spelling[b] for b in token.encode("utf-8"))

        merges = self._merges(metadata)
        bpe = models.BPE(vocab=self._vocab(spell), merges=merges, ignore_merges=pre.ignore_merges)
        tok = Tokenizer(bpe)
        tok.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(p), behavior="isolated") for p in pre.splits]
            + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
        tok.decoder = decoders.ByteLevel()
        return tok

    def _merges(self, metadata: Mapping[str, Any]) -> list[tuple[str, str]]:
        merges = []
        for merge in metadata.get("tokenizer.ggml.merges") or []:
            parts = str(merge).split(" ")
            if len(parts) != 2:
                raise ValueError(f"path: merge {merge!r} of {self.name!r} is not two tokens separated by a space")
            merges.append((parts[0], parts[1]))
        return merges

    def _build_sentencepiece(self, metadata: Mapping[str, Any]) -> Any:
        from tokenizers import Tokenizer, decoders, models, normalizers

        scores = metadata.get("tokenizer.ggml.scores")
        if scores is None or len(scores) != len(self._tokens):
            raise ValueError(f"path: {self.name!r} (tokenizer.ggml.model 'llama') needs one tokenizer.ggml.scores per token")
        vocab = self._vocab(lambda t: t)
        merges = self._merges(metadata) if "tokenizer.ggml.merges" in metadata else self._merges_from_scores(scores)
        unk_id = metadata.get("tokenizer.ggml.unknown_token_id")
        unk = self._tokens[int(unk_id)] if unk_id is not None and 0 <= int(unk_id) < len(self._tokens) else None
        tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=unk, byte_fallback=True, fuse_unk=True))
        prefix = bool(metadata.get("tokenizer.ggml.add_space_prefix", True))
        steps = [normalizers.Prepend("\u2581")] if prefix else []
        tok.normalizer = normalizers.Sequence([*steps, normalizers.Replace(" ", "\u2581")])
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        tok.decoder = decoders.Sequence([*steps, decoders.Strip(" ", 1, 0)] if prefix else steps)
        return tok

    def _merges_from_scores(self, scores: Sequence[float]) -> list[tuple[str, str]]:
        """SentencePiece merges: every split of a normal token into two tokens, best score first."""
        ids = {t: i for i, (t, k) in enumerate(zip(self._tokens, self._types)) if k == _NORMAL}
        ranked = []
        for token, i in ids.items():
            for cut in range(1, len(token)):
                left, right = token[:cut], token[cut:]
                if left in ids and right in ids:
                    ranked.append((-float(scores[i]), ids[left], ids[right], left, right))
        ranked.sort()
        return [(left, right) for *_, left, right in ranked]

    def _add_control_tokens(self) -> None:
        from tokenizers import AddedToken

        control = [t for t, k in zip(self._tokens, self._types) if k in _DROPPED]
        user = [t for t, k in zip(self._tokens, self._types) if k == _USER_DEFINED]
        if control:
            self._tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in control])
        if user:
            self._tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in user])

    def _bytes_table(self) -> np.ndarray | None:
        """UTF-8 bytes each byte-level token stands for (0 for special tokens); None for SentencePiece."""
        if self.tokenizer_type != "gpt2":
            return None
        inverse = {c: b for b, c in _byte_alphabet().items()}
        table = np.zeros(len(self._tokens), dtype=np.int64)
        for i, (token, kind) in enumerate(zip(self._tokens, self._types)):
            if kind in _DROPPED:
                continue
            if kind != _USER_DEFINED and set(token) <= inverse.keys():
                table[i] = len(token)  # one character per byte
            else:
                table[i] = len(self._tok.decode([i], skip_special_tokens=False).encode("utf-8", "surrogatepass"))
        return table

    # ---- the Tokenizer protocol -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    @property
    def bos_id(self) -> int | None:
        return self._bos

    @property
    def eos_id(self) -> int:
        return self._eos

    @property
    def pad_id(self) -> int:
        return self._pad

    def encode(self, text: str, *, add_special_tokens: bool = False) -> list[int]:
        """Token ids of `text`; with `add_special_tokens`, BOS/EOS as the file's flags say."""
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        ids = list(self._tok.encode(text, add_special_tokens=False).ids)
        if add_special_tokens:
            if self.add_bos_token and self._bos is not None:
                ids.insert(0, self._bos)
            if self.add_eos_token:
                ids.append(self._eos)
        return ids

    def encode_array(self, text: str) -> np.ndarray:
        """`encode` as an int32 array."""
        return np.asarray(self.encode(text), dtype=np.int32)

    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        if ids is None or isinstance(ids, (str, bytes)):
            raise TypeError(f"ids: expected a sequence of ints, got {type(ids).__name__}")
        try:
            arr = np.asarray(ids)
        except (TypeError, ValueError) as e:
            raise TypeError(f"ids: expected a sequence of ints: {e}") from e
        if arr.size == 0:
            return []
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise TypeError(f"ids: expected integers, got {arr.dtype} values like {arr.reshape(-1)[0]!r}")
        if arr.ndim != 1:
            raise ValueError(f"ids: expected a 1-D sequence, got shape {arr.shape}")
        bad = (arr < 0) | (arr >= len(self._tokens))
        if bad.any():
            raise ValueError(f"ids: {int(arr[bad][0])} is outside the vocabulary [0, {len(self._tokens)})")
        return arr.tolist()

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids`, special tokens dropped; invalid UTF-8 becomes U+FFFD."""
        return self._tok.decode(self._check_ids(ids), skip_special_tokens=True)

    def num_bytes(self, ids: Sequence[int]) -> int:
        """UTF-8 bytes the non-special tokens stand for.

        Byte-level: the sum of each token's bytes, exact for any slice.
        SentencePiece: the bytes of the decoded text, exact for whole texts.
        """
        checked = self._check_ids(ids)
        if not checked:
            return 0
        if self._token_bytes is not None:
            return int(self._token_bytes[checked].sum())
        return len(self.decode(checked).encode("utf-8", "surrogatepass"))

    def id_to_token(self, token_id: int) -> str:
        """The token as the file spells it."""
        self._check_ids([token_id])
        return self._tokens[int(token_id)]

    # ---- chat template --------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        *,
        add_generation_prompt: bool = False,
        tokenize: bool = False,
        tools: Sequence[Any] | None = None,
        **template_kwargs: Any,
    ) -> str | list[int]:
        """Renders `tokenizer.chat_template` as transformers does; the string, or its ids."""
        _check_messages(messages)
        if self.chat_template is None:
            raise ValueError(f"path: {self.name!r} has no tokenizer.chat_template; apply_chat_template needs one")
        if self._template is None:
            self._template = _compile_template(self.chat_template)
        names = {
            "bos_token": self._bos,
            "eos_token": self._eos,
            "pad_token": self._pad,
            "unk_token": self._unk,
        }
        specials = {k: self._tokens[v] for k, v in names.items() if v is not None}
        text = self._template.render(
            messages=[dict(m) for m in messages],
            tools=None if tools is None else list(tools),
            add_generation_prompt=add_generation_prompt,
            **{**specials, **template_kwargs},
        )
        return self.encode(text) if tokenize else text

    def __repr__(self) -> str:
        return f"GGUFTokenizer({self.name!r}, model={self.tokenizer_type!r}, pre={self.pre!r})"


def _check_messages(messages: object) -> None:
    if isinstance(messages, (str, bytes, Mapping)) or not isinstance(messages, Sequence):
        raise TypeError(f"messages: expected a list of {{'role', 'content'}} dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(message).__name__}")
        if not isinstance(message.get("role"), str):
            raise ValueError(f"messages[{i}]: 'role' must be a str, got {message.get('role')!r}")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"messages[{i}]: missing 'content' (role {message['role']!r})")
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise TypeError(f"messages[{i}]: 'content' must be a str or a list, got {type(content).__name__}")


def _compile_template(source: str) -> Any:
    """A chat template compiled the way transformers compiles it (sandboxed, trimmed blocks)."""
    try:
        import jinja2
    except ImportError as e:
        raise ImportError("apply_chat_template needs the jinja2 package (pip install jinja2)") from e
    from jinja2 import nodes
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """`{% generation %}...{% endgeneration %}` (marks assistant text): rendered as its body."""

        tags = {"generation"}

        def parse(self, parser: Any) -> list[nodes.Node]:
            next(parser.stream)
            return parser.parse_statements(("name:endgeneration",), drop_needle=True)

    def raise_exception(message: str) -> None:
        raise jinja2.exceptions.TemplateError(message)

    def tojson(
        value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None, sort_keys: bool = False
    ) -> str:
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    def strftime_now(fmt: str) -> str:
        return datetime.now().strftime(fmt)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = strftime_now
    return env.from_string(source)
