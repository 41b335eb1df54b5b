"""What a sweep measured: means and std over seeds, paired tests (mkdm_jax.stats), sweep scores.

Paired tests with `seeds_random` (the default) resample seeds and questions (`stats.two_level_bootstrap`): the
interval holds seed-to-seed variance, and the minimal detectable difference is at the Holm-adjusted level of the
first step (alpha / number of pairs) with that standard error. Without it, each question's score is averaged over
the seeds and questions alone are resampled (the seeds treated as fixed: the reports made before 2026-12-06).
"""
import numpy as np

from mkdm_jax import stats
from mkdm_jax.errors import UserError

ALPHA, POWER = 0.05, 0.8  # of the minimal detectable difference
# A student row's cost fields (records and summaries): each stage's wall time and median training examples/s.
COST_FIELDS = ('train_seconds', 'train_examples_per_sec', 'pretrain_seconds', 'pretrain_examples_per_sec')


def mean_std(values) -> dict:
  """Mean and sample standard deviation (ddof=1; None for one value)."""
  values = np.asarray(values, float)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else None}


def records_of(records, arch):
  return [r for r in records if r['student'] == arch]


def summarise(records, students) -> list[dict]:
  """Teacher rows once (fixed across runs: their seeds entry is None), then per architecture each student row's
  mean and std over its seeds, on eval and on dev."""
  teachers = [r for r in records[0]['rows'] if r['student'] is None]
  for record in records[1:]:
    if [r for r in record['rows'] if r['student'] is None] != teachers:
      raise UserError(f"the records of {records[0]['student']} seed {records[0]['seed']} and {record['student']} "
                      f"seed {record['seed']} disagree on the teachers' metrics: they were not made from the same "
                      'teachers')
  summary = [{'name': r['name'], 'method': r['method'], 'student': None, 'seeds': None,
              **{key: {m: {'mean': v, 'std': None} for m, v in r[key].items()}
                 for key in ('metrics', 'dev_metrics') if r[key] is not None}} for r in teachers]
  for arch in students:
    arch_records = records_of(records, arch)
    if not arch_records:
      continue
    runs = [{r['name']: r for r in record['rows']} for record in arch_records]
    for name in [r['name'] for r in arch_records[0]['rows'] if r['student'] == arch]:
      rows = [run[name] for run in runs]
      entry = {'name': name, 'method': rows[0]['method'], 'student': arch, 'seeds': len(rows)}
      for key in ('metrics', 'dev_metrics'):
        if rows[0][key] is not None:
          entry[key] = {m: mean_std([r[key][m] for r in rows]) for m in rows[0][key]}
      for key in ('head_agreement', 'teacher_agreement'):  # multi-head rows of records made since 2026-12-06
        if all(r.get(key) is not None for r in rows):
          entry[key] = mean_std([r[key] for r in rows])
      cost = {key: mean_std([r[key] for r in rows]) for key in COST_FIELDS if all(r.get(key) for r in rows)}
      if cost:  # wall time (a resumed run: its last part) and median logged examples/s of each stage
        entry['cost'] = cost
      if all(r.get('extra_metrics') for r in rows):  # --extra_eval sets (out of domain), combined prediction only
        entry['extra_metrics'] = {name: {m: mean_std([r['extra_metrics'][name][m] for r in rows])
                                         for m in metrics if '/' not in m}
                                  for name, metrics in rows[0]['extra_metrics'].items()}
      summary.append(entry)
  return summary


def question_scores(records, name, metric) -> np.ndarray:
  """Row `name`'s per-question `metric` scores [seeds, questions], in the records' order."""
  return np.array([r['question_scores'][metric][name] for r in records], float)


def pair_test(x, y, seeds_random, alpha=ALPHA):
  """a - b of per-seed, per-question scores x, y [seeds, questions]: its test and minimal detectable difference
  at level `alpha`."""
  if seeds_random:
    test = stats.two_level_bootstrap(x, y)
    return {**test, 'mde': stats.detectable_difference(test['se'], alpha, POWER)}
  x, y = x.mean(axis=0), y.mean(axis=0)
  return {**stats.paired_bootstrap(x, y), 'mde': stats.minimal_detectable_difference(x - y, alpha, POWER)}


