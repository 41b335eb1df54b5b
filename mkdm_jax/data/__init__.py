"""Data layer: task registry and readers, tokenization, bucketed batching, the teacher-logit store and
prepared corpora (streamed from disk)."""
from mkdm_jax.data.batching import batches, num_batches
from mkdm_jax.data.logit_store import LogitStore, StaleStoreError
from mkdm_jax.data.readers import Examples, row_key
from mkdm_jax.data.tasks import (TASKS, TaskSpec, add_unlabelled_rows, get_task, load_split, make_unlabelled_pairs,
                                 resolve_data_dir)
from mkdm_jax.data.tokenize import Encoded, encode
from mkdm_jax.data import corpus  # noqa: E402 (after the modules it builds on)

__all__ = ["Examples", "row_key", "TaskSpec", "get_task", "TASKS", "resolve_data_dir", "load_split",
           "make_unlabelled_pairs", "add_unlabelled_rows", "encode", "Encoded", "batches", "num_batches", "LogitStore",
           "StaleStoreError", "corpus"]
