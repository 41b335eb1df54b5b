"""The paper-scale flagfiles parse with run.py's flags, and the models they imply build and shard.

Nothing is downloaded: the hub checkpoints are replaced by their known shapes, and the train states are
built abstractly (jax.eval_shape) on 8 simulated CPU devices in a subprocess (this file run as a script).
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / 'experiments' / 'configs').glob('paper_*.flags'))
DEVICES = 8
# (layers, hidden, heads, intermediate) of the hub checkpoints the configs name.
HUB_SHAPES = {'google-bert/bert-large-uncased': (24, 1024, 16, 4096),
              'google-bert/bert-base-uncased': (12, 768, 12, 3072)}
NUM_CLASSES = {'mnli': 3, 'snli': 3, 'qnli': 2, 'rte': 2}


def bert_config(name):
  from mkdm_jax.models import BertConfig
  layers, hidden, heads, intermediate = HUB_SHAPES[name]
  return BertConfig(vocab_size=30522, hidden_size=hidden, num_layers=layers, num_attention_heads=heads,
                    intermediate_size=intermediate, max_position_embeddings=512)


def fake_load_checkpoint(name):
  """run.load_checkpoint without downloading: the checkpoint's config and zero encoder params."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from mkdm_jax.models import BertEncoder
  if name not in HUB_SHAPES:
    raise KeyError(f'checkpoint {name!r} has no known shape in HUB_SHAPES')
  config = bert_config(name)
  dummy = jnp.zeros((1, 8), jnp.int32)
  shapes = jax.eval_shape(lambda: BertEncoder(config).init(jax.random.PRNGKey(0), dummy, dummy, dummy))
  return config, jax.tree.map(lambda s: np.zeros(s.shape, s.dtype), shapes['params'])


def sharded_state(model, abstract_params, mesh):
  """Abstract train state of `model` as run.py's training builds it, its shardings, and per-device bytes."""
  import jax
  import numpy as np
  from run import FLAGS
  from mkdm_jax import models, train
  from mkdm_jax.train.optim import make_optimizer
  from mkdm_jax.train.sharding import state_shardings
  from mkdm_jax.train.step import init_state
  optimizer, schedule = make_optimizer(abstract_params, learning_rate=1e-5, total_steps=1000,
                                       warmup_steps=100, layer_decay=FLAGS.layer_decay,
                                       accumulate=FLAGS.accumulate)
  state = jax.eval_shape(lambda r, p: init_state(model, optimizer, r, params=p), jax.random.PRNGKey(0),
                         abstract_params)
  shardings = state_shardings(mesh, state)
  leaves = zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in leaves)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  # The jitted train step must accept the sharded state and a batch split over all devices.
  batch = {k: jax.ShapeDtypeStruct((FLAGS.batch_size, FLAGS.max_length), np.int32)
           for k in ('input_ids', 'token_type_ids', 'attention_mask')}
  batch.update(labels=jax.ShapeDtypeStruct((FLAGS.batch_size,), np.int32),
               weight=jax.ShapeDtypeStruct((FLAGS.batch_size,), np.float32))
  step = train.make_train_step(model, optimizer, schedule, train.LossConfig())
  jax.jit(step, in_shardings=(shardings, train.sharding.batch_sharding(mesh))).lower(state, batch)
  return {'params': models.count_params(state.params), 'layers': model.encoder.num_layers,
          'hidden': model.encoder.hidden_size, 'heads': model.num_heads, 'dtype': str(model.dtype.__name__),
          'total_bytes': total, 'per_device_bytes': per_device}


