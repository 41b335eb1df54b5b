"""mkdm_jax.distill: learned head weights, the kd_ensemble target, loss settings per method, settings table."""
import dataclasses
import json

import jax
import numpy as np
import pytest

from mkdm_jax import config, distill, losses, models
from mkdm_jax.models import factory
from mkdm_jax.losses import LossConfig
from mkdm_jax.train.step import make_loss_fn

TINY = models.BertConfig(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                         attention_dropout=0.0)


def np_softmax(x, t=1.0):
  z = np.exp(x / t - (x / t).max(-1, keepdims=True))
  return z / z.sum(-1, keepdims=True)


def kl(p, q):
  return np.sum(p * (np.log(p) - np.log(q)), -1)


def init(model, seed=0):
  dummy = np.zeros((1, 8), np.int32)
  return model.init(jax.random.PRNGKey(seed), dummy, dummy, np.ones_like(dummy))['params']


def batch_of(n, length=12, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 128, (n, length)).astype(np.int32)
  return {'input_ids': ids, 'token_type_ids': np.zeros_like(ids), 'attention_mask': np.ones_like(ids),
          'labels': (ids[:, 1] > 64).astype(np.int32), 'weight': np.ones(n, np.float32)}


# Learned head combination.

def test_fit_combination_weights_prefers_the_predictive_head():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 2, 400)
  good = np.stack([np.zeros(400), 3.0 * (2 * labels - 1) + rng.normal(0, 0.5, 400)], -1)
  noise = rng.normal(0, 3.0, (400, 2))
  w = np_softmax(distill.fit_combination_weights(np.stack([good, noise], 1), labels))
  assert w[0] > 0.8, w
  same = np_softmax(distill.fit_combination_weights(np.stack([good, good], 1), labels))
  np.testing.assert_allclose(same, [0.5, 0.5], atol=1e-3)


def test_fit_combination_weights_ignores_unlabelled_rows():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 2, 200)
  heads = rng.normal(0, 2.0, (200, 2, 2))
  heads[:, 0, 1] += 3.0 * (2 * labels - 1)
  labelled = distill.fit_combination_weights(heads, labels)
  extra = rng.normal(0, 5.0, (100, 2, 2))
  mixed = distill.fit_combination_weights(np.concatenate([heads, extra]), np.concatenate([labels, -np.ones(100, int)]))
  np.testing.assert_allclose(mixed, labelled, atol=1e-5)
  assert np_softmax(labelled)[0] > 0.8


def test_learned_classifier_combines_heads_with_the_fitted_weights():
  model = models.Classifier(TINY, num_classes=2, num_heads=2, combine='learned')
  weights = np.array([2.0, -1.0], np.float32)
  params = {**init(model), 'combine_weights': weights}
  ids = batch_of(4)['input_ids']
  out = model.apply({'params': params}, ids, np.zeros_like(ids), np.ones_like(ids))
  heads = np.asarray(out['head_logits'])
  w = np_softmax(weights)
  np.testing.assert_allclose(out['logits'], w[0] * heads[:, 0] + w[1] * heads[:, 1], rtol=1e-5, atol=1e-6)
  assert np.abs(np.asarray(out['logits']) - heads.mean(1)).max() > 1e-4  # not the plain mean


# The kd_ensemble target.

Z = np.array([[[2.0, -1.0], [0.5, 0.0], [-3.0, 1.0]],
              [[0.0, 4.0], [1.0, 1.5], [2.0, -2.0]],
              [[1.0, 1.0], [-2.0, 3.0], [0.0, -0.5]],
              [[3.0, 0.0], [-1.0, -1.0], [0.5, 2.5]]], np.float32)  # [B=4, T=3, C=2]


def np_weights(kind, fixed=None):
  if kind == 'uniform':
    return np.full(Z.shape[:2], 1 / 3)
  if kind == 'fixed':
    return np.broadcast_to(np.asarray(fixed, float) / np.sum(fixed), Z.shape[:2])
  confidence = np_softmax(Z).max(-1)
  return confidence / confidence.sum(1, keepdims=True)


