"""Reliability: kills and preemption at every stage, corrupt checkpoints, work-dir lock, bad input
through the real command, untrusted checkpoints, multi-process training, NaN guard."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from conftest import REPO, run_pipeline
from mkdm_jax.errors import UserError
from mkdm_jax.workdir import WorkdirLock

pytestmark = pytest.mark.slow  # subprocess runs: kills, locks and the command line

HARNESS = REPO / 'tests' / 'train_harness.py'
KILL = [str(REPO / 'tests' / 'kill_wrapper.py')]


def metrics_by_row(workdir):
  rows = json.loads((workdir / 'results.json').read_text())['rows']
  return {r['name']: r['metrics'] for r in rows}


@pytest.mark.slow
def test_pipeline_survives_kills_and_preemption_at_every_stage(tmp_path, ci_tiny_run, xla_cache):
  """SIGKILL in teacher training, SIGTERM, SIGKILL in logit caching, during a checkpoint write and
  in distillation; the reruns of the same command finish with the uninterrupted run's metrics."""
  workdir = tmp_path / 'run'
  teachers = workdir / 'teachers'

  proc = run_pipeline(workdir, cache=xla_cache, wrapper=KILL + ['batch', '30'])
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert (teachers / 'teacher_0' / 'DONE.json').exists()
  assert not (teachers / 'teacher_1' / 'DONE.json').exists()

  proc = run_pipeline(workdir, cache=xla_cache, wrapper=KILL + ['sigterm', '12'])
  assert proc.returncode == 143, proc.stderr[-3000:]
  assert 'preempted by SIGTERM: saved a checkpoint at step' in proc.stderr
  assert 'Traceback' not in proc.stderr
  step = int(proc.stderr.split('saved a checkpoint at step ')[1].split(';')[0])
  assert any((d / 'ckpt' / str(step)).is_dir() for d in teachers.iterdir())

  proc = run_pipeline(workdir, cache=xla_cache, wrapper=KILL + ['logit_write', '2'])
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert f'resuming {teachers}' in proc.stderr  # the preempted teacher went on from its checkpoint
  written = list((workdir / 'logits').glob('*/manifest.json'))
  assert len(written) == 2  # 12 (teacher, dataset) stores are due; the kill left 2

  proc = run_pipeline(workdir, cache=xla_cache, wrapper=KILL + ['ckpt_save', '2'])
  assert proc.returncode == -9, proc.stderr[-3000:]

  proc = run_pipeline(workdir, cache=xla_cache, wrapper=KILL + ['batch', '60'])
  assert proc.returncode == -9, proc.stderr[-3000:]
  assert (workdir / 'students').is_dir()

  proc = run_pipeline(workdir, cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert metrics_by_row(workdir) == metrics_by_row(ci_tiny_run[0])


def run_harness(tmp_path, name, timeout=600, **flags):
  out = tmp_path / f'{name}.npz'
  cmd = [sys.executable, str(HARNESS), f'--workdir={tmp_path / name}', f'--out={out}']
  cmd += [f'--{k}={v}' for k, v in flags.items()]
  proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  return proc, out


def max_param_diff(a, b):
  a, b = np.load(a), np.load(b)
  assert sorted(a.files) == sorted(b.files)
  return max(float(np.max(np.abs(a[k] - b[k]))) for k in a.files)


def test_corrupt_latest_checkpoint_falls_back_to_previous(tmp_path):
  proc, straight = run_harness(tmp_path, 'straight', steps=12)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc, _ = run_harness(tmp_path, 'run', steps=12, kill_after=10)  # leaves checkpoints 6 and 9
  assert proc.returncode == -9, proc.stderr[-3000:]
  latest = tmp_path / 'run' / 'ckpt' / '9'
  truncated = 0
  for f in (latest / 'state').rglob('*'):
    if f.is_file() and f.stat().st_size > 64 and 'metadata' not in f.name:
      f.write_bytes(f.read_bytes()[:16])
      truncated += 1
  assert truncated
  proc, resumed = run_harness(tmp_path, 'run', steps=12)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f'checkpoint {latest} is unreadable' in proc.stderr
  assert 'from step 6' in proc.stderr
  assert max_param_diff(straight, resumed) == 0.0


def test_checkpoint_of_another_model_is_a_clear_error(tmp_path):
  proc, _ = run_harness(tmp_path, 'run', steps=3)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc, _ = run_harness(tmp_path, 'run', steps=6, hidden=16)
  assert proc.returncode == 2
  assert 'does not match the model' in proc.stderr
  assert 'encoder/embeddings/word_embeddings/embedding: checkpoint (128, 32), model (128, 16)' in proc.stderr
  assert 'Traceback' not in proc.stderr


def test_nan_loss_stops_with_clear_message_and_keeps_last_good_checkpoint(tmp_path):
  from mkdm_jax.data.batching import batch_order
  from mkdm_jax.train import load_params
  from synthetic import synthetic_data
  # Poison a row of the 4th batch (harness: seed 3, batch 16), so that checkpoints 1-3 exist.
  order = batch_order(synthetic_data().lengths, 16, seed=3, epoch=0, shuffle=True, drop_remainder=False)
  proc, _ = run_harness(tmp_path, 'run', steps=12, nan_row=int(order[3][0]), checkpoint_every=1)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'non-finite loss (nan) at step 4' in proc.stderr and 'Traceback' not in proc.stderr
  steps = sorted(int(p.name) for p in (tmp_path / 'run' / 'ckpt').iterdir() if p.name.isdigit())
  assert steps == [2, 3]  # the two newest good ones are kept; nothing of step 4 was saved
  state = load_params(tmp_path / 'run' / 'ckpt' / '3' / 'state')
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state['params']))


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
  """Two processes joined by jax.distributed, each feeding its half of every global batch."""
  proc, single = run_harness(tmp_path, 'single', steps=5, dropout=0.0, devices=2)
  assert proc.returncode == 0, proc.stderr[-3000:]
  port, out = free_port(), tmp_path / 'multi.npz'
  procs = [subprocess.Popen(
      [sys.executable, str(HARNESS), f'--workdir={tmp_path / "multi"}', f'--out={out}', '--steps=5',
       '--dropout=0.0', '--num_processes=2', f'--process_id={i}', f'--port={port}'],
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
      env={**os.environ, 'JAX_PLATFORMS': 'cpu'}) for i in range(2)]
  for p in procs:
    _, err = p.communicate(timeout=600)
    assert p.returncode == 0, err[-3000:]
  assert max_param_diff(single, out) < 1e-5


