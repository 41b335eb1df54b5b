"""A study run's record: what one finished run (a student architecture and seed) keeps for the report.

<records>/<arch>_seed<s>.json holds the run's settings, provenance (and the commit its training started from, with
the work tree's diff if it was modified), every row's metrics on eval and dev (per head too) and head combination
weights, and each evaluated question's AP and RR per row. Records are small and committed, so a study spans sessions and machines;
a record made with other settings than the study's is stale: reading it is an error that names them.
"""
import dataclasses
import json
import pathlib

import numpy as np

from mkdm_jax import context, paths, provenance, saved_runs
from mkdm_jax.errors import UserError
from mkdm_jax.metrics import average_precisions
from mkdm_jax.studies.summaries import COST_FIELDS

METRICS = ('map', 'mrr')  # the per-question scores: average precision, reciprocal rank
NOT_COMPARED = ('workdir', 'shared_dir', 'stage1_cache', 'progress', 'compilation_cache_dir')  # may differ between sessions
ROW_FIELDS = ('name', 'method', 'student', 'metrics', 'dev_metrics', 'head_metrics', 'combine_weights',
              'head_agreement', 'teacher_agreement', 'extra_metrics', *COST_FIELDS)


def record_path(records_dir, student, seed) -> pathlib.Path:
  return pathlib.Path(records_dir) / f'{student}_seed{seed}.json'


def run_settings(cfg) -> dict:
  """A run's Config as JSON values, without the settings that may differ between sessions."""
  settings = json.loads(json.dumps(dataclasses.asdict(cfg)))
  return {k: v for k, v in settings.items() if k not in NOT_COMPARED}


def eval_examples(cfg):
  """The eval split's rows as the pipeline reads them (labels and question groups)."""
  return context.load_split_rows(cfg, cfg.eval_split, cfg.max_eval_rows)


def question_scores(path, examples):
  """{metric: {row name: [score per evaluated question]}} (AP for map, RR for mrr) and the questions' names,
  from a run's eval/probabilities.npz, its rows aligned to `examples` by row key."""
  with np.load(path) as saved:
    position = {key: i for i, key in enumerate(saved['eval/ids'].tolist())}
    if any(key not in position for key in examples.ids.tolist()):
      raise UserError(f'{path}: its eval rows are not the eval split of the flags given (changed data or '
                      '--max_eval_rows?); rerun the study in a new --workdir')
    rows = np.array([position[key] for key in examples.ids.tolist()])
    scores = {'map': {}, 'mrr': {}}
    for name in saved.files:
      if name.startswith('eval/') and name != 'eval/ids':
        groups, ap, rr = average_precisions(examples.labels, saved[name][rows, 1], examples.groups)
        # 6 decimals: records stay small (they are committed) and MAP differences of 1e-6 are far below noise.
        scores['map'][name.removeprefix('eval/')] = np.round(ap, 6).tolist()
        scores['mrr'][name.removeprefix('eval/')] = np.round(rr, 6).tolist()
  return scores, [examples.group_names[g] for g in groups]


def make_record(cfg, results, examples, code) -> dict:
  """The record of the finished run of `cfg` (one student architecture) from its results.json; `code`: the
  commit the run started from ({'commit_at_start', and 'diff' of a modified work tree}, `work_tree`)."""
  (arch,) = cfg.students
  rows = [{k: r.get(k) for k in ROW_FIELDS} for r in results['rows']]
  scores, questions = question_scores(pathlib.Path(cfg.workdir) / 'eval' / 'probabilities.npz', examples)
  return {'student': arch, 'seed': cfg.student_seed, 'settings': run_settings(cfg),
          'provenance': results['provenance'], **code, 'rows': rows,
          'teacher_diversity': results.get('teacher_diversity', {}), 'questions': questions,
          'question_scores': scores}


def changed_settings(recorded: dict, settings: dict) -> list[str]:
  """'name: recorded X, now Y' per differing setting; one added since the record counts at its default."""
  recorded = saved_runs.with_new_defaults(recorded, settings)
  return [f'{k}: recorded {recorded.get(k)!r}, now {settings.get(k)!r}'
          for k in sorted(set(recorded) | set(settings)) if recorded.get(k) != settings.get(k)]


def read_record(path, settings) -> dict:
  """A finished run's record; UserError if it was made with other settings than `settings`."""
  try:
    record = json.loads(pathlib.Path(path).read_text())
    changed = changed_settings(record['settings'], settings)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path}: not a readable study record ({e}); move it away to rerun that run') from None
  if changed:
    raise UserError(f'{path}: recorded with other settings ({"; ".join(changed)}); use another --records folder, '
                    'or move the record away to rerun that run')
  return record


def work_tree(allow_dirty) -> dict:
  """The code a run starts from: {'commit_at_start'}, plus the work tree's 'diff' (git diff HEAD) when it has
  uncommitted changes, which are refused unless `allow_dirty`: a record must name the code that made it."""
  commit = provenance.git_commit()
  if not commit.endswith('+dirty'):
    return {'commit_at_start': commit}
  if not allow_dirty:
    raise UserError('the work tree has uncommitted changes (git status): a record must name the code that made '
                    'it. Commit them first, or pass --allow_dirty to store the diff in each record.')
  return {'commit_at_start': commit, 'diff': provenance.git_diff()}


def write_record(path, record):
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(path, json.dumps(record, indent=1))
