"""Generation speed of a decoder: time to first token and tokens per second.

    speed = measure_generation(decoder, model, prompts, max_new_tokens=64, repeats=3)

The first `warmup` calls compile (not timed); each reported number is the
median over `repeats` calls of the decoder's own `GenerateStats`.
"""

from __future__ import annotations

import dataclasses
import statistics
from collections.abc import Callable, Sequence
from typing import Any

from efficient.decoding import GenerateOutput
from efficient.models import LlamaModel


@dataclasses.dataclass(frozen=True)
class GenerationSpeed:
    time_to_first_token: float  # seconds: prefill + first token (median)
    decode_seconds: float  # median
    decode_tokens_per_second: float  # median
    tokens_per_second: float  # median, end to end
    target_forwards: int  # of the last run
    output: GenerateOutput  # of the last run

    def as_dict(self) -> dict[str, float]:
        return dict(time_to_first_token=self.time_to_first_token, decode_seconds=self.decode_seconds,
                    decode_tokens_per_second=self.decode_tokens_per_second,
                    tokens_per_second=self.tokens_per_second, target_forwards=self.target_forwards,
                    generated_tokens=self.output.stats.generated_tokens)


def measure_generation(decoder: Callable[..., GenerateOutput], model: LlamaModel,
                       prompts: Sequence[Sequence[int]], *, max_new_tokens: int, repeats: int = 3,
                       warmup: int = 1, **kwargs: Any) -> GenerationSpeed:
    """Run `decoder(model, prompts, max_new_tokens=..., **kwargs)` warmup + repeats times."""
    if not isinstance(repeats, int) or repeats < 1 or not isinstance(warmup, int) or warmup < 0:
        raise ValueError(f"repeats must be >= 1 and warmup >= 0, got repeats={repeats!r}, warmup={warmup!r}")
    for _ in range(warmup):
        decoder(model, prompts, max_new_tokens=max_new_tokens, **kwargs)
    outputs = [decoder(model, prompts, max_new_tokens=max_new_tokens, **kwargs) for _ in range(repeats)]
    stats = [o.stats for o in outputs]
    return GenerationSpeed(
        time_to_first_token=statistics.median(s.prefill_seconds for s in stats),
        decode_seconds=statistics.median(s.decode_seconds for s in stats),
        decode_tokens_per_second=statistics.median(s.decode_tokens_per_second for s in stats),
        tokens_per_second=statistics.median(s.tokens_per_second for s in stats),
        target_forwards=stats[-1].target_forwards,
        output=outputs[-1],
    )

