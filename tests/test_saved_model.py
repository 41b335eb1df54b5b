"""Saved model folders (mkdm_jax/saved_model.py) are self-contained: moved, they load and predict alike."""
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkdm_jax import models, saved_model, train

TINY_BERT = models.BertConfig(num_layers=1, hidden_size=32, num_attention_heads=2, intermediate_size=64)
PAIRS = [('what is the capital of france', 'paris is the capital of france .'),
         ('who wrote hamlet', 'bananas are berries .'),
         ('how tall is mount everest', 'mount everest is 8,849 metres above sea level .')]


def encode(tokenizer_dir):
  encodings = models.load_tokenizer(tokenizer_dir).encode_batch(PAIRS)
  length = max(len(e.ids) for e in encodings)
  ids, types, mask = (np.zeros((len(PAIRS), length), np.int32) for _ in range(3))
  for k, e in enumerate(encodings):
    ids[k, :len(e.ids)], types[k, :len(e.ids)], mask[k, :len(e.ids)] = e.ids, e.type_ids, 1
  return ids, types, mask


def logits(model, params, batch):
  return np.asarray(model.apply({'params': params}, *batch)['logits'])


def save(directory, model, minilm_dir, **extra):
  batch = encode(minilm_dir)
  params = model.init(jax.random.key(0), *batch)['params']
  train.save_params(directory / 'final', params)
  saved_model.write_spec(directory, model, tokenizer_dir=minilm_dir, max_length=64, task='wikiqa',
                         label_names=['no', 'yes'], **extra)
  return logits(model, params, batch)


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_moved_folder_loads_with_its_own_tokenizer_and_same_logits(tmp_path, minilm_dir, dtype):
  model = models.Classifier(TINY_BERT, num_classes=2, dtype=dtype)
  before = save(tmp_path / 'model', model, minilm_dir, combine_weights=[1.0], threshold=0.25)
  moved = tmp_path / 'elsewhere' / 'model'
  shutil.move(tmp_path / 'model', moved)
  assert not (tmp_path / 'model').exists()

  loaded, params, spec = saved_model.load(moved)
  assert json.loads((moved / 'model.json').read_text())['tokenizer_dir'] == 'tokenizer'
  assert spec['tokenizer_dir'] == str(moved / 'tokenizer')
  assert spec['dtype'] == jnp.dtype(dtype).name and loaded.dtype == dtype
  assert spec['combine_weights'] == [1.0] and spec['threshold'] == 0.25
  batch = encode(spec['tokenizer_dir'])
  np.testing.assert_array_equal(batch[0], encode(minilm_dir)[0])
  np.testing.assert_array_equal(logits(loaded, params, batch), before)


def test_update_spec_adds_and_replaces_fields(tmp_path, minilm_dir):
  model = models.Classifier(TINY_BERT, num_classes=2)
  save(tmp_path, model, minilm_dir, threshold=0.5)
  saved_model.update_spec(tmp_path, threshold=0.3, combine_weights=[0.2, 0.8])
  spec = saved_model.read_spec(tmp_path)
  assert spec['threshold'] == 0.3 and spec['combine_weights'] == [0.2, 0.8] and spec['task'] == 'wikiqa'
  assert spec['tokenizer_dir'] == str(tmp_path / 'tokenizer')  # still stored relative
  assert sorted(p.name for p in tmp_path.iterdir()) == ['final', 'model.json', 'tokenizer']  # no temp file
  with pytest.raises(TypeError):  # an extra field must not silently replace a core one
    saved_model.write_spec(tmp_path, model, tokenizer_dir=minilm_dir, max_length=64, task='wikiqa',
                           label_names=['no', 'yes'], dtype='float16')


def test_old_spec_with_absolute_tokenizer_path_and_no_dtype(tmp_path, minilm_dir):
  save(tmp_path, models.Classifier(TINY_BERT, num_classes=2), minilm_dir)
  spec = json.loads((tmp_path / 'model.json').read_text())
  del spec['dtype']
  (tmp_path / 'model.json').write_text(json.dumps({**spec, 'tokenizer_dir': str(minilm_dir)}))
  loaded, _, spec = saved_model.load(tmp_path)
  assert spec['tokenizer_dir'] == str(minilm_dir) and loaded.dtype == jnp.float32
