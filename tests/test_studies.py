"""mkdm_jax.studies without training or processes: variants, records, summaries, paired tests, tables, and a
study and a factor analysis reported from hand-made records (runs replaced by a fake runner)."""
import dataclasses
import json
import pathlib
import re
import types

import numpy as np
import pytest

from mkdm_jax import config, stats
from mkdm_jax.data import corpus as data_corpus
from mkdm_jax.errors import UserError
from mkdm_jax.studies import records, runner, summaries, sweeps, tables, variants

METHODS = ('student_scratch', 'kd_single', 'mkdm')
# Per-question AP of bert1 over three questions, seeds 0 and 1, chosen so that the seed means are exact in binary:
# mkdm - kd_single = [0.25, 0.5, 0.75] and mkdm - student_scratch = [0.25, -0.25, 0.75] per question.
QUESTION_AP = {'student_scratch': ([0.5, 1.0, 0.25], [0.5, 1.0, 0.25]),
               'kd_single': ([0.5, 0.25, 0.25], [0.5, 0.25, 0.25]),
               'mkdm': ([0.5, 0.75, 1.0], [1.0, 0.75, 1.0])}
# A teacher's record row: every field a record keeps (records.ROW_FIELDS), most of them None.
TEACHERS = [{**dict.fromkeys(records.ROW_FIELDS), 'name': 'teacher_0', 'method': 'teacher',
             'metrics': {'map': 0.9, 'mrr': 0.95}, 'dev_metrics': {'map': 0.8, 'mrr': 0.85}}]
DIVERSITY = {'dev': {'disagreement': 0.125, 'symmetric_kl': 0.25}}
PROVENANCE = {'commit': '0123456789abcdef', 'cpu_model': 'test cpu', 'backend': 'cpu', 'date': '2026-01-01T00:00:00'}


def base_config(**changes):
  return config.Config(**{'students': ('bert1',), 'methods': METHODS, 'num_teachers': 2, **changes})


def a_study(tmp_path, cfg=None, pairs=(('mkdm', 'kd_single'), ('mkdm', 'student_scratch')), seeds=(0, 1)):
  # allow_dirty: these tests run in a developer's modified tree too (test_a_modified_tree_* checks the refusal).
  return variants.Study(cfg or base_config(), seeds, tmp_path / 'study', tmp_path / 'records', pairs, 'map',
                        'base.flags', ('--students=bert1',), allow_dirty=True)


def a_record(run, teachers=TEACHERS):
  """The record of one study run (a Config from study_runs) with QUESTION_AP's scores."""
  seed = run.student_seed
  scores = {m: QUESTION_AP[m][seed] for m in METHODS}
  rows = teachers + [{'name': f'bert1_{m}', 'method': m, 'student': 'bert1',
                      'metrics': {'map': float(np.mean(scores[m])), 'mrr': 1.0},
                      'dev_metrics': {'map': 0.5 + seed / 4, 'mrr': 1.0}, 'train_seconds': 1.0,
                      'pretrain_seconds': None} for m in METHODS]
  return {'student': 'bert1', 'seed': seed, 'settings': records.run_settings(run), 'provenance': PROVENANCE,
          'rows': rows, 'teacher_diversity': DIVERSITY, 'questions': ['q0', 'q1', 'q2'],
          'question_scores': {'map': {f'bert1_{m}': s for m, s in scores.items()},
                              'mrr': {f'bert1_{m}': s for m, s in scores.items()}}}


def write_records(study):
  for run in variants.study_runs(study):
    records.write_record(records.record_path(study.records, 'bert1', run.student_seed), a_record(run))


# Variants.

def test_study_runs_are_the_config_per_architecture_and_seed(tmp_path):
  study = a_study(tmp_path, base_config(students=('bert1', 'bilstm')))
  runs = variants.study_runs(study)
  assert [(r.students, r.student_seed) for r in runs] == [(('bert1',), 0), (('bert1',), 1), (('bilstm',), 0),
                                                           (('bilstm',), 1)]
  assert runs[1] == dataclasses.replace(study.cfg, students=('bert1',), student_seed=1,
                                        workdir=str(tmp_path / 'study' / 'bert1' / 'seed_1'),
                                        shared_dir=str(tmp_path / 'study' / 'shared'))


