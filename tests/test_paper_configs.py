"""The paper-scale flagfiles parse with run.py's flags, and the models they imply build and shard.

Nothing is downloaded: the hub checkpoints are replaced by their known shapes, and the train states are
built abstractly (jax.eval_shape) on 8 simulated CPU devices in a subprocess (this file run as a script).
"""
import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # subprocess runs

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


def fake_load_encoder(name, options=None):
  """factory.load_encoder without downloading: the checkpoint's config and zero encoder params."""
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


def sharded_state(model, abstract_params, mesh, cfg):
  """Abstract train state of `model` as the pipeline's training builds it, its shardings, per-device bytes."""
  import jax
  import numpy as np
  from mkdm_jax import losses, models, train
  from mkdm_jax.train.optim import make_optimizer
  from mkdm_jax.train.sharding import state_shardings
  from mkdm_jax.train.step import init_state
  optimizer, schedule = make_optimizer(abstract_params, learning_rate=1e-5, total_steps=1000,
                                       warmup_steps=100, layer_decay=cfg.layer_decay,
                                       accumulate=cfg.accumulate)
  state = jax.eval_shape(lambda r, p: init_state(model, optimizer, r, params=p), jax.random.PRNGKey(0),
                         abstract_params)
  shardings = state_shardings(mesh, state)
  leaves = zip(jax.tree.leaves(state), jax.tree.leaves(shardings))
  per_device = sum(int(np.prod(s.shard_shape(x.shape))) * x.dtype.itemsize for x, s in leaves)
  total = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(state))
  # The jitted train step must accept the sharded state and a batch split over all devices.
  batch = {k: jax.ShapeDtypeStruct((cfg.batch_size, cfg.max_length), np.int32)
           for k in ('input_ids', 'token_type_ids', 'attention_mask')}
  batch.update(labels=jax.ShapeDtypeStruct((cfg.batch_size,), np.int32),
               weight=jax.ShapeDtypeStruct((cfg.batch_size,), np.float32))
  step = train.make_train_step(model, optimizer, schedule, losses.LossConfig())
  jax.jit(step, in_shardings=(shardings, train.sharding.batch_sharding(mesh))).lower(state, batch)
  return {'params': models.count_params(state.params), 'layers': model.encoder.num_layers,
          'hidden': model.encoder.hidden_size, 'heads': model.num_heads, 'dtype': np.dtype(model.dtype).name,
          'total_bytes': total, 'per_device_bytes': per_device}


@functools.cache
def run_script():
  """experiments/run.py as a module, loaded once (its absl flags can be defined only once per process)."""
  import importlib.util
  spec = importlib.util.spec_from_file_location('run', REPO / 'experiments' / 'run.py')
  run = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(run)
  return run


def check_config(path):
  """Parses one flagfile with run.py's flags into a pipeline Config, validates it, and builds its teacher
  and student train states through the model factory."""
  import dataclasses
  import jax
  import jax.numpy as jnp
  import tensorflow_datasets as tfds
  run = run_script()
  from mkdm_jax import config, data, distill, train
  from mkdm_jax.models import factory
  run.FLAGS.unparse_flags()
  run.FLAGS(['run.py', f'--flagfile={path}', '--workdir=/nonexistent'])
  cfg = config.config_from_strings({f.name: run.FLAGS[f.name].value for f in dataclasses.fields(config.Config)})
  factory.load_encoder = fake_load_encoder
  config.validate(cfg)
  task = data.get_task(cfg.task)
  with tfds.testing.mock_data(num_examples=4):  # the split names exist for this tfds dataset
    for split in (cfg.train_split, cfg.dev_split, cfg.eval_split):
      data.load_split(task, split)
  mesh = train.make_mesh(cfg.fsdp)
  options = config.model_options(cfg)
  teacher = factory.Classifier(fake_load_encoder(cfg.teacher_checkpoints[0])[0], task.num_classes,
                               dtype=jnp.dtype(options.dtype))
  dummy = jnp.zeros((1, 8), jnp.int32)
  teacher_params = jax.eval_shape(lambda: teacher.init(jax.random.PRNGKey(0), dummy, dummy, dummy)['params'])
  student_checkpoint = distill.student_checkpoint(cfg.student_checkpoint, cfg.students[0])
  student, student_params = factory.student(cfg.students[0], student_checkpoint, task.num_classes,
                                            cfg.num_teachers, 0, options)
  return {'task': task.name, 'num_classes': task.num_classes, 'fsdp': cfg.fsdp,
          'devices': jax.device_count(), 'teacher_checkpoints': list(cfg.teacher_checkpoints),
          'student_checkpoint': student_checkpoint,
          'teacher': sharded_state(teacher, teacher_params, mesh, cfg),
          'student': sharded_state(student, jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                                                         student_params), mesh, cfg)}


def main(out, paths):
  from mkdm_jax import cli  # noqa: F401  (as run.py does: the XLA CPU flags before jax is imported)
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
  import torch
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
