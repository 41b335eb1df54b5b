"""experiments/study.py end to end on ci_tiny (one student architecture, two teachers), as the user runs it
(the library without processes: tests/test_studies.py)."""
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from conftest import CI_TINY, REPO
from mkdm_jax import stats
from mkdm_jax.studies import records

STUDY = ['--', '--methods=student_scratch,kd_single,mkdm', '--students=bert1', '--num_teachers=2']
TESTED = [('mkdm', 'kd_single'), ('mkdm', 'student_scratch'), ('kd_single', 'student_scratch')]

pytestmark = pytest.mark.slow  # every test starts study.py, and the study trains


def run_study(*args):
  # --allow_dirty: these runs work from a developer's modified tree too (test_studies checks the refusal).
  return subprocess.run([sys.executable, str(REPO / 'experiments' / 'study.py'), '--allow_dirty', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.fixture(scope='module')
def study(tmp_path_factory, xla_cache):
  """A one-seed study, then the same study extended to seeds 0,1 (as a later session would):
  (root, the first study.json)."""
  root = tmp_path_factory.mktemp('study')
  common = [f'--base_flagfile={CI_TINY}', f'--workdir={root}', *STUDY, f'--compilation_cache_dir={xla_cache}']
  for seeds in ('0', '0,1'):
    proc = run_study(f'--seeds={seeds}', *common)
    assert proc.returncode == 0, proc.stderr[-5000:]
    if seeds == '0':
      first = json.loads((root / 'study.json').read_text())
  return root, first


def results_of(root, seed):
  return json.loads((root / 'bert1' / f'seed_{seed}' / 'results.json').read_text())


def test_study_json_holds_every_seeds_results_and_their_mean_and_std(study):
  root, _ = study
  report = json.loads((root / 'study.json').read_text())
  assert report['seeds'] == [0, 1] and report['metric'] == 'map' and report['students'] == ['bert1']
  assert report['provenance']['commit'] and report['config']['num_teachers'] == 2 and report['missing'] == []
  results = [results_of(root, seed) for seed in (0, 1)]
  for seed, run, res in zip((0, 1), report['runs'], results):
    assert (run['student'], run['seed']) == ('bert1', seed) and res['config']['student_seed'] == seed
    assert res['config']['shared_dir'] == str(root / 'shared') and res['config']['students'] == ['bert1']
    assert run['rows'] == [{k: r.get(k) for k in records.ROW_FIELDS} for r in res['rows']]
    # Multi-head rows keep what the collapse analysis needs (per-head metrics, head and teacher agreement).
    for row in (r for r in run['rows'] if r['method'] == 'mkdm'):
      assert 'head0/map' in row['head_metrics'] and row['head_agreement'] is not None
    assert all(r['train_seconds'] > 0 for r in run['rows'] if r['student'])
    assert run['provenance'] == res['provenance']
  names = [r['name'] for r in results[0]['rows']]
  assert names == ['teacher_0', 'teacher_1', 'teacher_ensemble', 'bert1_student_scratch', 'bert1_kd_single',
                   'bert1_mkdm']
  assert [s['name'] for s in report['summary']] == names
  for summary, row0, row1 in zip(report['summary'], results[0]['rows'], results[1]['rows']):
    for key in ('metrics', 'dev_metrics'):
      assert set(summary[key]) == set(row0[key])
      for metric, value in summary[key].items():
        a, b = row0[key][metric], row1[key][metric]
        if summary['student'] is None:  # teachers are shared by the seeds: reported once, as they are
          assert summary['seeds'] is None and a == b and value == {'mean': a, 'std': None}
        else:
          assert summary['seeds'] == 2
          assert value['mean'] == pytest.approx((a + b) / 2, abs=1e-12)
          assert value['std'] == pytest.approx(abs(a - b) / np.sqrt(2), abs=1e-12)  # ddof=1 of two values


def test_records_hold_each_questions_scores(study):
  root, _ = study
  record = json.loads((root / 'records' / 'bert1_seed1.json').read_text())
  assert record['settings']['student_seed'] == 1 and record['settings']['students'] == ['bert1']
  assert 'workdir' not in record['settings']
  rows = {r['name']: r for r in results_of(root, 1)['rows']}
  for metric in ('map', 'mrr'):
    for name, scores in record['question_scores'][metric].items():
      assert len(scores) == len(record['questions'])
      assert np.mean(scores) == pytest.approx(rows[name]['metrics'][metric], abs=1e-6)  # stored to 6 decimals


def test_paired_tests_over_questions(study):
  root, _ = study
  report = json.loads((root / 'study.json').read_text())
  tests = report['tests']
  assert [(t['student'], t['a'], t['b']) for t in tests] == [('bert1', a, b) for a, b in TESTED]
  assert report['skipped_pairs'] == ['mkdm:kd_ensemble (kd_ensemble not in --methods)',
                                     'tmkd:mkdm (tmkd not in --methods)',
                                     'tmkd:student_scratch (tmkd not in --methods)',
                                     'kd_ensemble:student_scratch (kd_ensemble not in --methods)']
  maps = [{r['method']: r['metrics']['map'] for r in results_of(root, seed)['rows'] if r['student']}
          for seed in (0, 1)]
  assert all(t['seeds'] == 2 for t in tests)
  for t in tests:
    # Each question's AP averaged over seeds, then over questions: the mean over seeds of the MAP difference.
    assert t['mean_difference'] == pytest.approx(np.mean([m[t['a']] - m[t['b']] for m in maps]), abs=1e-6)
    assert t['ci_low'] <= t['mean_difference'] <= t['ci_high']
    assert 0 < t['p_value'] <= t['p_holm'] <= 1
    assert t['mde'] >= 0 and t['questions'] == tests[0]['questions'] > 1
  assert [t['p_holm'] for t in tests] == pytest.approx(stats.holm([t['p_value'] for t in tests]))


def test_table_and_plot_carry_the_numbers_and_provenance(study):
  root, _ = study
  report = json.loads((root / 'study.json').read_text())
  table = (root / 'study.md').read_text()
  scratch = next(s for s in report['summary'] if s['name'] == 'bert1_student_scratch')['metrics']['map']
  assert f"{scratch['mean']:.4f} ± {scratch['std']:.4f}" in table
  assert '| teacher_ensemble | teacher_ensemble | - | - |' in table and 'Runs: bert1 seeds 0, 1.' in table
  dev = report['teacher_diversity']['dev']
  assert dev == results_of(root, 0)['teacher_diversity']['dev']
  assert f"dev: disagreement {dev['disagreement']:.4f}, symmetric KL {dev['symmetric_kl']:.4f}" in table
  for t in report['tests']:
    assert (f"| bert1 | {t['a']} - {t['b']} | 2 | {t['questions']} | {t['mean_difference']:+.4f} | "
            f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {t['p_value']:.4f} | {t['p_holm']:.4f} |") in table
  assert 'Skipped: mkdm:kd_ensemble' in table and report['provenance']['commit'][:12] in table
  with Image.open(root / 'study_map.png') as image:
    assert image.format == 'PNG' and image.size[0] > 300 and image.size[1] > 200
    assert json.loads(image.info['Description']) == report['provenance']
    image.verify()


def test_a_later_session_extends_the_study_reusing_teachers_and_finished_seeds(study):
  root, first = study
  assert first['seeds'] == [0] and all(s['metrics']['map']['std'] is None for s in first['summary'])
  assert not (root / 'bert1' / 'seed_0' / 'teachers').exists() and not (root / 'bert1' / 'seed_1' / 'teachers').exists()
  assert sorted(p.name for p in (root / 'shared' / 'teachers').iterdir()) == ['teacher_0', 'teacher_1']
  log = (root / 'bert1' / 'seed_0' / 'run.log').read_text()
  assert 'bert1_mkdm: trained in' in log  # seed 0 ran once: the second session read its record
  seed_1 = (root / 'bert1' / 'seed_1' / 'run.log').read_text()
  assert 'teacher_0: already trained, skipping' in seed_1 and 'bert1_mkdm: trained in' in seed_1


def test_records_alone_rebuild_the_report_in_another_session(study, tmp_path):
  """What a later session on a new machine has: the committed records, no work directories."""
  root, _ = study
  records = tmp_path / 'records'
  shutil.copytree(root / 'records', records)
  args = [f'--base_flagfile={CI_TINY}', f'--workdir={tmp_path / "new"}', f'--records={records}', *STUDY]
  proc = run_study('--seeds=0,1,2', '--report_only', *args)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report, before = (json.loads(p.read_text()) for p in (tmp_path / 'new' / 'study.json', root / 'study.json'))
  assert report['summary'] == before['summary'] and report['missing'] == [['bert1', 2]]
  assert [{k: t[k] for k in ('a', 'b', 'mean_difference', 'ci_low', 'ci_high')} for t in report['tests']] == \
      [{k: t[k] for k in ('a', 'b', 'mean_difference', 'ci_low', 'ci_high')} for t in before['tests']]
  assert 'Not yet run: bert1 seed 2.' in (tmp_path / 'new' / 'study.md').read_text()
  assert not (tmp_path / 'new' / 'bert1').exists()  # nothing trained
  # A record made with other settings is refused, naming the setting.
  proc = run_study('--seeds=0,1', '--report_only', *args, '--alpha=0.9')
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert 'bert1_seed0.json: recorded with other settings (alpha: recorded 0.5, now 0.9)' in proc.stderr
  proc = run_study('--seeds=5', '--report_only', *args)
  assert proc.returncode == 2 and 'no finished run is recorded' in proc.stderr


@pytest.mark.parametrize('args,message', [
    (['--base_flagfile=no/such.flags'], '--base_flagfile=no/such.flags: no such file'),
    (['--seeds=0,x'], '--seeds=0,x: expected distinct non-negative integers'),
    (['--pairs=mkdm:nope'], "unknown method 'nope'"),
    (['--', '--student_seed=3'], '--student_seed is set by study.py itself'),
])
def test_bad_input_is_one_error_line(tmp_path, args, message):
  proc = run_study(f'--base_flagfile={CI_TINY}', f'--workdir={tmp_path / "study"}', *args)
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last
  assert not (tmp_path / 'study').exists()
