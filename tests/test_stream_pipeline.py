"""TMKD stage 1 streamed from a prepared corpus (--unlabelled_corpus) against the same pairs held in memory:
the same teacher logits, the same stage-1 parameters; scoring resumes by shard."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

from conftest import CI_TINY, run_pipeline
from mkdm_jax import data, train
from mkdm_jax.data import corpus

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline

REPO = Path(__file__).resolve().parents[1]
WIKIQA_TRAIN = REPO.parent / 'shared' / 'data' / 'wikiqa' / 'WikiQA-train.tsv'
STAGE1 = ['--methods=tmkd', '--students=bert1', '--unlabelled_extra=0']


@pytest.fixture(scope='module')
def in_memory_run(tmp_path_factory, xla_cache):
  """ci_tiny's teachers, logits and TMKD stage 1 on the in-memory set (the train rows, labels dropped)."""
  workdir = tmp_path_factory.mktemp('memory') / 'run'
  proc = run_pipeline(workdir, *STAGE1, '--stages=teachers,logits,pretrain', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir


@pytest.fixture(scope='module')
def train_corpus(tmp_path_factory):
  """The run's train rows (ci_tiny: the first 300 WikiQA train rows, rounded up to whole questions) as a
  prepared corpus of 100-row shards, unlabelled, keyed as the in-memory rows are."""
  rows = len(data.load_split('wikiqa', 'train', REPO.parent / 'shared' / 'data', max_rows=300))
  folder = tmp_path_factory.mktemp('corpus')
  source = folder / 'pairs.tsv'
  source.write_text(''.join(WIKIQA_TRAIN.read_text(encoding='utf-8').splitlines(keepends=True)[:rows + 1]),
                    encoding='utf-8')
  options = corpus.ReadOptions('tsv', 'Question', 'Sentence', group_col='QuestionID')
  manifest = corpus.prepare([source], folder / 'corpus', options, rows_per_shard=100, progress=False)
  assert manifest['rows'] == rows and manifest['shards'] == -(-rows // 100)
  return folder / 'corpus'


def stored_logits(workdir, name):
  """(logits, ids) of a store entry, its shards concatenated in order (or its single copy)."""
  base = workdir / 'logits' / name
  folders = sorted(base.glob('shard-*')) or [base]
  return (np.concatenate([np.load(f / 'logits.npy') for f in folders]),
          np.concatenate([np.load(f / 'ids.npy') for f in folders]))


def test_streamed_stage1_equals_in_memory_stage1(in_memory_run, train_corpus, tmp_path, xla_cache):
  workdir = tmp_path / 'stream'
  proc = run_pipeline(workdir, *STAGE1, f'--shared_dir={in_memory_run}', f'--unlabelled_corpus={train_corpus}',
                      '--stages=logits,pretrain', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  # Each teacher scored the corpus shard by shard: the same logits, by row key, as on the in-memory set.
  store = in_memory_run / 'logits'
  shards = sorted(p.name for p in (store / 'teacher_0.corpus').iterdir())
  assert shards == [f'shard-{i:05d}-of-00004' for i in range(4)]
  for t in range(3):
    logits, ids = stored_logits(in_memory_run, f'teacher_{t}.corpus')
    expected, expected_ids = stored_logits(in_memory_run, f'teacher_{t}.train')
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
  # Stage 1 streamed from disk trained the same parameters as stage 1 on the in-memory rows.
  streamed, _ = train.load_final(workdir / 'students' / 'bert1_tmkd_stage1')
  held, _ = train.load_final(in_memory_run / 'students' / 'bert1_tmkd_stage1')
  for a, b in zip(jax.tree.leaves(streamed), jax.tree.leaves(held)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=2e-5)
  rows = json.loads((train_corpus / 'manifest.json').read_text())['rows']
  assert train.read_summary(workdir / 'students' / 'bert1_tmkd_stage1')['steps'] == -(-rows // 16)  # batch 16


def test_corpus_scoring_resumes_by_shard(in_memory_run, train_corpus, tmp_path, xla_cache):
  """A lost shard of the store is recomputed alone; the other shards' files are not rewritten."""
  workdir = tmp_path / 'resume'
  flags = [*STAGE1, f'--shared_dir={in_memory_run}', f'--unlabelled_corpus={train_corpus}', '--stages=logits']
  proc = run_pipeline(workdir, *flags, cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  folder = in_memory_run / 'logits' / 'teacher_1.corpus'
  kept = {p: p.stat().st_mtime_ns for p in folder.glob('shard-*/logits.npy')}
  lost = folder / 'shard-00002-of-00004'
  before = np.load(lost / 'logits.npy')
  for f in lost.iterdir():
    f.unlink()
  lost.rmdir()
  proc = run_pipeline(workdir, *flags, cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert 'teacher_1: scored 1 of 4 corpus shards' in proc.stderr
  assert 'teacher_0: scored' not in proc.stderr
  np.testing.assert_allclose(np.load(lost / 'logits.npy'), before, atol=1e-6)
  assert {p: p.stat().st_mtime_ns for p in kept if p.parent != lost} == {p: t for p, t in kept.items()
                                                                         if p.parent != lost}


def test_pretrain_steps_bound_streamed_stage1(in_memory_run, train_corpus, tmp_path, xla_cache):
  """--pretrain_steps: stage 1 on a corpus runs exactly that many steps, whatever the corpus size."""
  workdir = tmp_path / 'steps'
  proc = run_pipeline(workdir, *STAGE1, f'--shared_dir={in_memory_run}', f'--unlabelled_corpus={train_corpus}',
                      '--stages=logits,pretrain', '--pretrain_steps=7', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert train.read_summary(workdir / 'students' / 'bert1_tmkd_stage1')['steps'] == 7


def test_corpus_flag_combinations_are_refused(tmp_path, train_corpus, xla_cache):
  proc = run_pipeline(tmp_path / 'x', '--methods=tmkd', f'--unlabelled_corpus={train_corpus}', cache=xla_cache)
  assert proc.returncode == 2 and '--unlabelled_corpus replaces the in-memory stage-1 set' in proc.stderr
  proc = run_pipeline(tmp_path / 'y', '--methods=mkdm', '--unlabelled_extra=0', f'--unlabelled_corpus={train_corpus}',
                      cache=xla_cache)
  assert proc.returncode == 2 and 'holds first-stage pairs, and --methods has no two-stage method (tmkd, tkd, tkd_ensemble)' in proc.stderr


def test_two_processes_score_and_train_as_one(in_memory_run, train_corpus, tmp_path, xla_cache):
  """run.py in 2 processes joined by jax.distributed: each scores its own corpus shards (the store equals
  the single-process teachers' logits row for row) and feeds its half of every stage-1 batch (the same
  parameters as the in-memory single-process stage 1)."""
  shared = tmp_path / 'shared'
  shutil.copytree(in_memory_run, shared, ignore=shutil.ignore_patterns('*.corpus', 'students', '.lock'))
  port = free_port()
  flags = [*STAGE1, f'--shared_dir={shared}', f'--unlabelled_corpus={train_corpus}', '--stages=logits,pretrain',
           '--distributed', f'--coordinator_address=127.0.0.1:{port}', '--num_processes=2']
  cmd = lambda i: [sys.executable, str(REPO / 'experiments' / 'run.py'), f'--flagfile={CI_TINY}',
                   f'--workdir={tmp_path / "multi"}', f'--compilation_cache_dir={xla_cache}', *flags,
                   f'--process_id={i}']
  procs = [subprocess.Popen(cmd(i), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                            env={**os.environ, 'JAX_PLATFORMS': 'cpu'}) for i in range(2)]
  errors = [p.communicate(timeout=900)[1] for p in procs]
  # Both logs on failure: when one process fails, the other usually dies later waiting for it.
  assert [p.returncode for p in procs] == [0, 0], '\n'.join(f'process {i}:\n{err[-4000:]}' for i, err in enumerate(errors))
  assert 'scored 2 of 4 corpus shards in this process' in errors[0]
  assert 'scored 2 of 4 corpus shards in this process' in errors[1]
  for t in range(3):
    logits, ids = stored_logits(shared, f'teacher_{t}.corpus')
    expected, expected_ids = stored_logits(in_memory_run, f'teacher_{t}.train')
    np.testing.assert_array_equal(ids, expected_ids)
    np.testing.assert_allclose(logits, expected, atol=1e-5)
  multi, _ = train.load_final(tmp_path / 'multi' / 'students' / 'bert1_tmkd_stage1')
  held, _ = train.load_final(in_memory_run / 'students' / 'bert1_tmkd_stage1')
  for a, b in zip(jax.tree.leaves(multi), jax.tree.leaves(held)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-4)


def free_port():
  with socket.socket() as s:
    s.bind(('127.0.0.1', 0))
    return s.getsockname()[1]