@pytest.mark.parametrize('t', [1.0, 2.0, 4.0])
@pytest.mark.parametrize('kind,fixed', [('uniform', None), ('fixed', (3, 1, 0)), ('confidence', None)])
def test_ensemble_target_by_hand(t, kind, fixed):
  w = np_weights(kind, fixed)
  target = np.asarray(losses.ensemble_target(Z, w.astype(np.float32), t, 'probs'))
  assert target.shape == (4, 1, 2)
  p_mix = np.einsum('bt,btc->bc', w, np_softmax(Z, t))
  np.testing.assert_allclose(np_softmax(target[:, 0], t), p_mix, rtol=1e-5, atol=1e-6)
  logits = np.asarray(losses.ensemble_target(Z, w.astype(np.float32), t, 'logits'))
  np.testing.assert_allclose(logits[:, 0], np.einsum('bt,btc->bc', w, Z), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('target', ['probs', 'logits'])
@pytest.mark.parametrize('t', [1.0, 2.0])
@pytest.mark.parametrize('kind,fixed', [('uniform', None), ('fixed', (3.0, 1.0, 0.0)), ('confidence', None)])
def test_ensemble_loss_through_the_train_step(t, kind, fixed, target):
  model = models.Classifier(TINY, num_classes=2)
  params = init(model)
  batch = {**batch_of(4), 'teacher_logits': Z}
  loss_cfg = LossConfig(teacher_mode='ensemble', alpha=1.0, temperature=t, weighting=kind, fixed_weights=fixed,
                      ensemble_target=target)
  loss, _ = make_loss_fn(model, loss_cfg)(params, batch, jax.random.PRNGKey(0), 0, ())
  s = np.asarray(model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'],
                             batch['attention_mask'], deterministic=True)['logits'], np.float64)
  w = np_weights(kind, fixed)
  if target == 'probs':
    p = np.einsum('bt,btc->bc', w, np_softmax(Z, t))
  else:
    p = np_softmax(np.einsum('bt,btc->bc', w, Z), t)
  expected = np.mean(t * t * kl(p, np_softmax(s, t)))
  np.testing.assert_allclose(float(loss), expected, rtol=1e-4)
  if target == 'probs' and t != 1.0:
    # The old target, log of the mean T=1 distribution (then divided by T in the soft loss), differs.
    old = np.log(np.einsum('bt,btc->bc', w, np_softmax(Z)))
    old_loss = np.mean(t * t * kl(np_softmax(old, t), np_softmax(s, t)))
    assert abs(old_loss - expected) > 1e-3 * max(expected, 1e-3), (old_loss, expected)


# loss_config per method.

CFG = config.Config(workdir='w', alpha=0.3, temperature=3.0, soft_loss='ce', teacher_weighting='confidence',
                      ensemble_target='logits', hidden_weight=0.5)


def test_loss_config_student_scratch_has_no_teacher_and_no_aux_terms():
  loss_cfg = distill.loss_config('student_scratch', CFG)
  assert loss_cfg.teacher_mode == 'none' and loss_cfg.aux_weights == ()


def test_loss_config_kd_single_is_uniform_whatever_the_weighting():
  for cfg in (CFG, dataclasses.replace(CFG, teacher_weighting='fixed', teacher_weights=(1.0, 2.0, 3.0))):
    loss_cfg = distill.loss_config('kd_single', cfg)
    assert (loss_cfg.teacher_mode, loss_cfg.weighting, loss_cfg.fixed_weights) == ('per_head', 'uniform', None)


def test_loss_config_kd_ensemble_carries_weighting_and_target():
  loss_cfg = distill.loss_config('kd_ensemble', CFG)
  assert (loss_cfg.teacher_mode, loss_cfg.weighting, loss_cfg.ensemble_target) == ('ensemble', 'confidence', 'logits')
  assert (loss_cfg.alpha, loss_cfg.temperature, loss_cfg.soft) == (0.3, 3.0, 'ce')
  fixed = dataclasses.replace(CFG, teacher_weighting='fixed', teacher_weights=(3.0, 1.0, 0.0))
  loss_cfg = distill.loss_config('kd_ensemble', fixed)
  assert (loss_cfg.weighting, loss_cfg.fixed_weights) == ('fixed', (3.0, 1.0, 0.0))


