"""Layer heads (--head_layers=k, issue 31): each teacher's head has its own copy of the student's top k layers and
pooler on a shared body; k = 0 is the linear-head model."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mkdm_jax import config, models, saved_model, train
from mkdm_jax.errors import UserError
from mkdm_jax.models import factory

OPTIONS = factory.ModelOptions(random_shape=(3, 32, 2, 64), max_length=32)
INPUTS = (np.array([[101, 2054, 2003, 102, 3000, 102, 0, 0], [101, 2040, 102, 2000, 2001, 2002, 102, 0]], np.int32),)
INPUTS = INPUTS + (np.zeros_like(INPUTS[0]), (INPUTS[0] > 0).astype(np.int32))


def apply(model, params, **kwargs):
  return model.apply({'params': params}, *INPUTS, deterministic=True, **kwargs)


def test_zero_head_layers_is_the_linear_head_model():
  linear, linear_params = factory.student('bert3', 'random', 2, 3, 0, OPTIONS)
  zero, zero_params = factory.student('bert3', 'random', 2, 3, 0, OPTIONS, head_layers=0)
  assert jax.tree_util.tree_structure(zero_params) == jax.tree_util.tree_structure(linear_params)
  np.testing.assert_array_equal(apply(zero, zero_params)['logits'], apply(linear, linear_params)['logits'])


def test_each_head_has_its_own_top_layers_loaded_from_the_same_weights(minilm_dir):
  """bert2 from MiniLM-L6 with one layer head per teacher: layer_0 shared, layer_1 and the pooler copied per head
  (equal to the checkpoint's at the start, so every head starts as the linear-head model's)."""
  plain, plain_params = factory.student('bert2', minilm_dir, 2, 3, 0, factory.ModelOptions())
  model, params = factory.student('bert2', minilm_dir, 2, 3, 0, factory.ModelOptions(), head_layers=1)
  encoder = params['encoder']
  assert 'layer_0' in encoder and 'layer_1' not in encoder and 'pooler' not in encoder
  assert {f'branch{b}_{n}' for b in range(3) for n in ('layer_1', 'pooler')} <= set(encoder)
  for b in range(3):
    copies = zip(jax.tree.leaves(encoder[f'branch{b}_layer_1']), jax.tree.leaves(plain_params['encoder']['layer_1']))
    for copy, loaded in copies:
      np.testing.assert_array_equal(copy, loaded)
  np.testing.assert_allclose(apply(model, params)['head_logits'], apply(plain, plain_params)['head_logits'],
                             atol=1e-5)
  # The extra parameters: two more copies of one layer and the pooler.
  extra = models.count_params(params) - models.count_params(plain_params)
  per_copy = models.count_params(encoder['branch0_layer_1']) + models.count_params(encoder['branch0_pooler'])
  assert extra == 2 * per_copy


def test_head_t_learns_only_through_its_own_layers():
  """The gradient of head 0's logits reaches head 0's layers and the shared body, never another head's layers."""
  model, params = factory.student('bert3', 'random', 2, 3, 0, OPTIONS, head_layers=2)
  grads = jax.grad(lambda p: jnp.sum(apply(model, p)['head_logits'][:, 0] ** 2))(params)['encoder']
  norm = lambda tree: float(sum(jnp.sum(x ** 2) for x in jax.tree.leaves(tree)))
  assert norm(grads['layer_0']) > 0 and norm(grads['branch0_layer_1']) > 0 and norm(grads['branch0_pooler']) > 0
  for b in (1, 2):
    assert [norm(grads[f'branch{b}_{name}']) for name in ('layer_1', 'layer_2', 'pooler')] == [0, 0, 0]


def test_saved_layer_head_model_loads_back_and_cannot_be_exported(tmp_path, minilm_dir):
  model, params = factory.student('bert3', 'random', 2, 2, 0, OPTIONS, head_layers=1)
  saved_model.write_spec(tmp_path, model, tokenizer_dir=minilm_dir, max_length=32, task='wikiqa',
                         label_names=['no', 'yes'])
  train.save_params(tmp_path / 'final', params)
  loaded, loaded_params, spec = saved_model.load(tmp_path)
  assert spec['head_layers'] == 1 and loaded.head_layers == 1
  np.testing.assert_array_equal(apply(loaded, loaded_params)['logits'], apply(model, params)['logits'])
  with pytest.raises(UserError, match='one layer stack per head'):
    models.export_hf(tmp_path / 'hf', model, params)


def test_bad_head_layers_are_refused():
  with pytest.raises(UserError, match='needs a transformer student with more layers'):
    factory.student('bert3', 'random', 2, 3, 0, OPTIONS, head_layers=3)
  with pytest.raises(UserError, match='--head_layers=1 applies to transformer students'):
    config.validate(config.Config(workdir='w', students=('bert3', 'bilstm'), head_layers=1))
  with pytest.raises(UserError, match='no method with them'):
    config.validate(config.Config(workdir='w', students=('bert3',), methods=('kd_single',), head_layers=1))
  config.validate(config.Config(workdir='w', students=('bert3',), methods=('kd_single', 'mkdm'), head_layers=1))