def test_flags_after_the_separator_are_typed_settings(tmp_path):
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('# a comment\n--students=bert1,bilstm\n--alpha=0.3\n--noprogress\n')
  study = variants.study(flagfile, ['--alpha=0.7', '--methods=mkdm,kd_single'], seeds=(0,), root=tmp_path / 's',
                         records=tmp_path / 'r', pairs=(('mkdm', 'kd_single'),), metric='mrr')
  assert study.cfg == config.Config(students=('bert1', 'bilstm'), alpha=0.7, progress=False,
                                    methods=('mkdm', 'kd_single'))
  assert study.flags == ('--alpha=0.7', '--methods=mkdm,kd_single') and study.flagfile == str(flagfile)
  bare = variants.study(flagfile, ['--progress', '--noonline_teachers'], seeds=(0,), root=tmp_path / 's',
                        records=tmp_path / 'r', pairs=(), metric='map')
  assert (bare.cfg.progress, bare.cfg.online_teachers) == (True, False)  # bare booleans, as in a flagfile
  for args, message in [(['--student_seed=1'], '--student_seed is set by study.py itself'),
                        (['alpha=0.1'], "the flags after --:1: expected --name=value, got 'alpha=0.1'"),
                        (['--alpha=x'], '--alpha=x: expected a float'),
                        (['--malloc=keep'], "unknown setting(s) ['malloc']"),
                        (['--students='], '--students is empty')]:
    with pytest.raises(UserError, match=re.escape(message)):
      variants.study(flagfile, args, seeds=(0,), root=tmp_path, records=tmp_path, pairs=(), metric='map')
  with pytest.raises(UserError, match='--base_flagfile=nope.flags: no such file'):
    variants.study('nope.flags', [], seeds=(0,), root=tmp_path, records=tmp_path, pairs=(), metric='map')
  with pytest.raises(UserError, match='--metric=auc: choose from'):
    variants.study(flagfile, [], seeds=(0,), root=tmp_path, records=tmp_path, pairs=(), metric='auc')


@pytest.mark.parametrize('values,ok', [(['0', '2'], True), (['0', 'x'], False), (['1', '1'], False),
                                       (['-1'], False), ([], False)])
def test_parse_seeds(values, ok):
  if ok:
    assert variants.parse_seeds(values) == (0, 2)
  else:
    with pytest.raises(UserError, match='expected distinct non-negative integers'):
      variants.parse_seeds(values)


def test_parse_pairs():
  assert variants.parse_pairs(['mkdm:kd_single', 'tmkd:mkdm']) == (('mkdm', 'kd_single'), ('tmkd', 'mkdm'))
  for specs, message in [(['mkdm:nope'], "unknown method 'nope'"), (['mkdm:mkdm'], 'two different methods'),
                         (['mkdm'], 'expected A:B'), (['mkdm:kd_single'] * 2, 'each once')]:
    with pytest.raises(UserError, match=message):
      variants.parse_pairs(specs, 'pair')
  # A merged study's names (method@variant) are checked against its methods later, not here.
  assert variants.parse_pairs(['mkdm@heads:kd_single'], 'study_pairs', known=False) == (('mkdm@heads', 'kd_single'),)
  with pytest.raises(UserError, match='expected A:B'):
    variants.parse_pairs(['mkdm@heads:'], 'study_pairs', known=False)


def test_factor_variants_put_the_variant_flags_last(tmp_path):
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('--alpha=0.3\n')
  out = variants.factor_variants(
      flagfile, ['--alpha=0.4', '--students=bilstm'], [('reference', []), ('alpha=0.9', ['--alpha=0.9'])],
      student='bert1', seeds=(0, 1), root=tmp_path / 'f', records=lambda i, name: tmp_path / 'r' / name,
      pairs=(('mkdm', 'kd_single'),), metric='map')
  assert [(v.name, v.study.cfg.alpha, v.study.cfg.students) for v in out] == [('reference', 0.4, ('bert1',)),
                                                                              ('alpha=0.9', 0.9, ('bert1',))]
  assert out[1].flags == ('--alpha=0.9',)
  cache = f'--stage1_cache={tmp_path / "f" / "stage1"}'  # one first-stage cache for every variant
  assert out[1].study.flags == (cache, '--alpha=0.4', '--students=bilstm', '--students=bert1', '--alpha=0.9')
  assert {v.study.cfg.stage1_cache for v in out} == {str(tmp_path / 'f' / 'stage1')}
  assert (out[1].study.root, out[1].study.records) == (tmp_path / 'f' / 'alpha=0.9', tmp_path / 'r' / 'alpha=0.9')


def test_ablation_variants_share_teachers_unless_the_setting_changes_them(tmp_path):
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('--students=bert1\n')
  out = variants.ablation_variants(flagfile, ['--alpha=0.2'], [('alpha', ['0.1', '0.9']), ('teacher_epochs', ['2'])],
                                   tmp_path)
  assert [(v.flag, v.value, v.cfg.alpha, v.cfg.teacher_epochs) for v in out] == [
      ('alpha', '0.1', 0.1, 1.0), ('alpha', '0.9', 0.9, 1.0), ('teacher_epochs', '2', 0.2, 2.0)]
  assert [(v.cfg.workdir, v.cfg.shared_dir) for v in out] == [
      (str(tmp_path / 'alpha=0.1'), str(tmp_path / 'shared')), (str(tmp_path / 'alpha=0.9'), str(tmp_path / 'shared')),
      (str(tmp_path / 'teacher_epochs=2'), str(tmp_path / 'teacher_epochs=2'))]
  with pytest.raises(UserError, match='map to the same variant folder'):
    variants.ablation_variants(flagfile, [], [('data_dir', ['a/b', 'a_b'])], tmp_path)


def test_runner_command_is_run_py_with_the_changed_settings():
  cfg = base_config(workdir='w', alpha=0.25)
  command = runner.command(cfg)
  assert runner.RUN_PY.is_file() and command[1] == str(runner.RUN_PY)
  assert command[2:] == config.flag_lines(cfg) and '--alpha=0.25' in command and '--workdir=w' in command