@pytest.mark.parametrize('method', ['mkdm', 'tmkd'])
def test_loss_config_mkdm_and_tmkd_weight_each_head(method):
  loss_cfg = distill.loss_config(method, CFG)
  assert (loss_cfg.teacher_mode, loss_cfg.weighting, loss_cfg.fixed_weights) == ('per_head', 'confidence', None)
  fixed = dataclasses.replace(CFG, teacher_weighting='fixed', teacher_weights=(3.0, 1.0, 0.0))
  assert distill.loss_config(method, fixed).fixed_weights == (3.0, 1.0, 0.0)


@pytest.mark.parametrize('method', list(distill.METHODS))
def test_loss_config_aux_terms_only_when_weighted_and_with_teachers(method):
  with_hidden = distill.loss_config(method, CFG).aux_weights
  assert with_hidden == (() if method == 'student_scratch' else (('hidden', 0.5),))
  assert distill.loss_config(method, dataclasses.replace(CFG, hidden_weight=0.0)).aux_weights == ()


@pytest.mark.parametrize('method,heads,indices', [
    ('student_scratch', 1, []), ('kd_single', 1, [2]), ('kd_ensemble', 1, [0, 1, 2]),
    ('mkdm', 3, [0, 1, 2]), ('tmkd', 3, [0, 1, 2]), ('tmkd_stage1', 3, [0, 1, 2]),
    ('tkd', 1, [2]), ('tkd_stage1', 1, [2]), ('tkd_ensemble', 1, [0, 1, 2]), ('tkd_ensemble_stage1', 1, [0, 1, 2])])
def test_num_heads_and_teacher_indices(method, heads, indices):
  assert distill.num_heads(method, 3) == heads
  assert distill.teacher_indices(method, 3, best=2) == indices


def test_tkd_targets_are_kd_singles_and_tkd_ensembles_are_kd_ensembles():
  """TMKD's single-teacher control: both stages learn the best dev teacher's soft labels with one head (the
  kd_single target); tkd_ensemble's both stages learn the averaged ensemble target."""
  for run in ('tkd', 'tkd_stage1'):
    assert distill.loss_config(run, CFG) == distill.loss_config('kd_single', CFG)
  for run in ('tkd_ensemble', 'tkd_ensemble_stage1'):
    assert distill.loss_config(run, CFG) == distill.loss_config('kd_ensemble', CFG)
  assert distill.runs_of(['kd_single', 'tkd', 'tmkd']) == ['kd_single', 'tkd_stage1', 'tkd', 'tmkd_stage1', 'tmkd']


def test_default_methods_are_the_rows_marked_default():
  assert distill.DEFAULT_METHODS == ('student_scratch', 'kd_single', 'kd_ensemble', 'mkdm', 'tmkd')
  assert config.Config().methods == distill.DEFAULT_METHODS


def test_a_new_row_is_enough_for_a_method(monkeypatch):
  """Adding a method is one row: its runs, settings and checks derive from the row's fields."""
  row = distill.Method('all', 'ensemble', 'per_teacher', pretrain=True)
  monkeypatch.setitem(distill.METHODS, 'new_method', row)
  cfg = dataclasses.replace(CFG, methods=('new_method',))
  assert distill.runs_of(cfg.methods) == ['new_method_stage1', 'new_method']
  stage1 = distill.student_settings(cfg, 'bert3', 'new_method_stage1')
  second = distill.student_settings(cfg, 'bert3', 'new_method')
  for name in ('unlabelled_extra', 'ensemble_target', 'teacher_weighting', 'head_combine', 'alpha'):
    assert name in stage1 and name in second, name
  assert 'student_epochs' in second and 'student_epochs' not in stage1
  assert distill.num_heads('new_method_stage1', 3) == 3


# The settings table.

def test_every_config_field_has_a_setting_and_back():
  fields = {f.name for f in dataclasses.fields(config.Config)}
  assert fields == set(distill.SETTINGS)
  assert all(s.scope in distill.SCOPES for s in distill.SETTINGS.values())
  for name in losses.AUX_TERMS:
    assert f'{name}_weight' in fields


