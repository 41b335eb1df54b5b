"""Smoke test of benchmarks/speed.py: tiny models, one repeat; checks the JSON, never the speed."""
import json
import math
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # each test runs a benchmark script in a subprocess

SPEED = Path(__file__).resolve().parents[1] / 'benchmarks' / 'speed.py'
HEADLINE = ('jax_vs_torch_forward_ratio', 'jax_vs_torch_train_ratio', 'forward_mfu', 'train_mfu',
            'multi_teacher_cost_ratio', 'bucketing_speedup', 'mpnet_vs_torch_forward_ratio',
            'mpnet_vs_torch_train_ratio', 'mpnet_forward_mfu', 'mpnet_train_mfu', 'mpnet3_speedup',
            'mpnet3_flop_ratio')


def positive(x):
  return isinstance(x, (int, float)) and math.isfinite(x) and x > 0


def test_speed_quick(tmp_path):
  out = tmp_path / 'speed.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, str(SPEED), '--quick', f'--out={out}'], env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  for key in HEADLINE:
    assert positive(result[key]), (key, result[key])
  assert set(result['student_speedup']) == {'bert1', 'bilstm'}
  # Serving: the exported bert1 in ONNX Runtime (fp32, int8) beside JAX, per batch size (--quick: 1 and 4).
  assert set(result['student_vs_onnxruntime']) == {'batch1', 'batch4'}
  assert all(positive(r) for r in result['student_vs_onnxruntime'].values())
  for kind in ('jax', 'onnxruntime_fp32', 'onnxruntime_int8'):
    assert positive(result['serving']['batch4'][f'{kind}_examples_per_s']), kind
  for name, entry in result['student_speedup'].items():
    assert positive(entry['measured']) and positive(entry['flop_ratio']), (name, entry)
  assert result['student_speedup']['bert1']['flop_ratio'] > 1
  machine = result['machine']
  for key in ('cpu_model', 'cpu_cores', 'jax', 'torch', 'device_kind'):
    assert machine[key], key
  # The default --malloc=keep applies where glibc is the C library (and falls back elsewhere).
  assert machine['malloc'] == ('keep' if platform.libc_ver()[0] == 'glibc' else 'default')
  for model in ('minilm_l6', 'bert1', 'bilstm'):
    assert positive(result['inference'][model]['4']['bucketed_examples_per_s'])
  # fp32 at a second batch size (--quick: 8) and bf16 against PyTorch's bf16 autocast, for both families.
  for key in ('forward_ratio_batch8', 'train_ratio_batch8', 'mpnet_forward_ratio_batch8', 'mpnet_train_ratio_batch8',
              'jax_vs_torch_bf16_forward_ratio', 'jax_vs_torch_bf16_train_ratio', 'mpnet_vs_torch_bf16_forward_ratio',
              'mpnet_vs_torch_bf16_train_ratio'):
    assert positive(result[key]), (key, result.get(key))
  for section in (result, result['mpnet']):
    assert section['jax_vs_torch_batch8']['batch_size'] == 8
    assert section['jax_vs_torch_batch8']['logits_max_abs_diff'] < 1e-4
    bf16 = section['jax_vs_torch_bf16']
    assert bf16['precision'] == 'bf16' and section['jax_vs_torch']['precision'] == 'fp32'
    # Both frameworks really compute in bf16: their logits differ by bf16 rounding, not by fp32 rounding.
    assert 1e-6 < bf16['logits_max_abs_diff'] < 0.1, bf16['logits_max_abs_diff']
  # The Markdown summary beside the JSON (what README and BENCHMARKS.md quote) carries the same numbers.
  summary = out.with_suffix('.md').read_text()
  bf16 = result['jax_vs_torch_bf16']
  assert f"| MiniLM-L6 | 4 | 32 | bf16 | {bf16['jax_forward_examples_per_s']:.1f} |" in summary
  assert f"**{result['student_vs_onnxruntime']['batch4']:.2f}**" in summary
  compare = result['jax_vs_torch']
  assert compare['logits_max_abs_diff'] < 1e-4
  # The attention kernel skips padded keys: executed FLOPs fall below model FLOPs exactly when padded.
  assert 0 < compare['real_token_fraction'] <= 1
  assert 0 < compare['forward_executed_gflop'] <= compare['forward_gflop']
  padded_batch = compare['real_token_fraction'] < 1
  assert (compare['forward_executed_gflop'] < compare['forward_gflop']) == padded_batch
  assert compare['forward_mfu_executed'] / compare['forward_mfu'] == pytest.approx(
      compare['forward_executed_gflop'] / compare['forward_gflop'])
  for kind, stats in result['inference_padding']['4'].items():
    assert 0 < stats['real_token_fraction'] <= stats['longest_row_fraction'] <= 1, (kind, stats)
  mpnet = result['mpnet']
  assert mpnet['jax_vs_torch']['logits_max_abs_diff'] < 1e-4  # transformers' MPNet holds the same weights
  assert mpnet['jax_vs_torch']['torch_attention'] == 'eager'  # its only implementation
  assert result['mpnet3_flop_ratio'] > 1 and set(mpnet['student_speedup']) == {'mpnet3'}
  padded = result['bucketing']['all_train_padded_tokens']
  assert padded['fixed'] >= padded['bucketed'] >= padded['real'] > 0


