"""experiments/factors.py on ci_tiny: two variants of a one-seed study and how the second moves mkdm - kd_single
(the library without processes: tests/test_studies.py)."""
import json
import os
import subprocess
import sys

import pytest

from conftest import CI_TINY, REPO

COMMON = ['--student=bert1', '--seeds=0', '--pair=mkdm:kd_single,mkdm:student_scratch',
          '--variant=reference:', '--variant=alpha=0.9:--alpha=0.9']
RUN_FLAGS = ['--', '--methods=student_scratch,kd_single,mkdm', '--num_teachers=2']

pytestmark = pytest.mark.slow  # every test starts factors.py, and the variants train


def run_factors(*args):
  # --allow_dirty: these runs work from a developer's modified tree too (test_studies checks the refusal).
  return subprocess.run([sys.executable, str(REPO / 'experiments' / 'factors.py'), '--allow_dirty', *args],
                        capture_output=True, text=True, cwd=REPO, timeout=900, env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


def test_variants_and_the_change_of_the_difference(tmp_path, xla_cache):
  root = tmp_path / 'factors'
  proc = run_factors(f'--base_flagfile={CI_TINY}', f'--workdir={root}', *COMMON, *RUN_FLAGS,
                     f'--compilation_cache_dir={xla_cache}')
  assert proc.returncode == 0, proc.stderr[-5000:]
  report = json.loads((root / 'factors.json').read_text())
  assert [v['name'] for v in report['variants']] == ['reference', 'alpha=0.9']
  studies = {name: json.loads((root / name / 'study.json').read_text()) for name in ('reference', 'alpha=0.9')}
  assert studies['alpha=0.9']['config']['alpha'] == 0.9 and studies['reference']['config']['alpha'] == 0.5
  assert (root / 'records' / 'alpha=0.9' / 'bert1_seed0.json').exists()
  differences = {}
  for variant in report['variants']:
    study = studies[variant['name']]
    maps = {r['method']: r['metrics']['map']['mean'] for r in study['summary'] if r['student']}
    assert variant['teacher_disagreement'] == study['teacher_diversity']['dev']['disagreement']
    assert [(t['a'], t['b']) for t in variant['pairs']] == [('mkdm', 'kd_single'), ('mkdm', 'student_scratch')]
    for t in variant['pairs']:
      # One seed: the mean over questions of the AP difference is the MAP difference (APs kept to 6 decimals).
      assert t['mean_difference'] == pytest.approx(maps[t['a']] - maps[t['b']], abs=1e-6)
      assert t['ci_low'] <= t['mean_difference'] <= t['ci_high']
      differences[variant['name'], t['b']] = t['mean_difference']
  for t in report['variants'][1]['pairs']:
    assert t['change']['mean_difference'] == pytest.approx(
        differences['alpha=0.9', t['b']] - differences['reference', t['b']], abs=1e-12)
  assert all('change' not in t for t in report['variants'][0]['pairs'])
  table = (root / 'factors.md').read_text()
  change = report['variants'][1]['pairs'][0]['change']
  assert "| alpha=0.9 | `--alpha=0.9` | 1 |" in table and f"{change['mean_difference']:+.4f}" in table

  # --report_only trains nothing and lists a variant without records as not run; the others are reported as before.
  proc = run_factors(f'--base_flagfile={CI_TINY}', f'--workdir={root}', *COMMON, '--variant=T=4:--temperature=4',
                     '--report_only', *RUN_FLAGS)
  assert proc.returncode == 0, proc.stderr[-5000:]
  partial = json.loads((root / 'factors.json').read_text())
  assert partial['not_run'] == ['T=4'] and not (root / 'records' / 'T=4').exists()
  assert [v['pairs'] for v in partial['variants']] == [v['pairs'] for v in report['variants']]
  assert 'Not run yet (no records): `T=4`.' in (root / 'factors.md').read_text()


@pytest.mark.parametrize('variants,message', [
    (['--variant=only:'], 'at least two --variant'),
    (['--variant=a:', '--variant=a:--alpha=0.2'], 'each name once'),
    (['--variant=a:', '--variant=b:alpha=0.2'], "'alpha=0.2' is not a --flag"),
    (['--variant=a:', '--variant=no name:--alpha=0.2'], 'expected NAME:FLAGS'),
    (['--variant=a:', '--variant=b:--student_seed=1'], '--student_seed is set by factors.py itself'),
])
def test_bad_variants_are_one_error_line(tmp_path, variants, message):
  proc = run_factors(f'--base_flagfile={CI_TINY}', f'--workdir={tmp_path / "f"}', *variants)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr, proc.stderr[-3000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last
