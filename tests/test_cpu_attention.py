"""Tests for the fused CPU attention kernel (mkdm_jax/models/cpu_attention.*) and its use in BERT and MPNet.

The kernel must build on the CI machine (it has g++): an unavailable kernel fails these tests.
"""
import logging

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkdm_jax.models import BertConfig, Classifier, MPNetEncoder, cpu_attention, factory

# The bound stated with COMPILE_FLAGS in cpu_attention.py (measured at most 2.6e-6 with -ffast-math).
MAX_ABS_ERROR = 5e-6
TINY_BERT = BertConfig(vocab_size=120, hidden_size=32, num_layers=2, num_attention_heads=2,
                       intermediate_size=32, max_position_embeddings=64)


def inputs(seed, batch, length, heads, dim, lengths=None):
  rng = np.random.default_rng(seed)
  q, k, v = (jnp.asarray(rng.normal(size=(batch, length, heads, dim)).astype(np.float32)) for _ in range(3))
  if lengths is None:
    lengths = rng.integers(1, length + 1, batch)
  keep = (np.arange(length)[None] < np.asarray(lengths)[:, None]).astype(np.float32)
  return q, k, v, keep


def random_bias(seed, heads, length, scale=2.0):
  """A score bias [heads, L, L] of MPNet's kind (one per head and query-key pair), larger than MPNet's."""
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, (heads, length, length)).astype(np.float32))


@pytest.mark.parametrize('biased', [False, True], ids=['plain', 'bias'])
@pytest.mark.parametrize('q_scale', [1.0, 4.0])
@pytest.mark.parametrize('batch,length,heads,dim', [(3, 37, 2, 8), (16, 128, 12, 32), (2, 20, 1, 64),
                                                    (1, 1, 3, 16), (4, 50, 12, 64)])
def test_kernel_matches_reference(batch, length, heads, dim, q_scale, biased):
  assert cpu_attention.available()
  q, k, v, keep = inputs(batch * length, batch, length, heads, dim)
  q = q * q_scale  # sharper softmax rows
  keep[0, length // 2] = 0.0  # a hole inside the kept keys (the kernel gathers their bias)
  if batch > 1:
    keep[1] = 0.0  # a row without keys: zero context
  bias = random_bias(length, heads, length) if biased else None
  out = jax.jit(cpu_attention.attention)(q, k, v, keep, bias)
  ref = cpu_attention.reference(q, k, v, keep, bias)
  assert np.abs(np.asarray(out - ref)).max() <= MAX_ABS_ERROR
  if batch > 1:
    assert not np.asarray(out[1]).any()


def test_reference_is_softmax_attention():
  """The reference itself against a plain numpy softmax (no mask tricks), without and with a bias."""
  q, k, v, keep = inputs(1, 2, 9, 2, 8, lengths=[9, 6])
  q, k, v = map(np.asarray, (q, k, v))
  for bias in (None, random_bias(1, 2, 9)):
    for b, n in enumerate((9, 6)):
      for h in range(2):
        s = q[b, :, h] @ k[b, :n, h].T + (0 if bias is None else np.asarray(bias)[h, :, :n])
        p = np.exp(s - s.max(-1, keepdims=True))
        want = (p / p.sum(-1, keepdims=True)) @ v[b, :n, h]
        np.testing.assert_allclose(cpu_attention.reference(q, k, v, keep, bias)[b, :, h], want, rtol=1e-5,
                                   atol=1e-6)


@pytest.mark.parametrize('biased', [False, True], ids=['plain', 'bias'])
def test_gradient_and_vmap(biased):
  q, k, v, keep = inputs(2, 2, 12, 2, 8)
  args = (q, k, v, random_bias(2, 2, 12)) if biased else (q, k, v)
  loss = lambda f: (lambda q, k, v, *bias: (f(q, k, v, keep, *bias) ** 2).sum())
  argnums = tuple(range(len(args)))
  got = jax.grad(loss(cpu_attention.attention), argnums)(*args)
  want = jax.grad(loss(cpu_attention.reference), argnums)(*args)
  for g, w in zip(got, want, strict=True):
    np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-5)
  stacked = [jnp.stack([t, t[::-1]]) for t in (q, k, v, jnp.asarray(keep))]
  in_axes = (0, 0, 0, 0, None)[:len(args) + 1]  # the bias is shared, not mapped
  np.testing.assert_allclose(jax.vmap(cpu_attention.attention, in_axes)(*stacked, *args[3:]),
                             jax.vmap(cpu_attention.reference, in_axes)(*stacked, *args[3:]), rtol=1e-5,
                             atol=1e-5)


