"""Deterministic, length-bucketed, fixed-size batches, sliced per process.

Order for (seed, epoch) when shuffling: permute rows with `np.random.default_rng([seed, epoch])`, sort each
window of WINDOW_BATCHES * batch_size rows by length (stable), cut into batches, then permute the batch
order with the same generator. Only the last window can leave one partial batch. Without shuffling,
batches follow file order. Every batch's sequence axis is padded to the smallest bucket holding its
longest row (`bucket_sizes`: buckets above max_length are dropped; max_length is always the last bucket).
`prefetch` builds batches ahead on a background thread.
"""
import queue
import threading
from typing import TYPE_CHECKING, Iterable, Iterator

import numpy as np

from mkdm_jax.data.tokenize import Encoded

if TYPE_CHECKING:
  from mkdm_jax.data.corpus import CorpusRows

WINDOW_BATCHES = 50
BUCKETS = (32, 64, 128)  # the default padded lengths of training batches (and the config's --buckets)
INFERENCE_BUCKET_STEP = 8


def num_batches(encoded: Encoded, batch_size: int, drop_remainder: bool = False) -> int:
  """Batches per epoch."""
  n = len(encoded)
  return n // batch_size if drop_remainder else -(-n // batch_size)


def batch_order(lengths: np.ndarray, batch_size: int, *, seed: int, epoch: int, shuffle: bool,
                drop_remainder: bool) -> list[np.ndarray]:
  """Row positions of every batch of the epoch (the last may be short unless drop_remainder)."""
  n = len(lengths)
  if shuffle:
    rng = np.random.default_rng([seed, epoch])
    perm = rng.permutation(n)
    window = WINDOW_BATCHES * batch_size
    rows = np.concatenate([
        part[np.argsort(lengths[part], kind="stable")]
        for part in (perm[i:i + window] for i in range(0, n, window))])
  else:
    rows = np.arange(n)
  order = [rows[i:i + batch_size] for i in range(0, n, batch_size)]
  if drop_remainder and order and len(order[-1]) < batch_size:
    order.pop()
  if shuffle:
    order = [order[i] for i in rng.permutation(len(order))]
  return order


def bucket_sizes(max_length: int, buckets=BUCKETS) -> tuple[int, ...]:
  """The padded lengths of rows of at most `max_length` tokens: the distinct `buckets` below it, sorted, then
  `max_length` itself (the one bucket rule: batches, inference and the config's buckets all use it)."""
  return tuple(sorted({b for b in buckets if b < max_length})) + (max_length,)


def inference_buckets(max_length: int) -> tuple[int, ...]:
  """Padded lengths at inference: every multiple of INFERENCE_BUCKET_STEP, then max_length. Inference sorts rows
  by length, so a fine grid pads little (training's few buckets keep its compiled shapes few); a row's logits do
  not depend on its padding (bitwise for the transformers; tests/test_inference_buckets.py), so the grid
  changes speed only."""
  return bucket_sizes(max_length, range(INFERENCE_BUCKET_STEP, max_length, INFERENCE_BUCKET_STEP))


def batches(encoded: "Encoded | CorpusRows", batch_size: int, *, seed: int, epoch: int, shuffle: bool = True,
            buckets=BUCKETS, start_batch: int = 0, process_index: int = 0, process_count: int = 1,
            drop_remainder: bool = False, extra=None) -> Iterator[dict[str, np.ndarray]]:
  """Yields this process's slice of each global batch of `batch_size` rows.

  Keys: input_ids, token_type_ids, attention_mask int32 [b, L]; labels int32 [b] (-1 none); weight
  float32 [b] (0 for padding rows); ids int64 [b] (-1 for padding rows); and each `extra` array (rows
  indexed by position in `encoded`), where b = batch_size // process_count. Padding rows repeat the
  batch's first row (so attention never sees an empty row) and carry weight 0.
  """
  if batch_size % process_count:
    raise ValueError(f"batch_size {batch_size} is not divisible by process_count {process_count}")
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} out of range for {process_count} processes")
  extra = extra or {}
  for name, array in extra.items():
    if len(array) != len(encoded):
      raise ValueError(f"extra[{name!r}] has {len(array)} rows, encoded has {len(encoded)}")
  sizes = bucket_sizes(encoded.max_length, buckets)
  local = batch_size // process_count
  lo, hi = process_index * local, (process_index + 1) * local
  order = batch_order(encoded.lengths, batch_size, seed=seed, epoch=epoch, shuffle=shuffle,
                      drop_remainder=drop_remainder)
  for rows in order[start_batch:]:
    real = len(rows)
    length = sizes[np.searchsorted(sizes, encoded.lengths[rows].max())]
    full = np.concatenate([rows, np.full(batch_size - real, rows[0])])[lo:hi]
    is_real = np.arange(lo, hi) < real
    batch = encoded.tokens(full, length)
    batch["labels"] = np.where(is_real, encoded.labels[full], -1).astype(np.int32)
    batch["weight"] = is_real.astype(np.float32)
    batch["ids"] = np.where(is_real, encoded.ids[full], -1).astype(np.int64)
    for name, array in extra.items():
      batch[name] = array[full]
    yield batch


def prefetch(items: Iterable, size: int = 2) -> Iterator:
  """Yields `items` in their order, produced up to `size` ahead on a background thread (the next host batches
  are built while the device runs the current step).

  An exception of the producer is raised here, at the item where it happened. Closing this generator (a
  `break`, an exception in the consumer, `contextlib.closing`) stops the producer and joins its thread.
  """
  ready = queue.Queue(maxsize=size)
  stop = threading.Event()

  def put(entry):
    # A timed put, so that a producer blocked on a full queue sees `stop` once the consumer has gone.
    while not stop.is_set():
      try:
        ready.put(entry, timeout=0.05)
        return True
      except queue.Full:
        pass
    return False

  def produce():
    try:
      for item in items:
        if not put(('item', item)):
          return
      put(('end', None))
    except BaseException as e:  # noqa: BLE001 - handed to the consumer, which raises it
      put(('error', e))

  thread = threading.Thread(target=produce, name='prefetch', daemon=True)
  thread.start()
  try:
    while True:
      kind, value = ready.get()
      if kind == 'end':
        return
      if kind == 'error':
        raise value
      yield value
  finally:
    stop.set()
    thread.join()
