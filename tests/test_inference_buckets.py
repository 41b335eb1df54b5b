"""Inference pads each length-sorted batch to a fine grid of lengths (`inference_buckets`): a transformer's logits
of a row do not depend on its padding, bitwise, so the grid changes speed only; the BiLSTM's do (in the last
bits), so it keeps the training buckets."""
import numpy as np
import pytest

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

from mkdm_jax import data, models, train
from mkdm_jax.data.batching import BUCKETS, inference_buckets
from mkdm_jax.models import factory

OPTIONS = factory.ModelOptions(random_shape=(2, 32, 2, 64), max_length=64, bilstm_hidden=16)


def test_inference_buckets_step_by_8_to_max_length():
  assert inference_buckets(64) == (8, 16, 24, 32, 40, 48, 56, 64)
  assert inference_buckets(30) == (8, 16, 24, 30)


@pytest.fixture(scope='module')
def encoded(minilm_dir):
  """200 WikiQA train rows (lengths from a few tokens up to the cap of 64)."""
  examples = data.load_split('wikiqa', 'train', None, max_rows=200)
  return data.encode(models.load_tokenizer(minilm_dir), examples, 64)


@pytest.mark.parametrize('arch', ['bert2', 'roberta2', 'mpnet2'])
def test_logits_are_bitwise_the_same_under_any_padding(arch, encoded):
  model, params = factory.student(arch, 'random', 2, 3, 0, OPTIONS)
  assert model.padding_invariant
  mesh = train.make_mesh()
  lengths = {padding: train.predict(model, params, encoded, mesh=mesh, batch_size=32, buckets=padding)
             for padding in [(64,), (32, 64), None]}  # None: inference_buckets(64)
  assert len({b for b in inference_buckets(64) if b >= encoded.lengths.min()}) > 3  # the grid is used
  for padding, out in lengths.items():
    for key in ('logits', 'head_logits'):
      np.testing.assert_array_equal(out[key], lengths[(64,)][key], err_msg=f'{arch} {key}, buckets {padding}')


def test_the_bilstm_keeps_the_training_buckets(encoded, minilm_dir):
  """Its logits move with padding, so predict's default pads it as before (BUCKETS), not to the fine grid."""
  model, params = factory.student('bilstm', minilm_dir, 2, 1, 0, OPTIONS)
  assert not model.padding_invariant
  mesh = train.make_mesh()
  default = train.predict(model, params, encoded, mesh=mesh, batch_size=32)['logits']
  np.testing.assert_array_equal(default, train.predict(model, params, encoded, mesh=mesh, batch_size=32,
                                                       buckets=BUCKETS)['logits'])
  fine = train.predict(model, params, encoded, mesh=mesh, batch_size=32, buckets=inference_buckets(64))['logits']
  assert not np.array_equal(default, fine)  # why it keeps them