def encoder_batch(seed):
  rng = np.random.default_rng(seed)
  ids = rng.integers(1, 120, (4, 40)).astype(np.int32)
  mask = (np.arange(40)[None] < np.array([40, 23, 7, 31])[:, None]).astype(np.int32)
  return ids, np.zeros_like(ids), mask


def test_bert_inference_uses_kernel_and_matches_einsum_path(monkeypatch):
  model = Classifier(TINY_BERT, num_classes=2)
  batch = encoder_batch(0)
  params = model.init(jax.random.key(0), *batch)['params']
  forward = lambda p, *b: model.apply({'params': p}, *b)['logits']
  kernel_hlo = jax.jit(forward).lower(params, *batch).as_text()
  assert cpu_attention.TARGET in kernel_hlo
  with_kernel = jax.jit(forward)(params, *batch)
  monkeypatch.setattr(cpu_attention, 'available', lambda: False)
  retraced = jax.jit(lambda *a: forward(*a))  # a new function: jit would reuse the first trace
  assert cpu_attention.TARGET not in retraced.lower(params, *batch).as_text()
  np.testing.assert_allclose(with_kernel, retraced(params, *batch), rtol=1e-5, atol=1e-5)


def test_mpnet_base_inference_uses_kernel_and_matches_einsum_path(monkeypatch):
  """The real MPNet-base (relative-position bias on every layer): kernel and einsum path agree."""
  model, params = factory.teacher('mpnet-base', 2, 0, factory.ModelOptions())
  encoder = MPNetEncoder(model.encoder)
  rng = np.random.default_rng(0)
  mask = (np.arange(24)[None] < np.array([24, 17, 9])[:, None]).astype(np.int32)
  ids = np.where(mask, rng.integers(5, model.encoder.vocab_size, mask.shape), 1).astype(np.int32)
  batch = (ids, np.zeros_like(ids), mask)
  forward = lambda p, *b: encoder.apply({'params': p}, *b)
  assert cpu_attention.BIAS_TARGET in jax.jit(forward).lower(params['encoder'], *batch).as_text()
  with_kernel = jax.jit(forward)(params['encoder'], *batch)
  monkeypatch.setattr(cpu_attention, 'available', lambda: False)
  retraced = jax.jit(lambda *a: forward(*a))
  assert cpu_attention.TARGET not in retraced.lower(params['encoder'], *batch).as_text()
  einsum = retraced(params['encoder'], *batch)
  for key in ('sequence', 'pooled'):
    assert np.abs(np.asarray(with_kernel[key]) - np.asarray(einsum[key])).max() <= 1e-5, key


def test_training_forward_does_not_use_kernel():
  model = Classifier(TINY_BERT, num_classes=2)
  batch = encoder_batch(1)
  params = model.init(jax.random.key(0), *batch)['params']
  train = lambda p, *b: model.apply({'params': p}, *b, deterministic=False,
                                    rngs={'dropout': jax.random.key(1)})['logits']
  assert cpu_attention.TARGET not in jax.jit(train).lower(params, *batch).as_text()


def test_loading_keeps_subnormals():
  """Fast math stays inside the kernel: loading it must not turn on flush-to-zero for the process
  (linking with -ffast-math did, through crtfastmath.o; hypothesis caught it in test_data)."""
  tiny = np.array([1e-40], np.float32)
  assert cpu_attention.available()
  assert (tiny * np.float32(1.0))[0] > 0


def test_build_is_cached(tmp_path, monkeypatch):
  monkeypatch.setenv('MKDM_CACHE_DIR', str(tmp_path))
  first = cpu_attention.build()
  stamp = first.stat().st_mtime_ns
  assert cpu_attention.build() == first and first.stat().st_mtime_ns == stamp
  assert [p.name for p in tmp_path.iterdir()] == [first.name]  # no temp file left behind


def test_missing_or_failing_compiler(tmp_path, monkeypatch, caplog):
  monkeypatch.setenv('MKDM_CACHE_DIR', str(tmp_path))
  with pytest.raises(OSError, match=r"no C\+\+ compiler 'no-such-cxx'.*\$CXX"):
    cpu_attention.build('no-such-cxx')
  with pytest.raises(OSError, match='false .* failed'):
    cpu_attention.build('false')
  assert not list(tmp_path.iterdir())
  monkeypatch.setenv('CXX', 'no-such-cxx')
  cpu_attention.available.cache_clear()
  try:
    with caplog.at_level(logging.WARNING):
      assert not cpu_attention.available()
    assert 'using the einsum path' in caplog.text and 'no-such-cxx' in caplog.text
    monkeypatch.setenv('MKDM_CPU_ATTENTION', '0')
    monkeypatch.delenv('CXX')
    cpu_attention.available.cache_clear()
    assert not cpu_attention.available()
  finally:
    monkeypatch.undo()
    cpu_attention.available.cache_clear()
  assert cpu_attention.available()