# Records.

def test_record_roundtrip_and_staleness(tmp_path):
  run = variants.study_runs(a_study(tmp_path))[0]
  settings = records.run_settings(run)
  assert settings['students'] == ['bert1'] and settings['student_seed'] == 0
  assert not set(records.NOT_COMPARED) & set(settings)  # work folders may move between sessions
  path = records.record_path(tmp_path / 'records', 'bert1', 0)
  assert path == tmp_path / 'records' / 'bert1_seed0.json'
  records.write_record(path, a_record(run))
  assert records.read_record(path, settings) == a_record(run)
  # Other work folders are the same run; another alpha is not.
  moved = dataclasses.replace(run, workdir='elsewhere', compilation_cache_dir='cache')
  assert records.read_record(path, records.run_settings(moved)) == a_record(run)
  with pytest.raises(UserError, match=r'bert1_seed0.json: recorded with other settings \(alpha: recorded 0.5, '
                                      r'now 0.9\)'):
    records.read_record(path, records.run_settings(dataclasses.replace(run, alpha=0.9)))
  # A setting added since the record was made counts at its default.
  old = {k: v for k, v in settings.items() if k != 'hidden_weight'}
  assert records.changed_settings(old, settings) == []
  assert records.changed_settings(old, {**settings, 'hidden_weight': 0.5}) == [
      'hidden_weight: recorded 0.0, now 0.5']
  path.write_text('{"rows": []}')
  with pytest.raises(UserError, match='not a readable study record'):
    records.read_record(path, settings)


def test_make_record_scores_each_question_aligned_by_row_id(tmp_path):
  run = dataclasses.replace(base_config(), workdir=str(tmp_path), student_seed=1)
  # Two evaluated questions (q0: rows 10, 11; q1: rows 12-14) and q2 without a positive (not evaluated).
  examples = types.SimpleNamespace(ids=np.array([10, 11, 12, 13, 14, 15]), labels=np.array([1, 0, 0, 1, 0, 0]),
                                   groups=np.array([0, 0, 1, 1, 1, 2]), group_names=['q0', 'q1', 'q2'])
  probs = np.array([[0.1, 0.9], [0.9, 0.1], [0.2, 0.8], [0.5, 0.5], [0.9, 0.1], [0.5, 0.5]])
  order = np.array([5, 3, 1, 0, 4, 2])  # the saved rows in another order than the split's
  (tmp_path / 'eval').mkdir()
  np.savez(tmp_path / 'eval' / 'probabilities.npz', **{'eval/ids': examples.ids[order],
                                                        'eval/bert1_mkdm': probs[order]})
  results = {'rows': [{**TEACHERS[0], 'extra': 1}], 'provenance': PROVENANCE, 'teacher_diversity': DIVERSITY}
  record = records.make_record(run, results, examples, {'commit_at_start': 'abc'})
  assert (record['student'], record['seed'], record['questions']) == ('bert1', 1, ['q0', 'q1'])
  assert record['commit_at_start'] == 'abc' and 'extra' not in record['rows'][0]
  # q0: the positive ranks first (AP 1, RR 1); q1: second, after row 12 (AP 1/2, RR 1/2).
  assert record['question_scores'] == {'map': {'bert1_mkdm': [1.0, 0.5]}, 'mrr': {'bert1_mkdm': [1.0, 0.5]}}
  assert record['rows'] == TEACHERS and record['settings'] == records.run_settings(run)
  examples.ids = np.array([10, 11, 12, 13, 14, 99])
  with pytest.raises(UserError, match='not the eval split'):
    records.make_record(run, results, examples, {'commit_at_start': 'abc'})


def test_records_keep_per_head_metrics_and_combination_weights(tmp_path):
  run = dataclasses.replace(base_config(), workdir=str(tmp_path))
  examples = types.SimpleNamespace(ids=np.array([1, 2]), labels=np.array([1, 0]), groups=np.array([0, 0]),
                                   group_names=['q0'])
  (tmp_path / 'eval').mkdir()
  np.savez(tmp_path / 'eval' / 'probabilities.npz', **{'eval/ids': examples.ids,
                                                        'eval/bert1_mkdm': np.array([[0.1, 0.9], [0.9, 0.1]])})
  row = {'name': 'bert1_mkdm', 'method': 'mkdm', 'student': 'bert1', 'metrics': {'map': 1.0},
         'head_metrics': {'head0/map': 1.0, 'head1/map': 0.5}, 'combine_weights': [0.25, 0.75]}
  record = records.make_record(run, {'rows': [row], 'provenance': PROVENANCE}, examples, {'commit_at_start': 'c'})
  assert record['rows'][0]['head_metrics'] == {'head0/map': 1.0, 'head1/map': 0.5}
  assert record['rows'][0]['combine_weights'] == [0.25, 0.75]


