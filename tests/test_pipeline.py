"""End to end: experiments/run.py with ci_tiny.flags, results.json schema, reruns that skip work."""
import json
import platform
import re

from conftest import run_pipeline

METHODS = {'student_scratch', 'kd_single', 'kd_ensemble', 'mkdm', 'tmkd'}
WIKIQA_METRICS = {'accuracy', 'f1', 'auc', 'map', 'mrr'}


def test_results_json_schema_with_every_method(ci_tiny_run):
  workdir, _ = ci_tiny_run
  results = json.loads((workdir / 'results.json').read_text())
  assert results['task'] == 'wikiqa' and results['split'] == 'test' and results['primary_metric'] == 'map'
  rows = results['rows']
  for row in rows:
    assert set(row) >= {'name', 'method', 'student', 'params', 'examples_per_sec', 'metrics'}
    assert isinstance(row['params'], int) and row['params'] > 0
    assert row['examples_per_sec'] > 0
    assert set(row['metrics']) == WIKIQA_METRICS
    assert all(0.0 <= v <= 1.0 for v in row['metrics'].values())
  assert {r['name'] for r in rows if r['method'] == 'teacher'} == {'teacher_0', 'teacher_1', 'teacher_2'}
  assert sum(r['method'] == 'teacher_ensemble' for r in rows) == 1
  for student in ('bert1', 'bilstm'):
    assert {r['method'] for r in rows if r['student'] == student} == METHODS
  mkdm = next(r for r in rows if r['name'] == 'bert1_mkdm')
  assert {f'head{h}/map' for h in range(3)} <= set(mkdm['head_metrics'])  # one head per teacher
  table = (workdir / 'results.md').read_text()
  assert 'bert1_tmkd' in table and 'speedup' in table


def test_run_keeps_freed_memory_by_default(ci_tiny_run):
  _, proc = ci_tiny_run
  expected = ('glibc keeps freed memory' if platform.libc_ver()[0] == 'glibc'
              else '--malloc=keep needs glibc')
  assert expected in proc.stderr


def test_rerun_skips_finished_stages_and_keeps_results(ci_tiny_run, xla_cache):
  workdir, _ = ci_tiny_run
  before = json.loads((workdir / 'results.json').read_text())
  proc = run_pipeline(workdir, '--stages=teachers,logits,pretrain,distill', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('already trained, skipping') == 3 + 2 * 6  # teachers + 2 x (5 methods + stage 1)
  after = json.loads((workdir / 'results.json').read_text())
  assert before == after


def test_logits_stage_predicts_rows_shared_between_sets_once(ci_tiny_run):
  _, proc = ci_tiny_run
  # TMKD's unlabelled set is every train pair without its label plus --unlabelled_extra=100 new pairs.
  train_rows = int(re.search(r'train: (\d+) rows', proc.stderr).group(1))
  for t in range(3):
    assert f'teacher_{t}.train: predicting {train_rows} rows, 0 reused' in proc.stderr
    assert f'teacher_{t}.unlabelled: predicting 100 rows, {train_rows} reused' in proc.stderr
