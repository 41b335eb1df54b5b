"""benchmarks/stage1.py: its train-step FLOP formula against a hand count, and a --tiny run on the SQuAD pairs that
checks the JSON (fields present, values positive, FLOPs as counted by hand), never the speed."""
import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / 'benchmarks'
STUDENTS, TEACHERS, FRAMEWORKS = ('bert3', 'mpnet3'), ('mpnet-base', 'minilm-l6'), ('jax', 'pytorch', 'onnxruntime')


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def hand_flops(layers, d, f, batch, length):
  """One train step, counted by hand: 6 x matmul params x padded tokens + attention (QK^T and AV, forward and
  backward) + the pooler on the first token."""
  matmul_params = layers * (4 * d * d + 2 * d * f)  # Q, K, V, output projections; FFN in and out
  return 6 * matmul_params * batch * length + 3 * layers * batch * 2 * (2 * length * length * d) + 6 * d * d * batch


@pytest.fixture(scope='module')
def stage1():
  """benchmarks/stage1.py as a module (with speed.py, which it imports as `speed`); the absl flags they define are
  removed again afterwards, so that no later in-process test meets them."""
  from absl import flags
  before = set(flags.FLAGS)
  loaded = {}
  for name in ('speed', 'stage1'):
    spec = importlib.util.spec_from_file_location(name, BENCHMARKS / f'{name}.py')
    loaded[name] = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(loaded[name])
  yield loaded['stage1']
  for name in set(flags.FLAGS) - before:
    delattr(flags.FLAGS, name)
  for name in loaded:
    sys.modules.pop(name)


def test_train_step_flops_by_hand(stage1):
  from mkdm_jax import models
  tiny = models.BertConfig(num_layers=3, hidden_size=32, num_attention_heads=2, intermediate_size=64)
  # 3 x (4 * 32^2 + 2 * 32 * 64) = 24,576 matmul params; 4 x 32 = 128 padded tokens.
  assert stage1.train_step_flops(tiny, 4, 32) == 6 * 24_576 * 128 + 12 * 3 * 4 * 32**2 * 32 + 6 * 32**2 * 4
  assert stage1.train_step_flops(tiny, 4, 32) == hand_flops(3, 32, 64, 4, 32) == 23_617_536
  # bert3 (MiniLM-L6's bottom 3 layers) and mpnet3 (MPNet-base's) at batch 32, length 64.
  bert3 = models.BertConfig(num_layers=3, hidden_size=384, num_attention_heads=12, intermediate_size=1536)
  mpnet3 = models.MPNetConfig(num_layers=3, hidden_size=768, num_attention_heads=12, intermediate_size=3072)
  assert stage1.train_step_flops(bert3, 32, 64) == hand_flops(3, 384, 1536, 32, 64)
  assert stage1.train_step_flops(mpnet3, 32, 64) == hand_flops(3, 768, 3072, 32, 64)
  assert stage1.train_step_flops(mpnet3, 32, 64) / stage1.train_step_flops(bert3, 32, 64) == pytest.approx(3.9, abs=0.1)


@pytest.mark.slow
def test_stage1_tiny_run(tmp_path):
  from mkdm_jax import data
  assert len(data.load_split('squad', 'train', max_rows=64)) >= 64  # the corpus is where the script reads it
  out = tmp_path / 'stage1.json'
  args = ['--tiny', '--rows=16', '--steps=2', '--warmup=1', '--rounds=1', '--batch_size=4', '--score_batch_size=8',
          '--max_length=32', '--buckets=32', '--gemm_size=64', f'--out={out}']
  proc = subprocess.run([sys.executable, str(BENCHMARKS / 'stage1.py'), *args], capture_output=True, text=True,
                        timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  r = json.loads(out.read_text())
  for s in STUDENTS:
    assert positive(r['train_mfu'][s]), s
    assert positive(r['stage1_pairs_per_sec'][s]['before']) and r['stage1_pairs_per_sec'][s]['after'] is None
    assert positive(r['stage1_pairs_per_sec'][s]['frozen_embeddings']) and positive(r['frozen_embeddings_speedup'][s])
    assert positive(r['dense_matmul_ceiling'][s])
    assert r['train'][f'{s}_dense_matmuls']['tokens'] == 4 * 32
    for n in ('100000', '436559'):
      assert positive(r['minutes']['stage1_epoch'][s][n])
    # Every timed step is [4, 32] (one bucket): the JSON's FLOPs are the hand count of the tiny shape.
    train = r['train'][s]
    assert train['shape']['layers'] == 3 and train['shape']['hidden'] == 32 and train['shape']['intermediate'] == 64
    assert train['steps_per_length'] == {'32': 2}
    assert train['timed_gflop'] * 1e9 == pytest.approx(2 * hand_flops(3, 32, 64, 4, 32), rel=1e-12)
  for t in TEACHERS:
    assert positive(r['scoring_ratio_vs_best_peer'][t]), t
    for fw in FRAMEWORKS:
      assert positive(r['scoring_pairs_per_sec'][t][fw]), (t, fw)
      assert positive(r['minutes']['scoring'][t][fw]['436559'])
    assert r['scoring'][t]['logits_max_abs_diff']['pytorch'] < 1e-3 and r['scoring'][t]['logits_agree']
    assert r['scoring'][t]['logits_max_abs_diff']['onnxruntime'] < 1e-3
  assert positive(r['gemm_gflops_median'])
  assert r['cpu_model']['model_name'] and {'avx512f', 'avx512_bf16', 'amx'} <= set(r['cpu_model'])
  assert r['flags']['rows'] == 16 and 'stage1.py' in r['command'] and r['date'] and r['tiny']
  # An after run keeps the before run's figure beside its own.
  after = tmp_path / 'after.json'
  proc = subprocess.run([sys.executable, str(BENCHMARKS / 'stage1.py'), *args[:-1], '--students=bert3', '--teachers=',
                         '--label=after', f'--before_json={out}', f'--out={after}'],
                        capture_output=True, text=True, timeout=600, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  pairs = json.loads(after.read_text())['stage1_pairs_per_sec']['bert3']
  assert pairs['before'] == r['stage1_pairs_per_sec']['bert3']['before'] and positive(pairs['after'])
