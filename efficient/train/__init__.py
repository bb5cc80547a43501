"""Optax training of small models: config, optimizer, jitted step, checkpoints, export."""

from efficient.train.checkpoint import Checkpointer, Restored
from efficient.train.config import COMPUTE_DTYPES, TrainConfig
from efficient.train.export import export_model, machine_info, write_record
from efficient.train.loop import TrainResult, train
from efficient.train.optimizer import lr_schedule, make_optimizer
from efficient.train.step import TrainFns, bits_per_byte, compute_graphdef, make_train_fns, token_nll
from efficient.train.validation import ValidationSet, evaluate, validation_set

__all__ = [
    "COMPUTE_DTYPES",
    "Checkpointer",
    "Restored",
    "TrainConfig",
    "TrainFns",
    "TrainResult",
    "ValidationSet",
    "bits_per_byte",
    "compute_graphdef",
    "evaluate",
    "export_model",
    "lr_schedule",
    "machine_info",
    "make_optimizer",
    "make_train_fns",
    "token_nll",
    "train",
    "validation_set",
    "write_record",
]
