"""Engine tests: learning, gradient accumulation, sharding equivalence, kill-and-resume."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from mkdm_jax import losses, models, train
from mkdm_jax.train.optim import decay_mask, layerwise_scales, make_optimizer
from mkdm_jax.losses import LossConfig
from mkdm_jax.train.step import init_state, make_train_step

HARNESS = Path(__file__).with_name('train_harness.py')
TINY = models.BertConfig(vocab_size=128, hidden_size=32, num_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=32, hidden_dropout=0.0,
                         attention_dropout=0.0)


def synthetic_batch(n, length=16, seed=0):
  rng = np.random.default_rng(seed)
  ids = rng.integers(5, 128, (n, length)).astype(np.int32)
  return {'input_ids': ids, 'token_type_ids': np.zeros_like(ids),
          'attention_mask': np.ones_like(ids), 'labels': (ids[:, 1] > 64).astype(np.int32),
          'weight': np.ones(n, np.float32)}


def test_tiny_model_overfits_64_examples():
  model = models.Classifier(TINY, num_classes=2)
  optimizer, schedule = make_optimizer(None, learning_rate=1e-3, total_steps=300, decay='constant',
                                       weight_decay=0.0)
  state = init_state(model, optimizer, jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(model, optimizer, schedule, LossConfig()), donate_argnums=(0,))
  batch = synthetic_batch(64)
  for i in range(300):
    state, m = step(state, batch)
    if float(m['accuracy']) == 1.0 and float(m['loss']) < 0.05:
      break
  assert float(m['accuracy']) == 1.0, f'accuracy {float(m["accuracy"])} after {i + 1} steps'


def test_gradient_accumulation_equals_large_batch():
  model = models.Classifier(TINY, num_classes=2, num_heads=2)
  batch = synthetic_batch(16)
  batch['teacher_logits'] = np.random.default_rng(1).normal(size=(16, 2, 2)).astype(np.float32)
  config = LossConfig(teacher_mode='per_head', temperature=2.0)
  results = []
  for accumulate, micro in ((1, 16), (4, 4)):
    optimizer, schedule = make_optimizer(None, learning_rate=1e-3, total_steps=10, accumulate=accumulate)
    state = init_state(model, optimizer, jax.random.PRNGKey(0))
    step = jax.jit(make_train_step(model, optimizer, schedule, config, accumulate=accumulate))
    for i in range(0, 16, micro):
      state, _ = step(state, {k: v[i:i + micro] for k, v in batch.items()})
    results.append(state.params)
  changed = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), results[0],
                         init_state(model, make_optimizer(None, learning_rate=1e-3, total_steps=10)[0],
                                    jax.random.PRNGKey(0)).params)
  assert max(jax.tree.leaves(changed)) > 1e-4  # the update really happened
  diffs = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), *results)
  assert max(jax.tree.leaves(diffs)) < 1e-5


def test_weight_decay_mask_and_layer_decay():
  model = models.Classifier(TINY, num_classes=2)
  params = model.init(jax.random.PRNGKey(0), *[jnp.ones((1, 4), jnp.int32)] * 3)['params']
  mask = decay_mask(params)
  flat = {'/'.join(str(k.key) for k in p): v for p, v in jax.tree_util.tree_leaves_with_path(mask)}
  assert any(v for v in flat.values()) and not all(flat.values())
  for name, decays in flat.items():
    if name.endswith('bias') or 'LayerNorm' in name or name.endswith('scale'):
      assert not decays, name
  scales = {'/'.join(str(k.key) for k in p): v
            for p, v in jax.tree_util.tree_leaves_with_path(layerwise_scales(params, 0.5))}
  top = [v for k, v in scales.items() if 'layer_1' in k]
  bottom = [v for k, v in scales.items() if 'layer_0' in k]
  emb = [v for k, v in scales.items() if 'embeddings' in k]
  assert set(top) == {0.5} and set(bottom) == {0.25} and set(emb) == {0.125}


def test_loss_config_rejects_bad_values():
  with pytest.raises(ValueError, match='alpha'):
    LossConfig(alpha=1.5)
  with pytest.raises(ValueError, match='teacher_mode'):
    LossConfig(teacher_mode='bogus')


def run_harness(tmp_path, name, **flags):
  out = tmp_path / f'{name}.npz'
  cmd = [sys.executable, str(HARNESS), f'--workdir={tmp_path / name}', f'--out={out}']
  cmd += [f'--{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  return proc, out


def assert_same_params(a, b, atol):
  a, b = np.load(a), np.load(b)
  assert sorted(a.files) == sorted(b.files)
  worst = max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)
  assert worst <= atol, f'max abs param difference {worst}'


@pytest.mark.slow
def test_sharded_training_matches_single_device(tmp_path):
  """The same 5 steps on 1 device, 8 simulated devices (data parallel) and 4x2 data x fsdp."""
  runs = {}
  for name, flags in {'one': dict(devices=1), 'dp8': dict(devices=8),
                      'fsdp': dict(devices=8, fsdp=2)}.items():
    proc, runs[name] = run_harness(tmp_path, name, steps=5, dropout=0.0, **flags)
    assert proc.returncode == 0, proc.stderr[-3000:]
  assert_same_params(runs['one'], runs['dp8'], 1e-5)
  assert_same_params(runs['one'], runs['fsdp'], 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize('family', ['bert', 'mpnet'])
def test_killed_run_resumes_to_identical_params(tmp_path, family):
  """2N steps straight == N steps, SIGKILL, rerun (with dropout, so the RNG must resume too), for both families."""
  proc, straight = run_harness(tmp_path, 'straight', steps=12, family=family)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc, _ = run_harness(tmp_path, 'resumed', steps=12, kill_after=7, family=family)
  assert proc.returncode == -9, f'expected SIGKILL, got {proc.returncode}: {proc.stderr[-2000:]}'
  ckpts = sorted(int(p.name) for p in (tmp_path / 'resumed' / 'ckpt').iterdir() if p.name.isdigit())
  assert ckpts and max(ckpts) < 12, ckpts
  proc, resumed = run_harness(tmp_path, 'resumed', steps=12, family=family)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'resuming' in proc.stderr
  assert_same_params(straight, resumed, 0.0)
  last = lambda name: [json.loads(l) for l in (tmp_path / name / 'metrics.jsonl').read_text().splitlines()][-1]
  assert last('straight')['loss'] == last('resumed')['loss']


@pytest.mark.parametrize('decay', ['linear', 'cosine', 'constant'])
def test_learning_rate_schedules(decay):
  from mkdm_jax.train.optim import learning_rate_schedule
  for warmup in (0, 2):
    s = learning_rate_schedule(1.0, 10, warmup, decay)
    assert float(s(warmup)) == pytest.approx(1.0)  # the peak right after warmup, also with none
    assert float(s(0)) == pytest.approx(1.0 if warmup == 0 else 0.0)
    assert float(s(10)) == pytest.approx(1.0 if decay == 'constant' else 0.0, abs=1e-6)


def test_online_teachers_equal_stored_logits_and_intermediate_terms_train():
  """Teachers run inside the step give the same loss as their precomputed logits; with hidden-state
  and attention terms (and a learned projection for a narrower student) training still runs."""
  teacher_cfg = TINY
  teachers = [models.Classifier(teacher_cfg, num_classes=2) for _ in range(2)]
  dummy = jnp.ones((1, 4), jnp.int32)
  teacher_params = tuple(t.init(jax.random.PRNGKey(i), dummy, dummy, dummy)['params']
                         for i, t in enumerate(teachers))
  student = models.Classifier(TINY, num_classes=2, num_heads=2)
  batch = synthetic_batch(8)
  stored = jnp.stack([t.apply({'params': p}, batch['input_ids'], batch['token_type_ids'],
                              batch['attention_mask'])['logits'] for t, p in zip(teachers, teacher_params)], 1)
  config = LossConfig(teacher_mode='per_head', temperature=2.0)
  optimizer, schedule = make_optimizer(None, learning_rate=1e-3, total_steps=10)
  state = init_state(student, optimizer, jax.random.PRNGKey(0))
  _, offline = make_train_step(student, optimizer, schedule, config)(state, {**batch, 'teacher_logits': stored})
  _, online = make_train_step(student, optimizer, schedule, config, tuple(teachers))(state, batch, teacher_params)
  np.testing.assert_allclose(offline['loss'], online['loss'], rtol=1e-6)

  import dataclasses
  narrow = models.Classifier(dataclasses.replace(TINY, hidden_size=16, num_layers=1), num_classes=2, num_heads=2)
  params = train.loop.with_hidden_projection(
      narrow.init(jax.random.PRNGKey(0), dummy, dummy, dummy)['params'], narrow, teachers[0], jax.random.PRNGKey(1))
  assert params['hidden_projection'].shape == (16, 32)
  config = LossConfig(teacher_mode='per_head', aux_weights=(('hidden', 1.0), ('attention', 1.0)))
  optimizer, schedule = make_optimizer(params, learning_rate=1e-3, total_steps=10)
  state = init_state(narrow, optimizer, jax.random.PRNGKey(0), params=params)
  step = jax.jit(make_train_step(narrow, optimizer, schedule, config, tuple(teachers)))
  state, m = step(state, batch, teacher_params)
  assert np.isfinite(float(m['loss'])) and float(m['hidden_mse']) > 0 and float(m['attention_kl']) > 0
  assert float(jnp.abs(state.params['hidden_projection'] - params['hidden_projection']).max()) > 0


def test_alpha_and_temperature_schedules_follow_the_step():
  model = models.Classifier(TINY, num_classes=2)
  batch = synthetic_batch(4)
  batch['teacher_logits'] = np.zeros((4, 1, 2), np.float32)
  config = LossConfig(teacher_mode='per_head', alpha=1.0, alpha_end=0.0, temperature=4.0,
                      temperature_end=2.0, schedule_steps=4)
  optimizer, schedule = make_optimizer(None, learning_rate=1e-4, total_steps=5)
  state = init_state(model, optimizer, jax.random.PRNGKey(0))
  step = jax.jit(make_train_step(model, optimizer, schedule, config))
  seen = []
  for _ in range(5):
    state, m = step(state, batch)
    seen.append((float(m['alpha']), float(m['temperature'])))
  np.testing.assert_allclose(seen, [(1, 4), (.75, 3.5), (.5, 3), (.25, 2.5), (0, 2)], atol=1e-6)


def test_predict_returns_rows_in_input_order():
  """predict sorts rows by length internally; outputs must come back in the caller's row order."""
  from synthetic import synthetic_data
  data = synthetic_data(n=40)
  model = models.Classifier(TINY, num_classes=2, num_heads=2)
  params = model.init(jax.random.PRNGKey(0), *[jnp.ones((1, 4), jnp.int32)] * 3)['params']
  out = train.predict(model, params, data, mesh=train.make_mesh(), batch_size=16, buckets=(8, 16))
  expected = model.apply({'params': params}, data.input_ids, data.token_type_ids, data.attention_mask)
  np.testing.assert_allclose(out['logits'], expected['logits'], atol=1e-5)
  np.testing.assert_allclose(out['head_logits'], expected['head_logits'], atol=1e-5)