def test_workdir_lock(tmp_path):
  with WorkdirLock(tmp_path):
    with pytest.raises(UserError) as refused:
      WorkdirLock(tmp_path).__enter__()
  message = str(refused.value)
  assert f'in use by process {os.getpid()} on {socket.gethostname()}' in message
  assert f'lock file {tmp_path / ".lock"}' in message
  assert not (tmp_path / '.lock.owner').exists()
  with WorkdirLock(tmp_path):  # released on exit
    pass


def test_workdir_lock_of_killed_process_does_not_block(tmp_path):
  """The OS drops the lock of a process killed with SIGKILL: the next run takes it at once."""
  holder = subprocess.Popen(
      [sys.executable, '-c', 'import sys, time; from mkdm_jax.workdir import WorkdirLock; '
       'lock = WorkdirLock(sys.argv[1]).__enter__(); print("locked", flush=True); time.sleep(600)',
       str(tmp_path)],
      stdout=subprocess.PIPE, text=True, cwd=REPO)
  try:
    assert holder.stdout.readline().strip() == 'locked'
    with pytest.raises(UserError, match=f'in use by process {holder.pid} '):
      WorkdirLock(tmp_path).__enter__()
  finally:
    holder.kill()  # SIGKILL: no cleanup runs in the holder
    holder.communicate()
  with WorkdirLock(tmp_path):
    assert (tmp_path / '.lock.owner').read_text() == f'{socket.gethostname()} {os.getpid()}'


def run_cli(tmp_path, *flags):
  cmd = [sys.executable, str(REPO / 'experiments' / 'run.py'), f'--workdir={tmp_path / "w"}', *flags]
  return subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_busy_workdir_refused_through_the_command(tmp_path):
  (tmp_path / 'w').mkdir()
  with WorkdirLock(tmp_path / 'w'):
    proc = run_cli(tmp_path, '--flagfile=experiments/configs/ci_tiny.flags')
  assert proc.returncode == 2 and f'is in use by process {os.getpid()}' in proc.stderr
  assert 'Traceback' not in proc.stderr


