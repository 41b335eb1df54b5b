"""The GPU check on CPU: benchmarks/gpu_step.py runs a tiny model and counts its FLOPs right;
benchmarks/device_check.sh parses and runs what it should."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / 'benchmarks' / 'device_check.sh'
GPU_STEP = REPO / 'benchmarks' / 'gpu_step.py'


@pytest.mark.slow
def test_gpu_step_tiny_on_cpu(tmp_path):
  out = tmp_path / 'gpu_step.json'
  flags = ['--layers=1', '--hidden=32', '--heads=2', '--intermediate=64', '--batch_size=4', '--length=16',
           '--steps=2', '--warmup=1', '--precision=fp32', f'--out={out}']
  proc = subprocess.run([sys.executable, str(GPU_STEP), *flags], capture_output=True, text=True, timeout=300,
                        cwd=REPO, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout[proc.stdout.index('{'):]) == result  # printed as written
  assert result['examples_per_s'] > 0 and result['step_time_median_s'] > 0
  assert len(result['step_times_s']) == 2 and len(result['losses']) == 3
  # By hand, for 1 layer, hidden 32, intermediate 64, 4 x 16 tokens: 6 x matmul weights per token x tokens,
  # 3 x forward attention (QK^T and PV, 2 x 16^2 x 32 multiply-adds per example), 3 x forward pooler.
  weights = 4 * 32 * 32 + 2 * 32 * 64  # Q, K, V, output; feed-forward in and out
  expected = 6 * weights * 4 * 16 + 3 * 4 * (2 * 2 * 16 * 16 * 32) + 3 * 4 * (2 * 32 * 32)
  assert expected == 3_563_520
  assert result['model_flops_per_step'] == expected
  assert result['achieved_tflops'] == pytest.approx(expected / result['step_time_median_s'] / 1e12)
  assert result['device_kind'] == 'cpu' and result['mfu'] is None and result['peak_tflops'] is None
  assert result['precision'] == 'fp32' and result['model']['vocab'] == 30522
  for key in ('jax_version', 'date'):
    assert result[key], key


def test_device_check_script():
  proc = subprocess.run(['bash', '-n', str(SCRIPT)], capture_output=True, text=True, timeout=30)
  assert proc.returncode == 0, proc.stderr
  text = SCRIPT.read_text()
  for test_file in ('tests/test_models.py', 'tests/test_mpnet.py', 'tests/test_train.py', 'tests/test_losses.py'):
    assert test_file in text and (REPO / test_file).is_file(), test_file
  assert 'benchmarks/gpu_step.py' in text and 'set -euo pipefail' in text
  # The jax[cuda12] pin, as the script computes it from requirements.txt, is requirements.txt's jax version.
  version = re.search(r'^jax==([0-9.]+)\s*$', (REPO / 'requirements.txt').read_text(), re.M).group(1)
  assignment = re.search(r'^JAX_PIN=.*$', text, re.M).group(0)
  pin = subprocess.run(['bash', '-c', f'{assignment}; echo "$JAX_PIN"'], capture_output=True, text=True,
                       cwd=REPO, timeout=30).stdout.strip()
  assert pin == f'jax[cuda12]=={version}'
  assert re.search(r'pip install .*"\$JAX_PIN"', text)