def test_fit_writes_logs_profile_and_done(tmp_path):
  """In-process fit: metrics.jsonl, TensorBoard events, a profiler trace of steps 1-2, DONE.json."""
  from synthetic import synthetic_data
  model = models.Classifier(TINY, num_classes=2)
  cfg = train.TrainConfig(batch_size=16, max_steps=3, learning_rate=1e-3, buckets=(8, 16), log_every=1,
                          progress=False, profile_steps=(1, 2))
  train.fit(tmp_path, model, synthetic_data(n=48), cfg, LossConfig(), mesh=train.make_mesh())
  logged = [json.loads(line) for line in (tmp_path / 'metrics.jsonl').read_text().splitlines()]
  assert [m['step'] for m in logged] == [1, 2, 3]
  assert {'loss', 'gold', 'accuracy', 'grad_norm', 'learning_rate', 'examples_per_sec'} <= set(logged[0])
  assert list((tmp_path / 'tb').glob('events.out.tfevents.*'))
  assert [p for p in (tmp_path / 'profile').rglob('*') if p.is_file()]
  assert train.read_summary(tmp_path)['steps'] == 3 and train.is_complete(tmp_path)
  # The summary's speed is the median of the logged windows.
  assert train.read_summary(tmp_path)['examples_per_sec'] == np.median([m['examples_per_sec'] for m in logged])


