"""Decoding: sampling rules and the jitted generate loop."""

from efficient.decoding.generate import TRACE_COUNTS, GenerateOutput, GenerateStats, generate
from efficient.decoding.prompts import PromptBatch, bucket_length, capacity_bucket, make_prompt_batch
from efficient.decoding.speculative import SpeculativeStats, speculative_generate
from efficient.decoding.sampling import Greedy, Sample, SamplingRule, sample_tokens, sampling_from_dict

__all__ = [
    "TRACE_COUNTS",
    "GenerateOutput",
    "GenerateStats",
    "Greedy",
    "PromptBatch",
    "Sample",
    "SamplingRule",
    "bucket_length",
    "capacity_bucket",
    "generate",
    "make_prompt_batch",
    "sample_tokens",
    "sampling_from_dict",
    "speculative_generate",
    "SpeculativeStats",
]
