"""Orbax checkpoints of a run: params + optimizer state, and the step and data position.

    <workdir>/checkpoints/<step>/{state,meta}

`meta` (JSON) holds the step, the data seed and the number of batches drawn,
so a resumed run replays the same batch stream from where it stopped.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


@dataclasses.dataclass(frozen=True)
class Restored:
    params: Any
    opt_state: Any
    step: int
    meta: dict[str, Any]


class Checkpointer:
    """Saves and restores (params, opt_state, meta) under `workdir/checkpoints`, keeping the last k."""

    def __init__(self, workdir: str | Path, keep: int = 2) -> None:
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.directory = Path(workdir).resolve() / "checkpoints"
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_names=("state", "meta"))

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def save(self, step: int, params: Any, opt_state: Any, meta: dict[str, Any]) -> None:
        """Writes step `step` (blocking until done, so params may be donated afterwards)."""
        state = {"params": params, "opt_state": opt_state}
        self._manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                    meta=ocp.args.JsonSave({**meta, "step": step})),
            force=True,
        )
        self._manager.wait_until_finished()

    def restore(self, params_like: Any, opt_state_like: Any, step: int | None = None) -> Restored:
        """The checkpoint at `step` (default latest), shaped like the given (abstract) trees."""
        step = self.latest_step() if step is None else step
        if step is None:
            raise FileNotFoundError(f"no checkpoint in {str(self.directory)!r}")
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct,
                              {"params": params_like, "opt_state": opt_state_like})
        out = self._manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()),
        )
        return Restored(out.state["params"], out.state["opt_state"], int(out.meta["step"]), dict(out.meta))

    def close(self) -> None:
        self._manager.close()