def check_config(path):
  """Parses one flagfile with run.py's flags and builds its teacher and student train states."""
  import jax
  import jax.numpy as jnp
  import tensorflow_datasets as tfds
  import run
  from mkdm_jax import data, train
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', f'--flagfile={path}', '--workdir=/nonexistent'])
  run.validate_flags()
  flags = run.FLAGS
  task = data.get_task(flags.task)
  with tfds.testing.mock_data(num_examples=4):  # the split names exist for this tfds dataset
    for split in (flags.train_split, flags.dev_split, flags.eval_split):
      data.load_split(task, split)
  run.load_checkpoint = fake_load_checkpoint
  mesh = train.make_mesh(flags.fsdp)
  teacher, _ = run.teacher_model(0, task.num_classes)
  dummy = jnp.zeros((1, 8), jnp.int32)
  teacher_params = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), dummy, dummy, dummy)['params'])
  student, student_params = run.student_model(flags.students[0], task.num_classes, flags.num_teachers)
  return {'task': task.name, 'num_classes': task.num_classes, 'fsdp': flags.fsdp,
          'devices': jax.device_count(), 'teacher_checkpoints': flags.teacher_checkpoints,
          'student_checkpoint': flags.student_checkpoint,
          'teacher': sharded_state(teacher, teacher_params, mesh),
          'student': sharded_state(student, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                         student_params), mesh)}


def main(out, paths):
  sys.path[:0] = [str(REPO), str(REPO / 'experiments')]
  import mkdm_jax  # noqa: F401  (sets XLA CPU flags before jax is imported)
  report = {}
  for path in paths:
    try:
      report[Path(path).stem] = check_config(path)
    except Exception as e:  # noqa: BLE001 - reported per config, asserted by the test
      report[Path(path).stem] = {'error': f'{type(e).__name__}: {e}'}
  Path(out).write_text(json.dumps(report, indent=1))


@pytest.fixture(scope='module')
def report(tmp_path_factory):
  out = tmp_path_factory.mktemp('paper') / 'report.json'
  env = dict(os.environ, JAX_PLATFORMS='cpu', HF_HUB_OFFLINE='1',
             XLA_FLAGS=f'--xla_force_host_platform_device_count={DEVICES}')
  proc = subprocess.run([sys.executable, __file__, str(out), *map(str, CONFIGS)], env=env, cwd=REPO,
                        capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out.read_text())


@pytest.fixture(scope='module')
def hf_param_counts():
  """Parameter counts of transformers' BertModel for each hub shape (built on the meta device: no memory)."""
  torch = pytest.importorskip('torch')
  import transformers
  counts = {}
  for name, (layers, hidden, heads, intermediate) in HUB_SHAPES.items():
    config = transformers.BertConfig(num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads,
                                     intermediate_size=intermediate)
    with torch.device('meta'):
      counts[name] = sum(p.numel() for p in transformers.BertModel(config).parameters())
  return counts


def test_all_four_tasks_have_a_config():
  assert [p.stem for p in CONFIGS] == ['paper_mnli', 'paper_qnli', 'paper_rte', 'paper_snli']


@pytest.mark.parametrize('name', [p.stem for p in CONFIGS])
def test_config_builds_and_shards(report, hf_param_counts, name):
  result = report[name]
  assert 'error' not in result, result.get('error')
  assert result['num_classes'] == NUM_CLASSES[name.removeprefix('paper_')]
  assert result['devices'] == DEVICES and result['fsdp'] == DEVICES
  teacher, student = result['teacher'], result['student']
  (teacher_checkpoint,) = result['teacher_checkpoints']
  head = 1024 * result['num_classes'] + result['num_classes']
  assert teacher['params'] == hf_param_counts[teacher_checkpoint] + head  # BERT-large + one linear head
  assert (teacher['layers'], teacher['hidden'], teacher['dtype']) == (24, 1024, 'bfloat16')
  assert (student['layers'], student['hidden'], student['heads'], student['dtype']) == (3, 768, 3, 'bfloat16')
  assert result['student_checkpoint'] == 'google-bert/bert-base-uncased'
  # fp32 params + two Adam moments, split over the 8 devices: well under a quarter of the total per device.
  assert teacher['total_bytes'] > 3 * 4 * 335e6
  for state in (teacher, student):
    assert state['per_device_bytes'] < 0.25 * state['total_bytes']


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
