"""What every experiment shares: loading models, tokenizers and corpora from config
values with clear errors, held-out prompts, tables, and the result an experiment
hands to `experiments.run`.

These functions take plain values (paths, names, numbers), never a ConfigDict:
each experiment reads its config and calls them with the fields.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flax import nnx

from efficient.data import ByteTokenizer, Corpus, Document, Tokenizer, check_vocab, load_tokenizer
from efficient.models import (
    PACKAGED_MODELS,
    LlamaModel,
    ModelConfig,
    check_layer_loop,
    from_pretrained,
    resolve_model_path,
    save_pretrained,
    set_layer_loop,
)

def config_flag_error(argv: Sequence[str], flag: str = "config") -> str | None:
    """One line saying what is wrong with the `--<flag>` of `argv`: a config file that does not
    load, or the first `--<flag>.<key>` override naming no key of it (with the valid keys).
    None if nothing is (or no `--<flag>` is given: absl reports a missing required flag)."""
    from ml_collections import config_dict
    from ml_collections.config_flags.config_flags import ConfigFileFlagParser

    path = None
    for i, arg in enumerate(argv):
        match = re.fullmatch(rf"--?{flag}(?:=(.*))?", arg)
        if match:
            path = match.group(1) if match.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
    if path is None:
        return None
    try:
        config = ConfigFileFlagParser(name=flag).parse(path)
        if type(config).__name__ == "_ErrorConfig":  # a file that failed to load: a stand-in holding the error
            config._ReportError()
    except Exception as err:  # noqa: BLE001 - the loader raises OSError, SyntaxError, anything the file raises
        cause = err.__cause__ or err
        return f"--{flag} {path!r} cannot be loaded: " + " ".join(str(cause).split())
    for arg in argv:
        match = re.match(rf"--?(?:no)?{flag}\.([^=]+)", arg)
        if not match:
            continue
        node, walked = config, flag
        for part in match.group(1).split("."):
            if not isinstance(node, config_dict.ConfigDict) or "[" in part:
                break  # a dict, dataclass or list field: absl checks the rest
            if part not in node:
                return (f"unknown config key {walked + '.' + part!r} (in --{flag}.{match.group(1)}); "
                        f"valid keys of {walked}: {sorted(node.keys())}")
            node, walked = node[part], f"{walked}.{part}"
    return None


def parse_config_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing (`app.run(main, flags_parser=parse_config_flags)`), except that an
    unknown `--config.<key>` or a config file that does not load exits (status 1) with one
    line (naming the key and the valid keys) instead of a traceback."""
    from absl import app

    message = config_flag_error(argv)
    if message is None:
        try:
            return app.parse_flags_with_usage(argv)
        except (AttributeError, KeyError) as err:  # an override ml_collections cannot place
            message = f"bad --config override: {err}"
    sys.exit(f"experiments.{Path(argv[0]).stem if argv else 'run'}: {message}")


TRAIN_HINT = "train one with `python -m experiments.train --config configs/train_target.py`"


@dataclasses.dataclass
class ExperimentResult:
    """What an experiment's `run(config)` returns; `experiments.run` writes it out.

    metrics: JSON-serialisable; table: printed to the terminal; figures: name ->
    matplotlib Figure, saved as <name>.png.
    """

    metrics: dict[str, Any]
    table: str
    figures: dict[str, Any] = dataclasses.field(default_factory=dict)


def check_positive(owner: object, *names: str, minimum: int = 1) -> None:
    """ValueError naming `Owner.field` unless each named field is an int >= minimum."""
    for name in names:
        value = getattr(owner, name)
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            raise ValueError(f"{type(owner).__name__}.{name}: expected an int >= {minimum}, got {value!r}")


