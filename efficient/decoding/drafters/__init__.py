"""Drafters for speculative decoding: each proposes a token tree for the one verifier."""

from efficient.decoding.drafters.base import DraftContext, Drafter, PromptContext, VerifyOutcome
from efficient.decoding.drafters.draft_model import DraftModelDrafter
from efficient.decoding.drafters.eagle import EagleDrafter
from efficient.decoding.drafters.eagle_model import (
    FeatureDraftModel,
    LoadedFeatureDrafter,
    load_feature_drafter,
    save_feature_drafter,
)
from efficient.decoding.drafters.lookahead import LookaheadDrafter
from efficient.decoding.drafters.medusa import (
    LoadedHeads,
    MedusaDrafter,
    MedusaHeads,
    load_medusa_heads,
    medusa_tree,
    save_medusa_heads,
)
from efficient.decoding.drafters.prompt_lookup import PromptLookupDrafter
from efficient.decoding.drafters.recycling import TokenRecyclingDrafter
from efficient.decoding.drafters.layer_skip import (
    LayerSkipDrafter,
    SkipCalibration,
    calibrate_skip_layers,
    estimated_speedup,
    fixed_cost_fraction,
)

__all__ = [
    "DraftContext",
    "DraftModelDrafter",
    "Drafter",
    "EagleDrafter",
    "FeatureDraftModel",
    "LayerSkipDrafter",
    "LoadedFeatureDrafter",
    "LoadedHeads",
    "LookaheadDrafter",
    "MedusaDrafter",
    "MedusaHeads",
    "PromptContext",
    "PromptLookupDrafter",
    "SkipCalibration",
    "TokenRecyclingDrafter",
    "VerifyOutcome",
    "calibrate_skip_layers",
    "estimated_speedup",
    "fixed_cost_fraction",
    "load_feature_drafter",
    "load_medusa_heads",
    "medusa_tree",
    "save_feature_drafter",
    "save_medusa_heads",
]
