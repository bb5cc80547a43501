"""Drafters for speculative decoding: each proposes a token tree for the one verifier."""

from efficient.decoding.drafters.base import DraftContext, Drafter, PromptContext, VerifyOutcome
from efficient.decoding.drafters.draft_model import DraftModelDrafter
from efficient.decoding.drafters.layer_skip import (
    LayerSkipDrafter,
    SkipCalibration,
    calibrate_skip_layers,
    estimated_speedup,
)

__all__ = [
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "LayerSkipDrafter",
    "PromptContext",
    "SkipCalibration",
    "VerifyOutcome",
    "calibrate_skip_layers",
    "estimated_speedup",
]