def test_non_finite_loss_is_caught_at_the_next_logged_or_saved_step(tmp_path):
  """The loss is checked where the host waits for the device anyway (logged, evaluated and saved steps): a NaN
  from step 4 on is reported at step 5, the next logged one, and the checkpoint of step 3 is the last one kept."""
  from mkdm_jax.data.batching import batch_order
  from synthetic import synthetic_data
  data = synthetic_data()  # 4 batches of 16 per epoch
  logits = np.zeros((len(data), 1, 2), np.float32)
  logits[batch_order(data.lengths, 16, seed=0, epoch=0, shuffle=True, drop_remainder=False)[3][0]] = np.nan
  cfg = train.TrainConfig(batch_size=16, max_steps=8, learning_rate=1e-3, buckets=(8, 16), log_every=5,
                          checkpoint_every=3, progress=False)
  with pytest.raises(train.NonFiniteLoss, match=r'non-finite loss \(nan\) at step 5 .*checkpoint \(step 3\) is kept'):
    train.fit(tmp_path, models.Classifier(TINY, num_classes=2), data, cfg, LossConfig(teacher_mode='per_head'),
              mesh=train.make_mesh(), teacher_logits=logits)
  assert sorted(int(p.name) for p in (tmp_path / 'ckpt').iterdir() if p.name.isdigit()) == [3]


