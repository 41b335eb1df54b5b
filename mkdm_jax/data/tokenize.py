"""Pair encoding with the `tokenizers` library, cached as .npz files."""
import dataclasses
import hashlib
from pathlib import Path

import numpy as np
import tokenizers

from mkdm_jax import paths
from mkdm_jax.data.readers import Examples
from mkdm_jax.errors import UserError

_TOKEN_KEYS = ("input_ids", "token_type_ids", "attention_mask")
_ARRAYS = ("input_ids", "token_type_ids", "attention_mask", "lengths", "labels", "ids")


@dataclasses.dataclass
class Encoded:
  """Token arrays padded to `max_length`, with the rows' labels, ids and groups."""
  input_ids: np.ndarray  # int32 [N, max_length]
  token_type_ids: np.ndarray  # int32 [N, max_length]
  attention_mask: np.ndarray  # int32 [N, max_length]
  lengths: np.ndarray  # int32 [N], tokens per row (special tokens included)
  labels: np.ndarray  # int32 [N], -1 = no label
  ids: np.ndarray  # int64 [N]
  groups: np.ndarray | None  # int64 [N]
  fingerprint: str  # sha256 of tokenizer, examples fingerprint and max_length

  def __len__(self):
    return len(self.ids)

  @property
  def max_length(self) -> int:
    return self.input_ids.shape[1]

  def tokens(self, rows, length: int) -> dict[str, np.ndarray]:
    """input_ids, token_type_ids, attention_mask of the rows at positions `rows`, cut to `length`."""
    return {k: getattr(self, k)[rows, :length] for k in _TOKEN_KEYS}

  def select(self, indices) -> "Encoded":
    """Rows at `indices` (positions)."""
    idx = np.asarray(indices, dtype=np.int64)
    arrays = {k: getattr(self, k)[idx] for k in _ARRAYS}
    return Encoded(**arrays, groups=None if self.groups is None else self.groups[idx],
                   fingerprint=hashlib.sha256(self.fingerprint.encode() + idx.tobytes()).hexdigest())


def tokenizer_fingerprint(tokenizer: tokenizers.Tokenizer) -> str:
  """sha256 of the tokenizer's full configuration (vocabulary, normalisation, special tokens)."""
  return hashlib.sha256(tokenizer.to_str().encode()).hexdigest()


def _configured_copy(tokenizer: tokenizers.Tokenizer, max_length: int) -> tokenizers.Tokenizer:
  """A copy truncating pairs longest-first and padding to `max_length` (the caller's is untouched)."""
  tok = tokenizers.Tokenizer.from_str(tokenizer.to_str())
  padding = tokenizer.padding or {}
  # The checkpoint's own pad token: BERT's [PAD], or <pad> of RoBERTa/MPNet vocabularies.
  pad_token = padding.get("pad_token", "<pad>" if tokenizer.token_to_id("<pad>") is not None else "[PAD]")
  pad_id = padding.get("pad_id", tokenizer.token_to_id(pad_token) or 0)
  tok.enable_truncation(max_length, strategy="longest_first")
  tok.enable_padding(length=max_length, pad_id=pad_id, pad_token=pad_token)
  return tok


def encode(tokenizer: tokenizers.Tokenizer, examples: Examples, max_length: int, cache_dir=None) -> Encoded:
  """Encodes (text_a, text_b) pairs; with `cache_dir`, loads or atomically writes `<key>.npz`."""
  tok = _configured_copy(tokenizer, max_length)
  key = hashlib.sha256(f"{tok.to_str()}\n{examples.fingerprint}\n{max_length}".encode()).hexdigest()
  cache_file = Path(cache_dir) / f"{key}.npz" if cache_dir is not None else None
  if cache_file is not None and cache_file.is_file():
    with np.load(cache_file) as z:
      return Encoded(**{k: z[k] for k in _ARRAYS}, groups=z["groups"] if "groups" in z else None,
                     fingerprint=key)
  try:
    encodings = tok.encode_batch(list(zip(examples.text_a, examples.text_b)))
  except Exception as e:  # tokenizers raises plain Exception subclasses (e.g. max_length too short).
    raise UserError(f"{examples.source}: tokenizing at max_length {max_length} failed: {e}") from e
  attention_mask = np.array([e.attention_mask for e in encodings], dtype=np.int32)
  encoded = Encoded(
      input_ids=np.array([e.ids for e in encodings], dtype=np.int32),
      token_type_ids=np.array([e.type_ids for e in encodings], dtype=np.int32),
      attention_mask=attention_mask,
      lengths=attention_mask.sum(axis=1, dtype=np.int32),
      labels=examples.labels.astype(np.int32),
      ids=examples.ids.astype(np.int64),
      groups=examples.groups,
      fingerprint=key)
  if cache_file is not None:
    _save_atomic(cache_file, encoded)
  return encoded


def _save_atomic(path: Path, encoded: Encoded):
  path.parent.mkdir(parents=True, exist_ok=True)
  arrays = {k: getattr(encoded, k) for k in _ARRAYS}
  if encoded.groups is not None:
    arrays["groups"] = encoded.groups

  def write(tmp):
    with open(tmp, "wb") as f:  # an open file: np.savez appends .npz to a bare file name
      np.savez(f, **arrays)
  paths.write_atomic(path, write)