def load_model(path: str | Path, *, dtype: str | None = None, key: str = "config.model.path",
               layer_loop: str = "scan") -> LlamaModel:
    """A model from a packaged name ("smollm2"), a .gguf file or an HF checkpoint folder;
    FileNotFoundError naming the config key and path. `layer_loop` as
    `efficient.models.set_layer_loop` ("scan", "unrolled" or "auto")."""
    check_layer_loop(layer_loop, f"{key.rsplit('.', 1)[0]}.layer_loop")  # before the (slow) load
    return set_layer_loop(_load(path, dtype, key), layer_loop)


def _load(path: str | Path, dtype: str | None, key: str) -> LlamaModel:
    try:
        resolved = resolve_model_path(path)
    except (FileNotFoundError, ValueError) as err:
        raise FileNotFoundError(f"{key}: {err}") from err
    if resolved.is_file():
        if resolved.suffix != ".gguf":
            raise ValueError(f"{key}: {str(resolved)!r} is a file but not a .gguf file; pass a .gguf file, "
                             f"an HF checkpoint folder or one of {sorted(PACKAGED_MODELS)}")
        return from_pretrained(resolved, dtype=dtype or None)
    if not resolved.is_dir():
        raise FileNotFoundError(f"{key}: checkpoint folder {str(resolved)!r} does not exist "
                                f"({TRAIN_HINT}, or pass --{key}=<HF folder, .gguf file or "
                                f"{'/'.join(sorted(PACKAGED_MODELS))}>)")
    if not (resolved / "config.json").is_file():
        raise FileNotFoundError(f"{key}: {str(resolved)!r} has no config.json: not an HF checkpoint folder")
    return from_pretrained(resolved, dtype=dtype or None)


def load_tokenizer_for(model_path: str | Path, spec: str, vocab_size: int,
                       key: str = "config.model.tokenizer") -> Tokenizer:
    """The tokenizer of a checkpoint, checked against the model's vocabulary.

    spec "auto": a .gguf model's own tokenizer, else the folder's tokenizer.json if it
    has one, else `ByteTokenizer`; "byte": `ByteTokenizer`; anything else: a .gguf file
    or a folder holding tokenizer.json.
    ValueError naming both sizes if the tokenizer has ids the model cannot embed.
    """
    location = resolve_model_path(model_path)
    if spec == "auto":
        if location.is_file():
            tokenizer = load_tokenizer(location)
        elif (location / "tokenizer.json").is_file():
            tokenizer = load_tokenizer(location)
        else:
            tokenizer = ByteTokenizer()
    elif spec == "byte":
        tokenizer = ByteTokenizer()
    else:
        if not (Path(spec).is_dir() or Path(spec).suffix == ".gguf" and Path(spec).is_file()):
            raise FileNotFoundError(f"{key}: {spec!r} is neither 'auto', 'byte', a .gguf file nor a folder")
        tokenizer = load_tokenizer(spec)
    try:
        check_vocab(tokenizer, vocab_size)
    except ValueError as err:
        raise ValueError(
            f"{key}: tokenizer {tokenizer!r} has {tokenizer.vocab_size} ids but the model at "
            f"{str(location)!r} has vocab_size {vocab_size}; they do not belong together "
            f"(set --{key} to the checkpoint's tokenizer)"
        ) from err
    return tokenizer


def load_documents(source: str, suffixes: Sequence[str] | None, split: str,
                   key: str = "config.data") -> list[Document]:
    """Documents of one split ("train", "validation", "test" or "all") of the stdlib
    ("stdlib") or of a folder of text files; errors name the folder and split."""
    if source == "stdlib":
        corpus = Corpus.from_stdlib()
    else:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"{key}.source: corpus folder {source!r} does not exist")
        corpus = Corpus.from_folder(source, suffixes=tuple(suffixes) if suffixes else None)
    docs = list(corpus.documents) if split == "all" else corpus.split(split)
    if not docs:
        raise ValueError(f"{key}.split: the {split!r} split of {corpus!r} is empty "
                         f"(a small folder may have no held-out module; use --{key}.split=all)")
    return docs


