"""Inference beside the training loop: batched `predict` of a classifier over encoded rows (any mesh), and task `scores` of its output."""
import contextlib
import functools

import jax
import numpy as np
from tqdm import tqdm

from mkdm_jax import metrics as metrics_lib
from mkdm_jax.data.batching import BUCKETS, batches, inference_buckets, num_batches, prefetch
from mkdm_jax.train import sharding
from mkdm_jax.train.preemption import Preempted, preempted, sigterm_guard
from mkdm_jax.train.step import make_eval_step

# Host-only batch fields that the jitted steps never read.
HOST_ONLY_KEYS = ('ids',)


@functools.lru_cache(maxsize=None)
def _jitted_eval(model):
  return jax.jit(make_eval_step(model))


def predict(model, params, data, *, mesh, batch_size=128, buckets=None, desc=None):
  """Logits of every row of `data` in row order: {'logits': [N, C], 'head_logits': [N, H, C]}.

  buckets: padded lengths (default: `inference_buckets`, the data's max_length in steps of 8, for a model whose
  logits do not depend on padding; else the training default BUCKETS).

  On a global mesh every process passes the same `data` and feeds its slice of each batch; on a
  `sharding.local_mesh()` each process predicts its own `data` alone.
  """
  eval_step = _jitted_eval(model)
  out = {}
  total = num_batches(data, batch_size)
  # Row order is free at inference: sorting by length puts similar lengths together, so most
  # batches fit a small bucket (file order mixes short and long rows in every batch).
  order = np.argsort(data.lengths, kind='stable')
  process_index, process_count = (0, 1) if sharding.is_local(mesh) else (jax.process_index(), jax.process_count())
  # Built on a background thread while the device runs the previous batch.
  buckets = buckets or (inference_buckets(data.max_length) if model.padding_invariant else BUCKETS)
  stream = prefetch(batches(data.select(order), batch_size, seed=0, epoch=0, shuffle=False, buckets=buckets,
                            process_index=process_index, process_count=process_count,
                            extra={'position': order.astype(np.int32)}))
  with sigterm_guard() as outermost, contextlib.closing(stream):
    for batch in tqdm(stream, total=total, desc=desc, disable=desc is None or jax.process_index() != 0, leave=False):
      if outermost and preempted():
        raise Preempted()
      for key in HOST_ONLY_KEYS:
        batch.pop(key, None)
      device_batch = sharding.put_batch(mesh, batch)
      result = eval_step(params, device_batch)
      rows = sharding.to_host(device_batch['position'])
      keep = sharding.to_host(device_batch['weight']) > 0
      for name, value in result.items():
        value = sharding.to_host(value)
        if name not in out:
          out[name] = np.zeros((len(data),) + value.shape[1:], np.float32)
        out[name][rows[keep]] = value[keep]
  return out


def softmax(logits):
  z = np.exp(logits - logits.max(axis=-1, keepdims=True))
  return z / z.sum(axis=-1, keepdims=True)


def scores(out, data, metric_names, threshold=None):
  """Task metrics of `predict`'s output on `data` (anything with labels and groups): the combined
  prediction and, with several heads, each head ('head{i}/...'); with a (dev-tuned) `threshold` also
  accuracy and F1 at it (see metrics.compute)."""
  result = metrics_lib.compute(metric_names, data.labels, softmax(out['logits']), data.groups, threshold=threshold)
  heads = out['head_logits'].shape[1]
  for h in range(heads if heads > 1 else 0):
    head = metrics_lib.compute(metric_names, data.labels, softmax(out['head_logits'][:, h]), data.groups,
                               threshold=threshold)
    result.update({f'head{h}/{k}': v for k, v in head.items()})
  return result


def evaluate(model, params, data, metric_names, *, mesh, batch_size=128, threshold=None):
  """`scores` of the model's predictions on encoded `data`."""
  out = predict(model, params, data, mesh=mesh, batch_size=batch_size)
  return scores(out, data, metric_names, threshold)