def test_teacher_settings_resolve_per_teacher_lists():
  cfg = config.Config(workdir='w', teacher_checkpoints=('random',), teacher_learning_rates=(1e-5, 2e-5, 3e-5))
  settings = distill.teacher_settings(cfg, 1)
  assert (settings['teacher_checkpoints'], settings['teacher_learning_rates'], settings['teacher_seeds']) == (
      'random', 2e-5, 1)
  seeded = dataclasses.replace(cfg, teacher_seeds=(7, 8, 9))
  assert distill.teacher_settings(seeded, 2)['teacher_seeds'] == 9
  for name in ('max_length', 'data_seed', 'teacher_epochs', 'batch_size'):
    assert name in settings
  for name in ('alpha', 'progress', 'num_teachers', 'student_seed', 'eval_split', 'workdir', 'methods'):
    assert name not in settings
  # Recorded as JSON and read back, the settings compare equal (tuples are stored as lists).
  assert distill.changed_settings(json.loads(json.dumps(settings)), settings) == []


def test_student_settings_apply_to_their_method_and_architecture():
  cfg = config.Config(workdir='w')
  bert = distill.student_settings(cfg, 'bert3', 'mkdm')
  assert (bert['arch'], bert['method']) == ('bert3', 'mkdm')
  for name in ('alpha', 'temperature', 'student_learning_rate', 'teacher_weighting', 'num_teachers',
               'head_combine', 'max_length', 'student_seed'):
    assert name in bert, name
  for name in ('bilstm_learning_rate', 'bilstm_hidden', 'unlabelled_extra', 'ensemble_target', 'teacher_epochs',
               'eval_split', 'progress'):
    assert name not in bert, name
  scratch = distill.student_settings(cfg, 'bilstm', 'student_scratch')
  assert 'bilstm_learning_rate' in scratch and 'bilstm_hidden' in scratch
  for name in ('alpha', 'temperature', 'student_learning_rate', 'num_teachers', 'teacher_weighting'):
    assert name not in scratch, name
  assert 'ensemble_target' in distill.student_settings(cfg, 'bert3', 'kd_ensemble')
  assert 'unlabelled_extra' in distill.student_settings(cfg, 'bert3', distill.stage1_run('tmkd'))


def test_stage1_settings_record_head_combine():
  """TMKD stage 1 is built with --head_combine (learned adds a 'combine_weights' param) and tmkd starts from
  its params, so a stage-1 run saved under the other value cannot be reused (the setting applies to every run of
  a multi-head method: both stages)."""
  options = factory.ModelOptions()
  _, mean = factory.student('bert1', 'random', 2, 3, 0, options, combine='mean')
  _, learned = factory.student('bert1', 'random', 2, 3, 0, options, combine='learned')
  assert set(learned) - set(mean) == {'combine_weights'}  # stage 1's saved params depend on the setting
  cfg = config.Config(workdir='w', methods=('tmkd',))
  stage1 = lambda combine: distill.student_settings(dataclasses.replace(cfg, head_combine=combine), 'bert1',
                                                    distill.stage1_run('tmkd'))
  assert distill.changed_settings(stage1('mean'), stage1('learned')) == ["head_combine: 'mean' -> 'learned'"]


@pytest.mark.parametrize('name,changes', [
    ('teacher_epochs', True), ('max_length', True), ('data_seed', True), ('teacher_learning_rates', True),
    ('alpha', False), ('num_teachers', False), ('student_seed', False), ('eval_split', False),
    ('malloc', False)])
def test_changes_teachers(name, changes):
  assert distill.changes_teachers(name) is changes


def test_changed_settings_lists_exactly_the_differing_keys():
  recorded = {'alpha': 0.5, 'buckets': [32, 64], 'same': 'x', 'gone': 1}
  current = {'alpha': 0.7, 'buckets': [32, 64], 'same': 'x', 'new': 2}
  changed = distill.changed_settings(recorded, current)
  assert [line.split(':')[0] for line in changed] == ['alpha', 'gone', 'new']
  assert changed[0] == 'alpha: 0.5 -> 0.7'
  assert distill.changed_settings(recorded, dict(recorded)) == []
