"""Speed of one fine-tuning step of a BERT-base-shaped sequence classifier (AdamW, cross-entropy), in bf16.

  python benchmarks/gpu_step.py --out=runs/bench/gpu_step.json

Random weights (no download). The model, optimiser, train step and sharding are the pipeline's own
(models.factory, and train.compile_train_step: the recipe train.loop.fit builds its step with). Prints and
writes JSON: device kind, versions, examples/s, median step time, model FLOPs per step, achieved TFLOP/s
and MFU against the device's peak (null on CPU and on devices without a peak below). Run on a GPU by
benchmarks/device_check.sh; --layers/--hidden/--heads/--intermediate shrink the model for a CPU smoke test.
"""
import datetime
import json
import pathlib
import sys
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
import numpy as np
from absl import flags

from mkdm_jax import losses, provenance
from mkdm_jax.models import factory
from mkdm_jax.train import compile_train_step, sharding

FLAGS = flags.FLAGS
flags.DEFINE_integer('batch_size', 32, 'Examples per step (split over all devices).')
flags.DEFINE_integer('length', 128, 'Sequence length (every token real: no padding).')
flags.DEFINE_integer('steps', 20, 'Timed steps.')
flags.DEFINE_integer('warmup', 3, 'Untimed steps first (the first one compiles).')
flags.DEFINE_enum('precision', 'bf16', ['bf16', 'fp32'], 'Compute dtype (params and AdamW state stay fp32).')
flags.DEFINE_integer('layers', 12, 'Encoder layers.')
flags.DEFINE_integer('hidden', 768, 'Hidden size.')
flags.DEFINE_integer('heads', 12, 'Attention heads.')
flags.DEFINE_integer('intermediate', 3072, 'Feed-forward size.')
flags.DEFINE_string('out', None, 'Where to write the results JSON (also printed).')

NUM_CLASSES = 2
# Dense peak TFLOP/s per (device kind substring, precision); the first match counts. fp32 is the non-tensor-core
# peak: JAX's default matmul precision may run fp32 dots as TF32 on these GPUs, so fp32 MFU can exceed 1.
PEAK_TFLOPS = ((('H100 PCIe', 'bf16'), 756.0), (('H100 PCIe', 'fp32'), 51.0),
               (('H100', 'bf16'), 989.0), (('H100', 'fp32'), 67.0),
               (('H200', 'bf16'), 989.0), (('H200', 'fp32'), 67.0))


def train_flops(layers, hidden, intermediate, batch, length):
  """Model FLOPs of one train step (forward + backward = 3 x forward; 2 FLOPs per multiply-add).

  6 * P * tokens + 12 * layers * batch * length^2 * hidden + 6 * batch * hidden^2, where
  P = layers * (4 * hidden^2 + 2 * hidden * intermediate) are the encoder's matmul weights (Q, K, V, attention
  output, feed-forward in and out) used once per token, the second term is attention (QK^T and the
  probabilities times V: 4 * length^2 * hidden per layer and example in the forward pass) and the third the
  pooler (one token per example). Embeddings, norms, softmax and the 2-class head are left out, as in
  benchmarks/speed.py's model_flops (this is 3 x its forward FLOPs).
  """
  matmul_params = layers * (4 * hidden * hidden + 2 * hidden * intermediate)
  attention = layers * 4 * length * length * hidden
  pooler = 2 * hidden * hidden
  return 6 * matmul_params * batch * length + 3 * batch * (attention + pooler)


def peak_tflops(device, precision):
  """The peak of `PEAK_TFLOPS` for a GPU of this kind and precision, else None (CPU, unknown GPUs)."""
  if device.platform != 'gpu':
    return None
  return next((tflops for (kind, prec), tflops in PEAK_TFLOPS
               if kind in device.device_kind and prec == precision), None)


def random_batch(batch_size, length, vocab_size, seed=0):
  """A train-step batch of random token ids and labels, every token real."""
  rng = np.random.default_rng(seed)
  shape = (batch_size, length)
  return {'input_ids': rng.integers(0, vocab_size, shape, dtype=np.int32),
          'token_type_ids': np.zeros(shape, np.int32), 'attention_mask': np.ones(shape, np.int32),
          'labels': rng.integers(0, NUM_CLASSES, batch_size, dtype=np.int32),
          'weight': np.ones(batch_size, np.float32)}


def build_step(options):
  """(jitted donating train step, initial sharded state, mesh, encoder config): train.compile_train_step, the
  recipe train.fit uses."""
  model, params = factory.teacher('random', NUM_CLASSES, 0, options)
  mesh = sharding.make_mesh()
  compiled = compile_train_step(model, params, losses.LossConfig(), mesh=mesh, rng=jax.random.PRNGKey(0),
                                learning_rate=5e-5, total_steps=1000, warmup_steps=100)
  return compiled.step, compiled.init(), mesh, model.encoder


def measure():
  """Runs the benchmark under FLAGS; returns the result dict."""
  options = factory.ModelOptions(dtype='bfloat16' if FLAGS.precision == 'bf16' else 'float32',
                                 random_shape=(FLAGS.layers, FLAGS.hidden, FLAGS.heads, FLAGS.intermediate),
                                 max_length=FLAGS.length)
  train_step, state, mesh, config = build_step(options)
  batch = sharding.put_batch(mesh, random_batch(FLAGS.batch_size, FLAGS.length, config.vocab_size))
  times, losses = [], []
  for i in range(FLAGS.warmup + FLAGS.steps):
    start = time.perf_counter()
    state, measurements = jax.block_until_ready(train_step(state, batch))
    times.append(time.perf_counter() - start)
    losses.append(float(measurements['loss']))
  if not np.all(np.isfinite(losses)):
    raise RuntimeError(f'non-finite loss: {losses}')
  step_s = float(np.median(times[FLAGS.warmup:]))
  flops = train_flops(config.num_layers, config.hidden_size, config.intermediate_size, FLAGS.batch_size,
                      FLAGS.length)
  device = jax.devices()[0]
  peak = peak_tflops(device, FLAGS.precision)
  achieved = flops / step_s / 1e12
  return {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'command': ' '.join(sys.argv), 'device_kind': device.device_kind, 'platform': device.platform,
      'device_count': jax.device_count(), 'jax_version': jax.__version__, 'machine': provenance.record(),
      'precision': FLAGS.precision, 'batch_size': FLAGS.batch_size, 'length': FLAGS.length,
      'model': {'layers': config.num_layers, 'hidden': config.hidden_size, 'heads': config.num_attention_heads,
                'intermediate': config.intermediate_size, 'vocab': config.vocab_size,
                'params': int(sum(x.size for x in jax.tree.leaves(state.params)))},
      'warmup': FLAGS.warmup, 'steps': FLAGS.steps, 'first_step_s': times[0], 'step_time_median_s': step_s,
      'step_times_s': times[FLAGS.warmup:], 'examples_per_s': FLAGS.batch_size / step_s,
      'model_flops_per_step': flops, 'achieved_tflops': achieved, 'peak_tflops': peak,
      'mfu': achieved / peak if peak else None, 'losses': losses}


def main(argv):
  del argv
  result = measure()
  text = json.dumps(result, indent=1)
  print(text, flush=True)
  if FLAGS.out:
    out = pathlib.Path(FLAGS.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + '\n')


if __name__ == '__main__':
  cli.main(main)