def test_scale_smoke(tmp_path):
  """benchmarks/scale.py at toy sizes: every stage runs in its own process and the JSON has the documented
  keys, one value per size; checks the report, never the speed or memory goals."""
  out = tmp_path / 'scale.json'
  proc = subprocess.run([sys.executable, str(SPEED.parent / 'scale.py'), '--pairs=300,500', '--rows_per_shard=200',
                         '--train_steps=60', '--memory_rows=300', f'--workdir={tmp_path / "work"}', f'--out={out}'],
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result['pairs'] == [300, 500]
  for key in ('peak_rss_mb', 'examples_per_sec'):
    assert set(result[key]) == {'prepare', 'score', 'train'}
    for values in result[key].values():
      assert len(values) == 2 and all(positive(v) for v in values), (key, values)
  for kind in ('text', 'encoding', 'logits'):
    assert len(result['disk_bytes_per_pair'][kind]) == 2 and all(positive(v) for v in result['disk_bytes_per_pair'][kind])
  # 2 float32 logits a pair, plus 8 bytes of row key, plus .npy headers and manifests.
  assert 16 < result['disk_bytes_per_pair']['logits'][1] < 40
  assert len(result['train_stream_vs_memory']) == 2 and all(positive(r) for r in result['train_stream_vs_memory'])
  assert len(result['batches']) == 2 and all(positive(b['ms_per_batch']) and positive(b['first_batch_ms'])
                                            for b in result['batches'])
  assert result['machine']['cpu_model']


def test_profile_step_quick(tmp_path):
  """benchmarks/profile_step.py --quick: the traced train step's HLO ops, grouped, with shares of op time that
  add up to 1 and output shapes read from the compiled HLO; checks the report, never the speed."""
  out = tmp_path / 'profile'
  proc = subprocess.run([sys.executable, str(SPEED.parent / 'profile_step.py'), '--quick', f'--out={out}'],
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'}, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads((out / 'ops.json').read_text())
  ops = {g['op']: g for g in result['ops']}
  assert sum(g['share'] for g in result['ops']) == pytest.approx(1.0)
  assert ops['dot_general']['per_step'] > 0 and ops['dot_general']['ms_per_step'] > 0
  # The embedding gradient's zero fill: the tiny BERT's word table, 30,522 x 32.
  assert 'f32[30522,32]' in ops['wrapped_broadcast']['shapes']
  assert '| dot_general |' in (out / 'ops.md').read_text()


def test_saved_speed_times_saved_models_in_turn(ci_tiny_run, tmp_path):
  """benchmarks/saved_speed.py on two saved students of a ci_tiny run: per model its parameters, heads and
  examples/s, the first model's time ratio 1; a folder that is no saved model is refused by name."""
  workdir, _ = ci_tiny_run
  saved = [workdir / 'students' / 'bert1_mkdm', workdir / 'students' / 'bert1_kd_single']
  out = tmp_path / 'saved_speed.json'
  script = Path(__file__).resolve().parents[1] / 'benchmarks' / 'saved_speed.py'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, str(script), f'--models={saved[0]},{saved[1]}', '--max_rows=40',
                         '--rounds=2', f'--out={out}'], env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert [m['heads'] for m in result['models']] == [3, 1] and result['rounds'] == 2
  assert all(positive(m['examples_per_sec']) and positive(m['params']) for m in result['models'])
  assert result['models'][0]['time_vs_first'] == 1.0
  proc = subprocess.run([sys.executable, str(script), f'--models={tmp_path}'], env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode != 0 and f'{tmp_path} is not a finished saved model' in proc.stderr