def code_prompts(documents: Sequence[Document], tokenizer: Tokenizer, count: int, length: int,
                 seed: int) -> list[list[int]]:
    """`count` prompts of `length` tokens, each starting at a seeded line of a
    different document (documents shorter than that are skipped)."""
    rng = np.random.default_rng(seed)
    prompts: list[list[int]] = []
    for i in rng.permutation(len(documents)):
        text = documents[i].text
        starts = [0] + [j + 1 for j, ch in enumerate(text) if ch == "\n"]
        start = starts[int(rng.integers(len(starts)))]
        ids = tokenizer.encode(text[start:])
        if len(ids) < length:
            ids = tokenizer.encode(text)
        if len(ids) >= length:
            prompts.append(ids[:length])
        if len(prompts) == count:
            return prompts
    raise ValueError(f"prompt_tokens: only {len(prompts)} of the documents hold {length} tokens, "
                     f"{count} prompts asked for")


RANDOM_SIZES = {
    # vocab 259 = ByteTokenizer; "target" matches configs/train_target.py (~12.7M parameters).
    "tiny": dict(hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, head_dim=8,
                 max_position_embeddings=512),
    "target": dict(hidden_size=384, intermediate_size=1024, num_layers=8, num_heads=6, num_kv_heads=2,
                   head_dim=64, max_position_embeddings=2048, tie_embeddings=True),
}


def save_random_model(folder: str | Path, *, size: str = "tiny", seed: int = 0) -> Path:
    """A randomly initialised byte-level model saved as an HF folder (smoke tests, notebooks)."""
    if size not in RANDOM_SIZES:
        raise ValueError(f"size: expected one of {sorted(RANDOM_SIZES)}, got {size!r}")
    tok = ByteTokenizer()
    config = ModelConfig(vocab_size=tok.vocab_size, bos_token_id=tok.bos_id, eos_token_ids=(tok.eos_id,),
                         pad_token_id=tok.pad_id, **RANDOM_SIZES[size])
    save_pretrained(LlamaModel(config, rngs=nnx.Rngs(seed)), folder)
    return Path(folder)


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Rows as a fixed-width table; columns are (key, header, format spec)."""
    def cell(row: dict[str, Any], key: str, spec: str) -> str:
        value = row.get(key)
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return "-"
        return format(value, spec)

    cells = [[cell(r, k, s) for k, _, s in columns] for r in rows]
    widths = [max([len(h)] + [len(c[i]) for c in cells]) for i, (_, h, _) in enumerate(columns)]
    lines = ["  ".join(h.rjust(w) for (_, h, _), w in zip(columns, widths))]
    lines.append("  ".join("-" * w for w in widths))
    lines += ["  ".join(c.rjust(w) for c, w in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def write_run(config: Any, metrics: dict[str, Any]) -> Path:
    """Write `config.json` and `metrics.json` under `config.out_dir`/`config.run_name`
    (a timestamp when the name is empty); returns the run's folder."""
    out = Path(config.out_dir) / (config.run_name or time.strftime("%Y%m%d-%H%M%S"))
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(config.to_json(indent=2))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    return out


def machine_info() -> dict[str, Any]:
    """Where a benchmark ran: platform, processor, cores, jax backend and device, library
    versions (torch / transformers when installed) and the git commit of the code."""
    import os
    import platform
    import subprocess

    import jax

    info: dict[str, Any] = dict(platform=platform.platform(), processor=platform.processor() or platform.machine(),
                                cpu_count=os.cpu_count(), jax=jax.__version__, backend=jax.default_backend(),
                                device=str(jax.devices()[0].device_kind),
                                omp_wait_policy=os.environ.get("OMP_WAIT_POLICY"))
    from importlib import metadata

    for package in ("torch", "transformers"):  # read from the installed metadata: importing torch takes seconds
        try:
            info[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            pass
    try:
        root = Path(__file__).resolve().parents[1]
        info["commit"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                        check=True, cwd=root).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=True, cwd=root).stdout.strip()
        info["commit_dirty"] = bool(dirty)
    except (OSError, subprocess.CalledProcessError):
        info["commit"] = None
    return info
