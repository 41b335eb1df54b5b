"""End to end: experiments/run.py with ci_tiny.flags; results.json content, saved model folders, reruns."""
import json
import platform
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from conftest import REPO, run_pipeline
from mkdm_jax import data as data_lib
from mkdm_jax.train.loop import logged_speed
from mkdm_jax import metrics
from mkdm_jax.teachers import scores as teacher_scores

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline

METHODS = {'student_scratch', 'kd_single', 'kd_ensemble', 'mkdm', 'tmkd'}
WIKIQA_METRICS = {'accuracy', 'f1', 'auc', 'map', 'mrr', 'accuracy_at_threshold', 'f1_at_threshold'}


def results_of(workdir):
  return json.loads((workdir / 'results.json').read_text())


def test_results_json_content_with_every_method(ci_tiny_run):
  workdir, _ = ci_tiny_run
  results = results_of(workdir)
  assert results['task'] == 'wikiqa' and results['split'] == 'test' and results['primary_metric'] == 'map'
  provenance = results['provenance']
  assert re.fullmatch(r'[0-9a-f]{40}(\+dirty)?', provenance['commit'])
  assert {'jax', 'flax', 'optax', 'transformers'} <= set(provenance['versions'])
  assert provenance['cpu_model'] and provenance['date'].startswith('20')
  assert results['config']['num_teachers'] == 3
  rows = results['rows']
  for row in rows:
    assert set(row) >= {'name', 'method', 'student', 'params', 'examples_per_sec', 'metrics', 'threshold'}
    assert isinstance(row['params'], int) and row['params'] > 0 and row['examples_per_sec'] > 0
    assert set(row['metrics']) == WIKIQA_METRICS
    assert all(0.0 <= v <= 1.0 for v in row['metrics'].values())
  teachers = [r for r in rows if r['method'] == 'teacher']
  assert [r['name'] for r in teachers] == ['teacher_0', 'teacher_1', 'teacher_2']
  assert all(r['checkpoint'] == 'random' for r in teachers)
  ensemble = next(r for r in rows if r['method'] == 'teacher_ensemble')
  # Measured, not derived: running three teachers is slower than running any one of them.
  assert ensemble['examples_per_sec'] < min(r['examples_per_sec'] for r in teachers)
  for student in ('bert1', 'bilstm'):
    assert {r['method'] for r in rows if r['student'] == student} == METHODS
  mkdm = next(r for r in rows if r['name'] == 'bert1_mkdm')
  assert {f'head{h}/map' for h in range(3)} <= set(mkdm['head_metrics'])  # one head per teacher
  assert mkdm['combine_weights'] == pytest.approx([1 / 3] * 3)
  assert 'head0/map' not in next(r for r in rows if r['name'] == 'bert1_kd_single')['head_metrics']
  # Head collapse on dev: Kendall tau of the heads' rankings beside the teachers' (multi-head students only).
  assert -1 <= mkdm['head_agreement'] <= 1 and -1 <= mkdm['teacher_agreement'] <= 1
  assert 'head_agreement' not in next(r for r in rows if r['name'] == 'bert1_kd_single')
  # --extra_eval=squad:dev:100: every student row has SQuAD dev metrics, the teachers' rows none.
  for row in rows:
    if row['student']:
      assert 0 <= row['extra_metrics']['squad_dev']['map'] <= 1, row['name']
    else:
      assert 'extra_metrics' not in row
  # Training wall time of every trained model (the cost table of a study); TMKD's stage 1 apart.
  assert all(r['train_seconds'] > 0 for r in rows if r['method'] != 'teacher_ensemble')
  tmkd = next(r for r in rows if r['name'] == 'bert1_tmkd')
  stage1 = json.loads((workdir / 'students' / 'bert1_tmkd_stage1' / 'model.json').read_text())
  assert tmkd['pretrain_seconds'] == stage1['train_seconds'] > 0
  # and the median logged training examples/s of each stage (the stage 1's from its own metrics.jsonl).
  assert all(r['train_examples_per_sec'] > 0 for r in rows if r['student'])
  assert tmkd['pretrain_examples_per_sec'] == stage1['train_examples_per_sec'] == logged_speed(
      workdir / 'students' / 'bert1_tmkd_stage1' / 'metrics.jsonl') > 0
  table = (workdir / 'results.md').read_text()
  assert 'bert1_tmkd' in table and 'speedup' in table and provenance['cpu_model'] in table