@pytest.mark.parametrize('layer_decay', [1.0, 0.8])
def test_frozen_word_embeddings_stay_and_the_other_parameters_train_as_before(layer_decay):
  """frozen=('word_embeddings',): the table is bitwise unchanged (no update, no weight decay) and has no optimiser
  state; one step moves every other parameter exactly as the unfrozen step does (clipping off: the gradients of
  the other parameters do not depend on freezing); grad_norm leaves the table out."""
  model = models.Classifier(TINY, num_classes=2, num_heads=2)
  batch = synthetic_batch(16)
  batch['teacher_logits'] = np.random.default_rng(1).normal(size=(16, 2, 2)).astype(np.float32)
  config = LossConfig(teacher_mode='per_head', temperature=2.0)
  table = lambda params: np.asarray(params['encoder']['embeddings']['word_embeddings']['embedding'])
  runs = {}
  for frozen in ((), ('word_embeddings',)):
    optimizer, schedule = make_optimizer(init_state(model, make_optimizer(None, learning_rate=1e-3, total_steps=4)[0],
                                                    jax.random.PRNGKey(0)).params,
                                         learning_rate=1e-3, total_steps=4, weight_decay=0.1, clip_norm=0.0,
                                         layer_decay=layer_decay, frozen=frozen)
    state = init_state(model, optimizer, jax.random.PRNGKey(0))
    start = jax.tree.map(np.asarray, state.params)
    step = jax.jit(make_train_step(model, optimizer, schedule, config, frozen=frozen))
    state, m = step(state, batch)
    runs[frozen] = (start, jax.tree.map(np.asarray, state.params), state.opt_state, float(m['grad_norm']))
  start, frozen_params, opt_state, frozen_norm = runs[('word_embeddings',)]
  _, free_params, free_state, free_norm = runs[()]
  np.testing.assert_array_equal(table(frozen_params), table(start))
  assert np.abs(table(free_params) - table(start)).max() > 1e-4  # unfrozen, the same step moves it
  vocab_shaped = lambda tree: [x for x in jax.tree.leaves(tree) if np.shape(x) == table(start).shape]
  assert vocab_shaped(opt_state) == [] and len(vocab_shaped(free_state)) == 2  # Adam's mu and nu
  for path, leaf in jax.tree_util.tree_leaves_with_path(frozen_params):
    if 'word_embeddings' not in jax.tree_util.keystr(path):
      np.testing.assert_allclose(leaf, dict(jax.tree_util.tree_leaves_with_path(free_params))[path], rtol=0,
                                 atol=1e-7, err_msg=jax.tree_util.keystr(path))
  assert 0 < frozen_norm < free_norm


def test_ensemble_target_uses_the_batch_labels_for_sample_weights():
  """kd_ensemble with --teacher_weighting=sample: the step's loss is the KD loss against the ensemble target made
  with CA-MKD's weights from the batch's gold labels (computed here by hand through losses)."""
  from mkdm_jax.train.step import make_loss_fn
  model = models.Classifier(TINY, num_classes=2)
  batch = synthetic_batch(8)
  batch['teacher_logits'] = np.random.default_rng(3).normal(size=(8, 3, 2)).astype(np.float32) * 3
  params = init_state(model, make_optimizer(None, learning_rate=1e-3, total_steps=1)[0], jax.random.PRNGKey(0)).params
  config = LossConfig(teacher_mode='ensemble', alpha=1.0, temperature=2.0, weighting='sample')
  loss, _ = make_loss_fn(model, config)(params, batch, jax.random.PRNGKey(1), 0, ())
  student = model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'], batch['attention_mask'],
                        deterministic=True)['head_logits']
  weights = losses.teacher_weights(batch['teacher_logits'], 'sample', labels=batch['labels'])
  target = losses.ensemble_target(batch['teacher_logits'], weights, 2.0)
  expected, _ = losses.mkdm_loss(student, target, batch['labels'], batch['weight'], alpha=1.0, temperature=2.0)
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  uniform, _ = make_loss_fn(model, LossConfig(teacher_mode='ensemble', alpha=1.0, temperature=2.0))(
      params, batch, jax.random.PRNGKey(1), 0, ())
  assert abs(float(uniform) - float(loss)) > 1e-4  # the weights changed the target
