"""Evaluation: perplexity / bits per byte through any cache, retrieval accuracy,
generation speed, cache memory, and wall-clock timing."""

from efficient.eval.memory import CacheMemory, cache_memory
from efficient.eval.perplexity import PerplexityResult, perplexity, select_windows
from efficient.eval.retrieval import RetrievalRecord, RetrievalResult, retrieval_accuracy, score_answer
from efficient.eval.agreement import prefix_agreement
from efficient.eval.speed import GenerationSpeed, measure_generation
from efficient.eval.timing import median_seconds

__all__ = [
    "CacheMemory",
    "GenerationSpeed",
    "PerplexityResult",
    "RetrievalRecord",
    "RetrievalResult",
    "cache_memory",
    "measure_generation",
    "median_seconds",
    "perplexity",
    "prefix_agreement",
    "retrieval_accuracy",
    "score_answer",
    "select_windows",
]