def test_probabilities_by_row_reproduce_the_metrics(ci_tiny_run):
  """eval/probabilities.npz holds every model's scores by row key; they give the reported metrics."""
  from mkdm_jax import data, metrics
  workdir, _ = ci_tiny_run
  saved = np.load(workdir / 'eval' / 'probabilities.npz')
  test = data.load_split('wikiqa', 'test', max_rows=150)
  assert saved['eval/ids'].tolist() == test.ids.tolist()
  for row in results_of(workdir)['rows']:
    probs = saved[f'eval/{row["name"]}']
    expected = metrics.compute(['map', 'mrr'], test.labels, probs, test.groups)
    assert expected == pytest.approx({k: row['metrics'][k] for k in ('map', 'mrr')}, abs=1e-9), row['name']
    assert set(row['dev_metrics']) == WIKIQA_METRICS and f'dev/{row["name"]}' in saved.files


def test_saved_students_are_what_the_methods_say(ci_tiny_run):
  workdir, _ = ci_tiny_run
  for arch in ('bert1', 'bilstm'):
    for method, heads in [('student_scratch', 1), ('kd_single', 1), ('kd_ensemble', 1), ('mkdm', 3),
                          ('tmkd', 3)]:
      spec = json.loads((workdir / 'students' / f'{arch}_{method}' / 'model.json').read_text())
      assert spec['num_heads'] == heads and spec['combine_weights'] == pytest.approx([1 / heads] * heads)
      assert spec['dtype'] == 'float32' and isinstance(spec['threshold'], float)
      settings = json.loads((workdir / 'students' / f'{arch}_{method}' / 'settings.json').read_text())
      assert len(settings['teachers']) == {'student_scratch': 0, 'kd_single': 1}.get(method, 3)
      assert ('alpha' in settings) == (method != 'student_scratch')


def logged(run_dir, key):
  return [m[key] for m in map(json.loads, (run_dir / 'metrics.jsonl').read_text().splitlines())
          if m['kind'] == 'train']


def test_soft_terms_fall_during_distillation(ci_tiny_run):
  workdir, _ = ci_tiny_run
  for run in ('bert1_mkdm', 'bert1_kd_ensemble', 'bert1_tmkd_stage1'):
    soft = logged(workdir / 'students' / run, 'soft')
    assert len(soft) >= 2 and soft[-1] < soft[0], (run, soft)
  assert 'soft' not in json.loads((workdir / 'students' / 'bert1_student_scratch' / 'metrics.jsonl')
                                  .read_text().splitlines()[0])


def test_results_equal_evaluate_py_on_the_saved_student(ci_tiny_run):
  workdir, _ = ci_tiny_run
  expected = next(r for r in results_of(workdir)['rows'] if r['name'] == 'bert1_mkdm')
  proc = subprocess.run([sys.executable, str(REPO / 'experiments' / 'evaluate.py'),
                         f'--model={workdir / "students" / "bert1_mkdm"}', '--split=test', '--max_rows=150',
                         '--batch_size=64'], capture_output=True, text=True, cwd=REPO, check=True)
  report = json.loads(proc.stdout)
  assert report['threshold'] == expected['threshold']
  assert report['metrics'] == pytest.approx(expected['metrics'], abs=1e-6)
  assert report['head_metrics'] == pytest.approx(expected['head_metrics'], abs=1e-6)


def test_run_keeps_freed_memory_by_default(ci_tiny_run):
  _, proc = ci_tiny_run
  expected = ('glibc keeps freed memory' if platform.libc_ver()[0] == 'glibc'
              else '--malloc=keep needs glibc')
  assert expected in proc.stderr