HEADER = 'question\tpassage\tlabel\n'
BAD_FILES = {
    'wrong_columns': (HEADER + 'q\tp\t1\nq2\tp2\n', ':3', 'expected 3'),
    'blank_line': (HEADER + 'q\tp\t1\n\nq2\tp2\t0\n', ':3', 'blank'),
    'unknown_label': (HEADER + 'q\tp\tmaybe\n', ':2', 'maybe'),
    'empty_text': (HEADER + 'q\t\t1\n', ':2', 'empty'),
    'non_utf8': (HEADER.encode() + b'q\xff\tp\t1\n', ':2', 'UTF-8'),
    'empty_file': ('', 'bad.tsv', 'empty'),
    'header_only': (HEADER, 'bad.tsv', 'no data rows'),
}


@pytest.mark.parametrize('case', sorted(BAD_FILES))
def test_malformed_files_give_one_clear_error(tmp_path, case):
  content, where, what = BAD_FILES[case]
  path = tmp_path / 'bad.tsv'
  path.write_bytes(content if isinstance(content, bytes) else content.encode())
  proc = run_cli(tmp_path, '--task=tsv', f'--train_split={path}', f'--dev_split={path}',
                 f'--eval_split={path}', '--text_a_col=question', '--text_b_col=passage',
                 '--label_col=label', '--teacher_checkpoints=random', '--student_checkpoint=random')
  assert proc.returncode == 2, proc.stderr[-2000:]
  error_lines = [l for l in proc.stderr.splitlines() if l.startswith('error:')]
  assert len(error_lines) == 1, proc.stderr[-2000:]
  assert str(path) in error_lines[0] and where in error_lines[0], error_lines[0]
  assert what.lower() in error_lines[0].lower(), error_lines[0]
  assert 'Traceback' not in proc.stderr


def test_missing_file_names_path(tmp_path):
  proc = run_cli(tmp_path, '--task=tsv', f'--train_split={tmp_path / "nope.tsv"}',
                 '--text_a_col=0', '--text_b_col=1')
  assert proc.returncode == 2 and str(tmp_path / 'nope.tsv') in proc.stderr
  assert 'Traceback' not in proc.stderr


@pytest.mark.parametrize('flag,message', [
    ('--alpha=1.5', '--alpha=1.5 must lie in [0, 1]'),
    ('--temperature=0', '--temperature=0.0 must be > 0'),
    ('--methods=mkdm,magic', '--methods: unknown method'),
    ('--students=gpt2', '--students'),
    ('--stages=teachers,train', '--stages: unknown stage'),
    ('--teacher_learning_rates=1e-4,2e-4', '--teacher_learning_rates needs 1 or --num_teachers=3'),
    ('--buckets=32,big', 'non-number'),
])
def test_bad_flags_fail_before_any_work(tmp_path, flag, message):
  proc = run_cli(tmp_path, '--flagfile=experiments/configs/ci_tiny.flags', flag)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert message in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'w' / 'teachers').exists()


def test_unknown_flag_is_reported_by_absl(tmp_path):
  proc = run_cli(tmp_path, '--flagfile=experiments/configs/ci_tiny.flags', '--alhpa=0.3')
  assert proc.returncode != 0 and 'alhpa' in proc.stderr and 'Traceback' not in proc.stderr


def test_pickle_checkpoint_refused_through_the_command(tmp_path, minilm_dir):
  ckpt = tmp_path / 'ckpt'
  ckpt.mkdir()
  (ckpt / 'config.json').write_text((minilm_dir / 'config.json').read_text())
  (ckpt / 'pytorch_model.bin').write_bytes(b'not really a pickle')
  proc = run_cli(tmp_path, '--flagfile=experiments/configs/ci_tiny.flags',
                 f'--teacher_checkpoints={ckpt}')
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert 'pickle' in proc.stderr and 'allow_pickle' in proc.stderr and 'Traceback' not in proc.stderr
