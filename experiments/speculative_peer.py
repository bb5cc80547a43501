"""transformers' prompt-lookup decoding on the speculative benchmark's prompts: the peer
a user would compare our drafters with.

`model.generate(ids, prompt_lookup_num_tokens=N)` (Saxena 2023, prompt lookup decoding;
transformers' `PromptLookupCandidateGenerator`) against transformers' own greedy
`generate` on the same weights (the GGUF file both sides load), batch 1 (the only batch
transformers' prompt lookup supports), `max_new_tokens` tokens with end-of-sequence
stopping off (as our benchmark runs). Repeats are interleaved (greedy, lookup) after a
warm-up; each time is the median over repeats of the sum over prompts. torch runs with
`threads` threads and OMP_WAIT_POLICY=PASSIVE (set before torch is imported).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from efficient.data.code_tasks import CodePrompt


def _generate_fn(path: Path, dtype: str, threads: int) -> Callable[[list[int], int, int], tuple[list[int], float]]:
    """(prompt ids, max_new, lookup tokens or 0) -> (generated ids, seconds), transformers on `path`."""
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    from experiments.bench_peer import Transformers  # imports torch (after the policy is set)

    peer = Transformers(path, dtype, threads)
    torch, model = peer.torch, peer.model
    config = model.generation_config
    config.eos_token_id, config.pad_token_id = None, 0  # no stopping: exactly max_new tokens, as ours

    def run(ids: list[int], max_new: int, lookup: int) -> tuple[list[int], float]:
        prompt = torch.as_tensor([ids])
        options: dict[str, Any] = dict(max_new_tokens=max_new, do_sample=False, generation_config=config)
        if lookup:
            options["prompt_lookup_num_tokens"] = lookup
        with torch.inference_mode():
            start = time.perf_counter()
            out = model.generate(prompt, attention_mask=torch.ones_like(prompt), **options)
            seconds = time.perf_counter() - start
        return out[0, len(ids):].tolist(), seconds

    return run


def prompt_lookup_peer(path: Path, dtype: str, prompts: dict[str, list[CodePrompt]], *, max_new_tokens: int,
                       num_tokens: int, repeats: int, warmup: int, threads: int,
                       ours_greedy: dict[str, Sequence[Sequence[int]]],
                       log: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """One row per task kind: transformers greedy and prompt-lookup seconds (end to end),
    the speedup, and whether the lookup output equals transformers' greedy and ours."""
    run = _generate_fn(path, dtype, threads)
    rows = []
    for kind, task_prompts in prompts.items():
        times: dict[str, list[float]] = {"greedy": [], "lookup": []}
        outputs: dict[str, list[list[int]]] = {}
        for rep in range(warmup + repeats):
            for name, lookup in (("greedy", 0), ("lookup", num_tokens)):
                results = [run(p.ids, max_new_tokens, lookup) for p in task_prompts]
                outputs[name] = [r[0] for r in results]
                if rep >= warmup:
                    times[name].append(sum(r[1] for r in results))
        greedy, lookup = statistics.median(times["greedy"]), statistics.median(times["lookup"])
        ours = [list(s) for s in ours_greedy.get(kind, [])]
        row = dict(task=kind, batch_size=1, prompts=len(task_prompts), num_tokens=num_tokens,
                   greedy_seconds=greedy, lookup_seconds=lookup, speedup=greedy / max(lookup, 1e-12),
                   greedy_repeats=times["greedy"], lookup_repeats=times["lookup"],
                   identical_to_own_greedy=outputs["lookup"] == outputs["greedy"],
                   greedy_identical_to_ours=outputs["greedy"] == ours if ours else None,
                   greedy_agreement_with_ours=(float(np.mean([a == b for a, b in zip(outputs["greedy"], ours,
                                                                                         strict=True)]))
                                               if ours else None))
        log(f"transformers {kind}: greedy {greedy:.2f} s, prompt lookup ({num_tokens}) {lookup:.2f} s, "
            f"speedup {row['speedup']:.2f}x, identical {row['identical_to_own_greedy']}, "
            f"same greedy as ours {row['greedy_identical_to_ours']}")
        rows.append(row)
    return rows