def test_rerun_skips_finished_stages_and_keeps_results(ci_tiny_run, xla_cache):
  workdir, _ = ci_tiny_run
  before = results_of(workdir)['rows']
  proc = run_pipeline(workdir, '--stages=teachers,logits,pretrain,distill', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('already trained, skipping') == 3 + 2 * 6  # teachers + 2 x (5 methods + stage 1)
  assert results_of(workdir)['rows'] == before
  assert len(list((workdir / 'history').glob('*-config.json'))) >= 1


def test_logits_stage_predicts_rows_shared_between_sets_once(ci_tiny_run):
  _, proc = ci_tiny_run
  # TMKD's unlabelled set is every train pair without its label plus --unlabelled_extra=100 new pairs.
  train_rows = int(re.search(r'train: (\d+) rows', proc.stderr).group(1))
  for t in range(3):
    assert f'teacher_{t}.train: {train_rows} new rows, 0 reused from earlier sets' in proc.stderr
    assert f'teacher_{t}.unlabelled: 100 new rows, {train_rows} reused from earlier sets' in proc.stderr


@pytest.fixture
def run_copy(ci_tiny_run, tmp_path):
  """A private copy of the finished ci_tiny work directory (reruns here leave the shared one alone)."""
  copy = tmp_path / 'run'
  shutil.copytree(ci_tiny_run[0], copy)
  return copy


def test_rerun_with_changed_flags_stops_before_any_work(run_copy, xla_cache):
  before = results_of(run_copy)
  proc = run_pipeline(run_copy, '--alpha=0.9', '--teacher_epochs=2', cache=xla_cache)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  error = proc.stderr[proc.stderr.index('error:'):]
  assert 'teacher_epochs: 1.0 -> 2.0' in error and 'alpha: 0.5 -> 0.9' in error
  assert 'teacher_2' in error and 'bilstm_tmkd_stage1' in error and '--overwrite' in error
  assert 'bert1_student_scratch' not in error  # alpha does not change a student without teachers
  assert results_of(run_copy) == before
  assert 'trained in' not in proc.stderr


def test_student_seed_reuses_teachers_and_overwrite_retrains_only_stale_runs(run_copy, xla_cache):
  teacher_done = (run_copy / 'teachers' / 'teacher_0' / 'DONE.json').stat().st_mtime
  other_done = (run_copy / 'students' / 'bilstm_mkdm' / 'DONE.json').stat().st_mtime
  flags = ['--student_seed=1', '--students=bert1', '--methods=student_scratch', '--stages=teachers,logits,distill']
  runs_before = len(list((run_copy / 'history').glob('*-config.json')))
  proc = run_pipeline(run_copy, *flags, cache=xla_cache)
  assert proc.returncode == 2 and 'student_seed: 0 -> 1' in proc.stderr, proc.stderr[-3000:]
  proc = run_pipeline(run_copy, *flags, '--overwrite', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stderr.count('already trained, skipping') == 3  # the teachers
  assert 'bert1_student_scratch: trained in' in proc.stderr
  assert (run_copy / 'teachers' / 'teacher_0' / 'DONE.json').stat().st_mtime == teacher_done
  assert (run_copy / 'students' / 'bilstm_mkdm' / 'DONE.json').stat().st_mtime == other_done
  settings = json.loads((run_copy / 'students' / 'bert1_student_scratch' / 'settings.json').read_text())
  assert settings['student_seed'] == 1
  # The refused run recorded nothing; the accepted one added its config to the history.
  assert len(list((run_copy / 'history').glob('*-config.json'))) == runs_before + 1


def test_eval_split_without_labels_is_a_clear_error(tmp_path, xla_cache):
  unlabelled = tmp_path / 'pairs.tsv'
  unlabelled.write_text('question\tpassage\tqid\n' + ''.join(f'q{i}\tp{i}\tQ{i % 3}\n' for i in range(12)))
  proc = run_pipeline(tmp_path / 'w', f'--eval_split={unlabelled}', '--task=tsv', f'--train_split={unlabelled}',
                      '--text_a_col=question', '--text_b_col=passage', '--group_col=qid', '--dev_split=none',
                      cache=xla_cache)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  assert f'--eval_split={unlabelled}' in proc.stderr and 'has no labels' in proc.stderr
  assert not (tmp_path / 'w' / 'teachers').exists()


def test_learned_head_combination_is_fitted_on_dev_and_saved(tmp_path, xla_cache):
  workdir = tmp_path / 'learned'
  proc = run_pipeline(workdir, '--head_combine=learned', '--methods=mkdm', '--students=bert1',
                      '--num_teachers=2', '--stages=teachers,logits,distill', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  spec = json.loads((workdir / 'students' / 'bert1_mkdm' / 'model.json').read_text())
  weights = np.array(spec['combine_weights'])
  assert spec['combine'] == 'learned' and weights.sum() == pytest.approx(1.0)
  assert np.abs(weights - 0.5).max() > 1e-3  # fitted, not left uniform
  assert 'head weights fitted on dev' in proc.stderr


def test_exported_teacher_logits_replace_the_teachers(run_copy, xla_cache, tmp_path):
  """--export_teacher_logits writes the stored logits of every row; a run reading them as scores: teachers
  reports the same teacher metrics with no teacher weights."""
  out = tmp_path / 'exported'
  proc = run_pipeline(run_copy, '--stages=logits', f'--export_teacher_logits={out}', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  store = data_lib.LogitStore(run_copy / 'logits')
  stored = {}
  for part in (run_copy / 'logits').glob('teacher_0.*'):
    logits, ids = store.read(part.name, json.loads((part / 'manifest.json').read_text())['manifest'])
    stored.update(zip(ids.tolist(), logits.tolist()))
  keys, values = teacher_scores.read_scores(out / 'teacher_0.tsv.gz', 2)
  assert sorted(keys.tolist()) == sorted(stored)  # every row of every set, once
  np.testing.assert_array_equal(values, [stored[k] for k in keys.tolist()])  # float32 exactly

  imported = tmp_path / 'imported'
  specs = ','.join(f'scores:{out}/teacher_{t}.tsv.gz' for t in range(3))
  proc = run_pipeline(imported, f'--teacher_checkpoints={specs}', '--students=', '--stages=logits,evaluate,report',
                      cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not (imported / 'teachers').exists()
  before = {r['name']: r for r in results_of(run_copy)['rows'] if r['student'] is None}
  after = {r['name']: r for r in results_of(imported)['rows']}
  assert set(after) == set(before) == {'teacher_0', 'teacher_1', 'teacher_2', 'teacher_ensemble'}
  for name, row in after.items():
    for key in ('metrics', 'dev_metrics'):
      assert row[key] == before[name][key], (name, key)


def test_teacher_diversity_is_computed_from_the_stored_logits(ci_tiny_run):
  workdir, _ = ci_tiny_run
  results = results_of(workdir)
  store = data_lib.LogitStore(workdir / 'logits')
  for split, dataset in (('dev', 'dev'), ('eval', 'eval')):
    logits = []
    for t in range(3):
      part = workdir / 'logits' / f'teacher_{t}.{dataset}'
      logits.append(store.read(part.name, json.loads((part / 'manifest.json').read_text())['manifest'])[0])
    expected = metrics.teacher_diversity(np.stack(logits, axis=1))
    assert results['teacher_diversity'][split] == pytest.approx(expected, abs=1e-12)
    assert 0 < expected['symmetric_kl']


def test_a_first_stage_is_trained_once_for_its_settings_and_teachers(tmp_path, xla_cache):
  """--stage1_cache: another work directory whose tkd differs only in a stage-2 setting copies the finished first
  stage (the same parameters, not trained again, no resumable checkpoints copied); a stage-1 setting trains a new
  one beside it."""
  from mkdm_jax import train
  cache = tmp_path / 'stage1'
  common = ['--methods=tkd', '--students=bert1', '--unlabelled_extra=0', f'--shared_dir={tmp_path / "shared"}',
            f'--stage1_cache={cache}', '--stages=teachers,logits,pretrain,distill']
  first = run_pipeline(tmp_path / 'a', *common, cache=xla_cache)
  assert first.returncode == 0, first.stderr[-5000:]
  (entry,) = cache.iterdir()
  assert entry.name.startswith('bert1_') and not (entry / 'ckpt').exists()
  second = run_pipeline(tmp_path / 'b', *common, '--student_epochs=2', cache=xla_cache)
  assert second.returncode == 0, second.stderr[-5000:]
  assert 'first stage copied from' in second.stderr
  copied, trained = (tmp_path / d / 'students' / 'bert1_tkd_stage1' for d in ('b', 'a'))
  for x, y in zip(*(jax_leaves(train.load_final(d)[0]) for d in (copied, trained))):
    np.testing.assert_array_equal(x, y)
  assert train.is_complete(tmp_path / 'b' / 'students' / 'bert1_tkd') and not (copied / 'ckpt').exists()
  third = run_pipeline(tmp_path / 'c', *common, '--pretrain_epochs=2', cache=xla_cache)
  assert third.returncode == 0, third.stderr[-5000:]
  assert 'first stage copied from' not in third.stderr and len(list(cache.iterdir())) == 2


def jax_leaves(params):
  import jax
  return [np.asarray(leaf) for leaf in jax.tree.leaves(params)]
