"""Synthetic encoded pairs for engine tests (label = whether the second token id is above 64)."""
import numpy as np

from mkdm_jax.data import Encoded


def synthetic_data(n=64, length=16, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(6, length + 1, n).astype(np.int32)
  mask = (np.arange(length)[None] < lengths[:, None]).astype(np.int32)
  ids = rng.integers(5, 128, (n, length)).astype(np.int32) * mask
  labels = (ids[:, 1] > 64).astype(np.int32)
  return Encoded(input_ids=ids, token_type_ids=np.zeros_like(ids), attention_mask=mask,
                 lengths=lengths, labels=labels, ids=np.arange(n), groups=None, fingerprint='synthetic')