def test_a_modified_tree_is_refused_before_any_run_or_its_diff_is_recorded(tmp_path, monkeypatch):
  from mkdm_jax import provenance
  monkeypatch.setattr(provenance, 'git_commit', lambda: 'abc+dirty')
  monkeypatch.setattr(provenance, 'git_diff', lambda: 'diff --git a/x b/x')
  calls = []
  fake_runner(monkeypatch, calls)
  with pytest.raises(UserError, match='uncommitted changes .*--allow_dirty'):
    sweeps.run_study(dataclasses.replace(a_study(tmp_path), allow_dirty=False))
  assert calls == [] and not (tmp_path / 'records').exists()
  _, found = sweeps.run_study(a_study(tmp_path))
  assert len(calls) == 2 and all(r['commit_at_start'] == 'abc+dirty' and r['diff'] == 'diff --git a/x b/x'
                                 for r in found)
  monkeypatch.setattr(provenance, 'git_commit', lambda: 'abc')
  assert records.work_tree(allow_dirty=False) == {'commit_at_start': 'abc'}


# Summaries and paired tests.

def test_mean_std():
  assert summaries.mean_std([1, 2, 3]) == {'mean': 2.0, 'std': 1.0}
  assert summaries.mean_std([0.5]) == {'mean': 0.5, 'std': None}