def paired_tests(pairs, students, records, metric, seeds_random=True) -> list[dict]:
  """Per student architecture, each pair (a, b)'s test of a - b over seeds and questions (`pair_test`), the smallest
  difference it could detect, and Holm-corrected p-values within the architecture."""
  tests = []
  for arch in students:
    runs = records_of(records, arch)
    if not runs:
      continue
    rows = []
    # With seeds random, the detectable difference is at the first Holm step's level; before, at ALPHA.
    alpha = ALPHA / len(pairs) if seeds_random and pairs else ALPHA
    for a, b in pairs:
      x, y = question_scores(runs, f'{arch}_{a}', metric), question_scores(runs, f'{arch}_{b}', metric)
      rows.append({'student': arch, 'a': a, 'b': b, 'seeds': len(runs), 'questions': x.shape[1],
                   **pair_test(x, y, seeds_random, alpha)})
    for row, p in zip(rows, stats.holm([r['p_value'] for r in rows])):
      row['p_holm'] = float(p)
    tests += rows
  return tests


def factor_tests(study, records, pairs, reference=None, seeds_random=True):
  """A factor variant's tests from its study report: per pair (a, b) whose methods it ran, both methods' means and
  a - b (`pair_test`), and against `reference` (the second value this returns for the reference variant) the
  change of a - b and of each method's own score (`change_a`, `change_b`: the variant's method minus the
  reference's, per seed and question). Returns (tests, {pair: this variant's a - b, method: its scores}, per
  seed and question, seeds in the same order)."""
  (student,), metric = study['students'], study['metric']
  means = {r['name']: r['metrics'][metric]['mean'] for r in study['summary']}
  tests, differences = [], {}
  for a, b in pairs:
    if not {a, b} <= set(study['methods']):
      continue
    x, y = question_scores(records, f'{student}_{a}', metric), question_scores(records, f'{student}_{b}', metric)
    # Seeds fixed: the seed-averaged difference, as one row (the reports before 2026-12-06 computed it so).
    per_seed = (lambda s: s) if seeds_random else (lambda s: s.mean(0)[None])
    differences[a, b], differences[a], differences[b] = per_seed(x - y), per_seed(x), per_seed(y)
    test = {'a': a, 'b': b, 'mean_a': means[f'{student}_{a}'], 'mean_b': means[f'{student}_{b}'],
            **{k: v for k, v in pair_test(x, y, seeds_random).items() if k != 'mde'}}
    for key, name in (((a, b), 'change'), (a, 'change_a'), (b, 'change_b')):
      if reference is not None and key in reference:
        change = pair_test(differences[key], reference[key], seeds_random)
        test[name] = {k: v for k, v in change.items() if k != 'mde'}
    tests.append(test)
  return tests, differences


def sweep_scores(flag, shares_teachers, values, results, metric, workdirs) -> dict:
  """One ablation sweep: per variant (value) its `metric` by method, or by row name when several students."""
  students = [{r['student'] for r in res['rows'] if r['student']} for res in results]
  by_name = any(len(s) > 1 for s in students)
  columns, variants = [], []
  for value, res, workdir in zip(values, results, workdirs):
    scores = {}
    for row in res['rows']:
      if row['method'] == 'teacher':
        continue
      if metric not in row['metrics']:
        raise UserError(f'--metric={metric}: not among the metrics {sorted(row["metrics"])} of {flag}={value}')
      key = row['name'] if by_name else row['method']
      scores[key] = row['metrics'][metric]
      if key not in columns:
        columns.append(key)
    variants.append({'value': value, 'workdir': str(workdir), 'scores': scores, 'rows': res['rows']})
  return {'flag': flag, 'shares_teachers': shares_teachers, 'columns': columns, 'variants': variants}