def test_summary_has_teachers_once_then_each_student_row_over_seeds(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  summary = summaries.summarise(found, ['bert1', 'bilstm'])
  assert [s['name'] for s in summary] == ['teacher_0', 'bert1_student_scratch', 'bert1_kd_single', 'bert1_mkdm']
  assert summary[0]['seeds'] is None and summary[0]['metrics']['map'] == {'mean': 0.9, 'std': None}
  mkdm = summary[3]
  assert mkdm['seeds'] == 2
  # MAP per seed: 2.25/3 and 2.75/3; the std of two values is their distance over sqrt(2).
  assert mkdm['metrics']['map']['mean'] == pytest.approx(2.5 / 3)
  assert mkdm['metrics']['map']['std'] == pytest.approx(0.5 / 3 / np.sqrt(2))
  assert mkdm['dev_metrics']['map'] == pytest.approx({'mean': 0.625, 'std': 0.25 / np.sqrt(2)})
  other_teachers = [{**TEACHERS[0], 'metrics': {'map': 0.1, 'mrr': 0.1}}]
  with pytest.raises(UserError, match='disagree on the teachers'):
    summaries.summarise([found[0], a_record(variants.study_runs(a_study(tmp_path))[1], other_teachers)], ['bert1'])


def test_paired_tests_by_hand(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  tests = summaries.paired_tests([('mkdm', 'kd_single'), ('mkdm', 'student_scratch')], ['bert1'], found, 'map',
                                 seeds_random=False)
  first, second = tests
  assert (first['a'], first['b'], first['seeds'], first['questions']) == ('mkdm', 'kd_single', 2, 3)
  # Differences [0.25, 0.5, 0.75]: mean 0.5. The 8 sign flips have sums +-1.5, +-1, +-0.5, 0, 0: two reach
  # |1.5|, so p = 2/8. Differences [0.25, -0.25, 0.75]: sums +-1.25, +-0.75 (twice each), +-0.25: p = 6/8.
  assert first['mean_difference'] == 0.5 and first['p_value'] == pytest.approx(0.25)
  assert second['mean_difference'] == 0.25 and second['p_value'] == pytest.approx(0.75)
  # Holm: the smaller p times 2, the larger times 1, kept non-decreasing.
  assert [t['p_holm'] for t in tests] == pytest.approx([0.5, 0.75])
  # MDE: (z_0.975 + z_0.8) * sd / sqrt(n) = 2.8016 * 0.25 / sqrt(3).
  assert first['mde'] == pytest.approx(2.8016 * 0.25 / np.sqrt(3), abs=1e-4)
  assert 0.25 <= first['ci_low'] <= 0.5 <= first['ci_high'] <= 0.75  # resampled means lie within the data
  # Seeds random (the default): the same means, a two-level interval, the MDE at alpha / 2 pairs with its se.
  random_first, _ = summaries.paired_tests([('mkdm', 'kd_single'), ('mkdm', 'student_scratch')], ['bert1'], found,
                                           'map')
  assert random_first['mean_difference'] == 0.5 and random_first['ci_low'] <= 0.5 <= random_first['ci_high']
  assert random_first['mde'] == pytest.approx(stats.detectable_difference(random_first['se'], 0.025))


def test_factor_tests_and_the_change_against_the_reference(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  study = {'students': ['bert1'], 'metric': 'map', 'methods': list(METHODS),
           'summary': summaries.summarise(found, ['bert1'])}
  pairs = [('mkdm', 'kd_single'), ('tmkd', 'kd_single')]
  tests, differences = summaries.factor_tests(study, found, pairs, seeds_random=False)
  (test,) = tests  # tmkd did not run
  assert (test['a'], test['b'], test['mean_difference'], 'change' in test) == ('mkdm', 'kd_single', 0.5, False)
  assert test['mean_a'] == pytest.approx(2.5 / 3) and test['mean_b'] == pytest.approx(1 / 3)
  np.testing.assert_array_equal(differences['mkdm', 'kd_single'].mean(0), [0.25, 0.5, 0.75])  # [seeds, questions]
  np.testing.assert_array_equal(differences['mkdm'], summaries.question_scores(found, 'bert1_mkdm', 'map').mean(0)[None])
  reference = {('mkdm', 'kd_single'): np.array([[0.0, 0.25, 0.25]] * 2), 'mkdm': np.zeros((2, 3))}
  for seeds_random in (False, True):
    (moved,), _ = summaries.factor_tests(study, found, pairs, reference, seeds_random=seeds_random)
    # Per question (A - B) - (A - B)_reference = [0.25, 0.25, 0.5].
    assert moved['change']['mean_difference'] == pytest.approx(1 / 3)
    # mkdm's own score against the reference's zeros: its mean; kd_single has no reference scores here.
    assert moved['change_a']['mean_difference'] == pytest.approx(2.5 / 3) and 'change_b' not in moved


def test_sweep_scores_by_method_or_by_row_name():
  def results(students):
    return {'rows': [{'name': 'teacher_0', 'method': 'teacher', 'student': None, 'metrics': {'map': 0.9}},
                     *[{'name': f'{s}_mkdm', 'method': 'mkdm', 'student': s, 'metrics': {'map': 0.5}}
                       for s in students]]}
  sweep = summaries.sweep_scores('alpha', True, ['0.1'], [results(['bert1'])], 'map', ['w'])
  assert sweep['columns'] == ['mkdm'] and sweep['variants'][0]['scores'] == {'mkdm': 0.5}
  sweep = summaries.sweep_scores('alpha', True, ['0.1'], [results(['bert1', 'bilstm'])], 'map', ['w'])
  assert sweep['columns'] == ['bert1_mkdm', 'bilstm_mkdm']
  with pytest.raises(UserError, match='--metric=mrr: not among the metrics'):
    summaries.sweep_scores('alpha', True, ['0.1'], [results(['bert1'])], 'mrr', ['w'])


# Tables.

def test_the_study_report_puts_head_agreement_beside_teacher_agreement(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  for record, (heads, teachers) in zip(found, [(0.9, 0.5), (0.7, 0.5)]):
    row = next(r for r in record['rows'] if r['name'] == 'bert1_mkdm')
    row.update(head_agreement=heads, teacher_agreement=teachers)
  summary = summaries.summarise(found, ['bert1'])
  mkdm = next(r for r in summary if r['name'] == 'bert1_mkdm')
  assert mkdm['head_agreement']['mean'] == pytest.approx(0.8) and mkdm['teacher_agreement'] == {'mean': 0.5, 'std': 0.0}
  assert 'head_agreement' not in next(r for r in summary if r['name'] == 'bert1_kd_single')
  report = {'task': 'wikiqa', 'split': 'test', 'seeds': [0, 1], 'base_flagfile': 'b.flags', 'extra_flags': [],
            'provenance': PROVENANCE, 'students': ['bert1'], 'runs': [], 'missing': [], 'teacher_diversity': {},
            'summary': summary, 'seeds_random': True, 'metric': 'map', 'tests': [], 'skipped_pairs': []}
  assert '| bert1_mkdm | 0.8000 ± 0.1414 | 0.5000 ± 0.0000 |' in tables.study_markdown(report)


def test_the_study_report_averages_the_out_of_domain_metrics(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  for record, value in zip(found, [0.5, 0.75]):
    for row in record['rows']:
      if row['method'] == 'mkdm':
        row['extra_metrics'] = {'squad_dev': {'map': value, 'map/head_0': 0.0}}
  summary = summaries.summarise(found, ['bert1'])
  mkdm = next(r for r in summary if r['name'] == 'bert1_mkdm')
  assert mkdm['extra_metrics'] == {'squad_dev': {'map': {'mean': 0.625, 'std': pytest.approx(0.1767767)}}}
  assert 'extra_metrics' not in next(r for r in summary if r['name'] == 'bert1_kd_single')
  report = {'task': 'wikiqa', 'split': 'test', 'seeds': [0, 1], 'base_flagfile': 'b.flags', 'extra_flags': [],
            'provenance': PROVENANCE, 'students': ['bert1'], 'runs': [], 'missing': [], 'teacher_diversity': {},
            'summary': summary, 'seeds_random': True, 'metric': 'map', 'tests': [], 'skipped_pairs': []}
  assert '| bert1_mkdm | squad_dev | 0.6250 ± 0.1768 |' in tables.study_markdown(report)


def test_the_study_report_averages_each_stages_cost(tmp_path):
  found = [a_record(run) for run in variants.study_runs(a_study(tmp_path))]
  for record, (seconds, speed) in zip(found, [(100.0, 40.0), (300.0, 60.0)]):
    for row in record['rows']:
      if row['method'] == 'mkdm':
        row.update(train_seconds=seconds, train_examples_per_sec=speed, pretrain_seconds=None)
  summary = summaries.summarise(found, ['bert1'])
  mkdm = next(r for r in summary if r['name'] == 'bert1_mkdm')
  assert mkdm['cost'] == {'train_seconds': {'mean': 200.0, 'std': pytest.approx(141.4213562)},
                          'train_examples_per_sec': {'mean': 50.0, 'std': pytest.approx(14.1421356)}}
  # kd_single's records hold wall times (1 s) only: the speed cells stay empty.
  assert next(r for r in summary if r['name'] == 'bert1_kd_single')['cost'] == {
      'train_seconds': {'mean': 1.0, 'std': 0.0}}
  report = {'task': 'wikiqa', 'split': 'test', 'seeds': [0, 1], 'base_flagfile': 'b.flags', 'extra_flags': [],
            'provenance': PROVENANCE, 'students': ['bert1'], 'runs': [], 'missing': [], 'teacher_diversity': {},
            'summary': summary, 'seeds_random': True, 'metric': 'map', 'tests': [], 'skipped_pairs': []}
  markdown = tables.study_markdown(report)
  assert '| bert1_mkdm | 200 | 50.0 | - | - |' in markdown and '| bert1_kd_single | 1 | - | - | - |' in markdown


def test_tables_format_the_numbers():
  factors = {'student': 'bert1', 'seeds': ['0', '1'], 'metric': 'map', 'base_flagfile': 'b.flags',
             'provenance': PROVENANCE, 'not_run': ['T=4'], 'variants': [
                 {'name': 'reference', 'flags': [], 'seeds': 2, 'teacher_disagreement': 0.125, 'pairs': [
                     {'a': 'mkdm', 'b': 'kd_single', 'mean_a': 0.75, 'mean_b': 0.5, 'mean_difference': 0.25,
                      'ci_low': 0.125, 'ci_high': 0.375, 'p_value': 0.03}]},
                 {'name': 'alpha=0.9', 'flags': ['--alpha=0.9'], 'seeds': 2, 'teacher_disagreement': 0.125, 'pairs': [
                     {'a': 'mkdm', 'b': 'kd_single', 'mean_a': 0.75, 'mean_b': 0.5, 'mean_difference': 0.25,
                      'ci_low': 0.125, 'ci_high': 0.375, 'p_value': 0.03,
                      'change': {'mean_difference': -0.0625, 'ci_low': -0.125, 'ci_high': 0.0, 'p_value': 0.5},
                      'change_a': {'mean_difference': 0.125, 'ci_low': 0.0, 'ci_high': 0.25, 'p_value': 0.06}}]}]}
  text = tables.factors_markdown(factors)
  assert ('| reference | `-` | 2 | 0.1250 | mkdm | kd_single | 0.7500 | 0.5000 | +0.2500 [+0.1250, +0.3750] '
          '| - | - |') in text
  assert '| alpha=0.9 | `--alpha=0.9` | 2 | 0.1250 | mkdm | kd_single | 0.7500 | 0.5000 | +0.2500 [+0.1250, ' \
         '+0.3750] | -0.0625 [-0.1250, +0.0000] | 0.5000 |' in text
  assert text.endswith('Not run yet (no records): `T=4`.\n') and 'commit 0123456789ab.' in text
  assert '| alpha=0.9 | mkdm | +0.1250 [+0.0000, +0.2500] | 0.0600 |' in text
  ablation = {'metric': 'map', 'task': 'wikiqa', 'split': 'test', 'base_flagfile': 'b.flags', 'extra_flags': [],
              'sweeps': [{'flag': 'alpha', 'shares_teachers': True, 'columns': ['kd_single', 'mkdm'],
                          'variants': [{'value': '0.1', 'scores': {'mkdm': 0.5}}]}]}
  assert tables.ablation_markdown(ablation).splitlines()[-5:] == [
      '## alpha (teachers shared by all variants)', '', '| alpha | kd_single | mkdm |', '|---|---|---|',
      '| 0.1 | - | 0.5000 |']


# A study and a factor analysis end to end, runs faked.

def fake_runner(monkeypatch, calls):
  """runner.run_config replaced: each run 'trains' by writing probabilities for three questions of two rows (a
  positive, then a negative) that rank q0's positive first and the others' second, and returns a_record's rows."""
  examples = types.SimpleNamespace(ids=np.arange(6), labels=np.array([1, 0] * 3), groups=np.repeat([0, 1, 2], 2),
                                   group_names=['q0', 'q1', 'q2'])
  monkeypatch.setattr(records, 'eval_examples', lambda cfg: examples)
  positive = np.array([0.9, 0.1, 0.1, 0.9, 0.1, 0.9])

  def run_config(cfg, label):
    calls.append(label)
    rows = a_record(cfg)['rows']
    workdir = pathlib.Path(cfg.workdir)
    (workdir / 'eval').mkdir(parents=True)
    np.savez(workdir / 'eval' / 'probabilities.npz', **{'eval/ids': examples.ids},
             **{f'eval/{r["name"]}': np.stack([1 - positive, positive], axis=1) for r in rows})
    return {'rows': rows, 'provenance': PROVENANCE, 'teacher_diversity': DIVERSITY}
  monkeypatch.setattr(runner, 'run_config', run_config)


def test_a_study_runs_what_is_missing_and_reports_the_records(tmp_path, monkeypatch):
  study = dataclasses.replace(a_study(tmp_path), pairs=(('mkdm', 'kd_single'), ('tmkd', 'mkdm')))
  run0 = variants.study_runs(study)[0]
  records.write_record(records.record_path(study.records, 'bert1', 0), a_record(run0))
  calls = []
  fake_runner(monkeypatch, calls)
  report, found = sweeps.run_study(study)
  assert calls == ['[2/2] bert1 seed 1']  # seed 0 was recorded
  assert json.loads((study.records / 'bert1_seed1.json').read_text()) == found[1]
  assert found[1]['question_scores']['map']['bert1_kd_single'] == [1.0, 0.5, 0.5]  # the fake run's ranks
  assert json.loads(json.dumps(report)) == json.loads((study.root / 'study.json').read_text())
  assert report['skipped_pairs'] == ['tmkd:mkdm (tmkd not in --methods)'] and report['missing'] == []
  assert [t['a'] for t in report['tests']] == ['mkdm'] and report['config']['num_teachers'] == 2
  assert 'workdir' not in report['config'] and report['extra_flags'] == ['--students=bert1']
  assert '| bert1 | mkdm - kd_single | 2 | 3 |' in (study.root / 'study.md').read_text()
  assert (study.root / 'study_map.png').read_bytes()[:4] == b'\x89PNG'


def test_report_only_reads_records_and_refuses_stale_ones_before_any_run(tmp_path, monkeypatch):
  study = a_study(tmp_path, seeds=(0, 1, 2))
  write_records(dataclasses.replace(study, seeds=(0, 1)))
  calls = []
  fake_runner(monkeypatch, calls)
  report, _ = sweeps.run_study(study, report_only=True)
  assert calls == [] and report['missing'] == [('bert1', 2)]
  assert 'Not yet run: bert1 seed 2.' in (study.root / 'study.md').read_text()
  stale = dataclasses.replace(study, cfg=base_config(alpha=0.9))
  with pytest.raises(UserError, match='alpha: recorded 0.5, now 0.9'):
    sweeps.run_study(stale)
  assert calls == []
  with pytest.raises(UserError, match='no finished run is recorded'):
    sweeps.run_study(dataclasses.replace(study, seeds=(5,)), report_only=True)


def test_factors_compare_each_variant_with_the_reference(tmp_path, monkeypatch):
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('--students=bert1\n--methods=student_scratch,kd_single,mkdm\n--num_teachers=2\n')
  factor_variants = variants.factor_variants(
      flagfile, [], [('reference', []), ('alpha=0.9', ['--alpha=0.9']), ('T=4', ['--temperature=4'])],
      student='bert1', seeds=(0, 1), root=tmp_path / 'f', records=lambda i, name: tmp_path / 'records' / name,
      pairs=(('mkdm', 'kd_single'),), metric='map', allow_dirty=True)
  for variant in factor_variants[:2]:
    write_records(variant.study)
  calls = []
  fake_runner(monkeypatch, calls)
  report = sweeps.run_factors(factor_variants, flagfile='base.flags', flags=[], root=tmp_path / 'f', report_only=True)
  assert calls == [] and report['not_run'] == ['T=4'] and report['seeds'] == ['0', '1']
  reference, variant = report['variants']
  assert (reference['name'], reference['flags'], reference['seeds']) == ('reference', [], 2)
  assert reference['teacher_disagreement'] == 0.125 and 'change' not in reference['pairs'][0]
  assert variant['pairs'][0]['mean_difference'] == 0.5 and variant['pairs'][0]['change']['mean_difference'] == 0
  assert json.loads((tmp_path / 'f' / 'alpha=0.9' / 'study.json').read_text())['config']['alpha'] == 0.9
  assert '`T=4`' in (tmp_path / 'f' / 'factors.md').read_text()
  assert json.loads((tmp_path / 'f' / 'factors.json').read_text()) == json.loads(json.dumps(report))
  # Every variant's runs come before the first report (a report starts JAX in this process, for its provenance).
  monkeypatch.setattr(sweeps.provenance, 'record', lambda: calls.append('provenance') or PROVENANCE)
  report = sweeps.run_factors(factor_variants, flagfile='base.flags', flags=[], root=tmp_path / 'f')
  assert calls == ['[1/2] bert1 seed 0', '[2/2] bert1 seed 1'] + ['provenance'] * 4
  assert [v['name'] for v in report['variants']] == ['reference', 'alpha=0.9', 'T=4'] and report['not_run'] == []


def test_a_merged_study_tests_one_variants_method_against_anothers(tmp_path, monkeypatch):
  flagfile = tmp_path / 'base.flags'
  flagfile.write_text('--students=bert1\n--methods=student_scratch,kd_single,mkdm\n--num_teachers=2\n')
  reference, heads, later = variants.factor_variants(
      flagfile, [], [('reference', []), ('heads', ['--methods=mkdm', '--head_layers=1']),
                     ('later', ['--methods=mkdm', '--alpha=0.9'])],
      student='bert1', seeds=(0, 1), root=tmp_path / 'f', records=lambda i, name: tmp_path / 'records' / name,
      pairs=(('mkdm', 'kd_single'),), metric='map', allow_dirty=True)
  write_records(reference.study)
  heads_ap = ([1.0, 1.0, 1.0], [1.0, 0.5, 1.0])  # per seed; kd_single's are [0.5, 0.25, 0.25] for both seeds
  for run in variants.study_runs(heads.study)[:1]:  # seed 0 only: seed 1 is left out of the merged study
    record = a_record(run)
    record['rows'] = [r for r in record['rows'] if r['method'] in ('teacher', 'mkdm')]
    record['question_scores'] = {m: {'bert1_mkdm': heads_ap[run.student_seed]} for m in ('map', 'mrr')}
    records.write_record(records.record_path(heads.study.records, 'bert1', run.student_seed), record)
  monkeypatch.setattr(sweeps.provenance, 'record', lambda: PROVENANCE)
  sweeps.run_factors([reference, heads, later], flagfile='base.flags', flags=[], root=tmp_path / 'f',
                     report_only=True,  # `later` has no records: its pair is skipped, not an error
                     study_pairs=(('mkdm@heads', 'kd_single'), ('mkdm@heads', 'mkdm'), ('mkdm@later', 'mkdm')))
  merged = json.loads((tmp_path / 'f' / 'merged' / 'study.json').read_text())
  assert {(t['a'], t['b']) for t in merged['tests']} == {('mkdm@heads', 'kd_single'), ('mkdm@heads', 'mkdm')}
  assert merged['methods'] == ['student_scratch', 'kd_single', 'mkdm', 'mkdm@heads']
  assert [v['name'] for v in merged['variants']] == ['reference', 'heads'] and merged['missing'] == [['bert1', 1]]
  by_pair = {(t['a'], t['b']): t for t in merged['tests']}
  # Seed 0 alone: mkdm@heads - kd_single = [0.5, 0.75, 0.75], mkdm@heads - mkdm = [0.5, 0.25, 0.0] per question.
  assert by_pair['mkdm@heads', 'kd_single']['mean_difference'] == pytest.approx(2 / 3)
  assert by_pair['mkdm@heads', 'mkdm']['mean_difference'] == pytest.approx(0.25)
  assert [r['name'] for r in merged['summary']] == ['teacher_0', 'bert1_student_scratch', 'bert1_kd_single',
                                                   'bert1_mkdm', 'bert1_mkdm@heads']
  assert '`heads` `--methods=mkdm --head_layers=1`' in (tmp_path / 'f' / 'merged' / 'study.md').read_text()
  with pytest.raises(UserError, match='mkdm@other is not a method of the merged study'):
    sweeps.run_factors([reference, heads], flagfile='base.flags', flags=[], root=tmp_path / 'f', report_only=True,
                       study_pairs=(('mkdm@other', 'kd_single'),))
  record = json.loads(records.record_path(heads.study.records, 'bert1', 0).read_text())
  record['questions'] = ['q0', 'q1', 'q9']
  records.write_record(records.record_path(heads.study.records, 'bert1', 0), record)
  with pytest.raises(UserError, match='variant heads seed 0 scored other questions'):
    sweeps.run_factors([reference, heads], flagfile='base.flags', flags=[], root=tmp_path / 'f', report_only=True,
                       study_pairs=(('mkdm@heads', 'kd_single'),))


def test_the_size_curve_puts_each_method_at_its_stage1_pairs(tmp_path):
  source = tmp_path / 'pairs.tsv'
  source.write_text('q\tp\n' + ''.join(f'q{i}\tp{i}\n' for i in range(5)), encoding='utf-8')
  corpus_dir = tmp_path / 'corpus'
  data_corpus.prepare([source], corpus_dir, data_corpus.ReadOptions('tsv', 'q', 'p'), progress=False)

  def row(method, value, squad=None):
    return {'name': f'bert1_{method}', 'method': method, 'student': 'bert1', 'seeds': 2,
            'metrics': {'map': {'mean': value, 'std': 0.01}},
            **({'extra_metrics': {'squad_dev': {'map': {'mean': squad, 'std': 0.0}}}} if squad else {})}
  teacher = {'name': 'teacher_0', 'method': 'teacher', 'student': None, 'metrics': {'map': {'mean': 0.9}}}
  reports = [{'config': {'unlabelled_corpus': str(corpus_dir)},
              'summary': [teacher, row('kd_single', 0.6, 0.7), row('tkd', 0.65, 0.75)]},
             {'config': {'unlabelled_corpus': ''}, 'summary': [teacher, row('tmkd', 0.5)]}]  # in memory: left out
  rows = sweeps.size_curve(reports, 'map', tmp_path / 'curve')
  assert rows == [{'student': 'bert1', 'method': 'kd_single', 'seeds': 2, 'pairs': 0, 'map_mean': 0.6,
                   'map_std': 0.01, 'squad_dev_map_mean': 0.7},
                  {'student': 'bert1', 'method': 'tkd', 'seeds': 2, 'pairs': 5, 'map_mean': 0.65, 'map_std': 0.01,
                   'squad_dev_map_mean': 0.75}]
  assert json.loads((tmp_path / 'curve' / 'curve.json').read_text()) == rows
  assert (tmp_path / 'curve' / 'curve_map.png').read_bytes()[:4] == b'\x89PNG'
