"""Reproduction study: a flagfile's methods over several student seeds, with paired tests between methods.

  python experiments/study.py --base_flagfile=experiments/configs/quickstart.flags --workdir=runs/study \
      --seeds=0,1,2 [--records=results/study/records] [--metric=map] [--pairs=mkdm:kd_single,...] \
      [--report_only] [-- <run.py flags>]

Each student architecture a of --students and seed s is one run.py run, `--flagfile=<base> <flags after -->
--students=a --student_seed=s`, in <dir>/<a>/seed_<s> (its log in run.log there); teachers and their logits
live in <dir>/shared, trained once and reused by every run, so only the students vary. A finished run leaves a
record, <records>/<a>_seed<s>.json: its config, provenance, every row's metrics on eval and dev, and each
evaluated question's AP and RR per row. The report is assembled from the records alone, so a study may span
sessions and machines: keep the records (they are small; commit them) and rerun; runs with a record are not
repeated (a record made with other settings is an error naming them), interrupted runs resume from their work
directories, and rerunning with more seeds or architectures extends the study. --report_only trains nothing and
reports the records found.

Then, per student architecture and pair a:b of --pairs (a pair with a method outside --methods is skipped
with a note), each question's --metric score on the eval split (average precision for map, reciprocal rank
for mrr) is averaged over seeds, and questions are resampled (seeds x questions are not independent):
the mean difference a - b with its 95% bootstrap interval, the sign-flip p-value (mkdm_jax.stats),
Holm-corrected over the architecture's pairs, and the smallest difference the study could detect (power
0.8 at level 0.05).

Writes <dir>/study.json (config and provenance; every record's metrics; per row the mean and sample std
(ddof=1) over seeds of every metric, teachers once as they are fixed; the tests), <dir>/study.md (the tables)
and <dir>/study_<metric>.png (per architecture each method's score per seed and its mean, the teachers as
horizontal lines).
"""
import dataclasses
import json
import pathlib

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import numpy as np
import runs
from absl import flags

from mkdm_jax import config, context, distill, provenance, saved_runs, stats
from mkdm_jax.errors import UserError
from mkdm_jax.metrics import average_precisions
from mkdm_jax.workdir import WorkdirLock

RESERVED_FLAGS = ('workdir', 'shared_dir', 'flagfile', 'student_seed')
NOT_COMPARED = ('workdir', 'shared_dir', 'progress', 'compilation_cache_dir')  # may differ between sessions
METRICS = ('map', 'mrr')
ALPHA, POWER = 0.05, 0.8
DEFAULT_PAIRS = ['mkdm:kd_single', 'mkdm:kd_ensemble', 'tmkd:mkdm', 'mkdm:student_scratch', 'tmkd:student_scratch',
                 'kd_single:student_scratch', 'kd_ensemble:student_scratch']

FLAGS = flags.FLAGS
flags.DEFINE_string('base_flagfile', None, 'run.py flagfile of every seed.')
flags.DEFINE_string('workdir', None, 'Study folder: <arch>/seed_<s>/ per run, shared/ for the teachers.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Student seeds (--student_seed of each run).')
flags.DEFINE_string('metric', 'map', f'Per-question score of the paired tests and the plot, one of {METRICS}: '
                    'average precision (map) or reciprocal rank (mrr).')
flags.DEFINE_list('pairs', DEFAULT_PAIRS, 'Method pairs A:B tested as A - B within each student architecture.')
flags.DEFINE_string('records', None, 'Folder of the finished runs\' records (default <workdir>/records).')
flags.DEFINE_bool('report_only', False, 'Train nothing: report the records found for --seeds and --students.')

flags.mark_flags_as_required(['base_flagfile', 'workdir'])


def parse_seeds(values):
  try:
    seeds = [int(v) for v in values]
  except ValueError:
    seeds = []
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds={",".join(values)}: expected distinct non-negative integers, e.g. --seeds=0,1,2')
  return seeds


def parse_pairs(specs):
  """[(a, b)] from --pairs values 'a:b', each a method of mkdm_jax.distill.METHODS."""
  pairs = []
  for spec in specs:
    pair = tuple(spec.split(':'))
    if len(pair) != 2 or pair[0] == pair[1]:
      raise UserError(f'--pairs: {spec!r}: expected A:B with two different methods, e.g. mkdm:kd_single')
    unknown = [m for m in pair if m not in distill.METHODS]
    if unknown:
      raise UserError(f'--pairs: {spec!r}: unknown method {unknown[0]!r}; choose from {tuple(distill.METHODS)}')
    pairs.append(pair)
  if not pairs or len(set(pairs)) != len(pairs):
    raise UserError(f'--pairs={",".join(specs)}: give at least one pair, each once')
  return pairs


def config_overrides(args):
  """The Config settings among run.py flags `args` (already checked by run.py's parser), as strings;
  booleans as --name / --noname too. run.py's own flags (--malloc, logging) are not settings."""
  types = config.config_types()
  values = {}
  for arg in args:
    name, eq, value = arg[2:].partition('=')
    if not eq and name.startswith('no') and types.get(name[2:]) is bool:
      name, value = name[2:], 'false'
    values[name] = value if eq else 'true'
  return {name: value for name, value in values.items() if name in types}


def run_dir(root, arch, seed):
  return root / arch / f'seed_{seed}'


def run_command(base, extra, root, arch, seed):
  return runs.command(base, extra, f'--students={arch}', f'--student_seed={seed}',
                      f'--workdir={run_dir(root, arch, seed)}', f'--shared_dir={root / "shared"}')


def run_settings(cfg, arch, seed):
  """The settings of run (arch, seed) as JSON values, without those that may differ between sessions."""
  settings = json.loads(json.dumps(dataclasses.asdict(dataclasses.replace(cfg, students=(arch,), student_seed=seed))))
  return {k: v for k, v in settings.items() if k not in NOT_COMPARED}


def eval_examples(cfg):
  """The eval split's rows as mkdm_jax.context.load_examples reads them (labels and question groups)."""
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


def make_record(arch, seed, settings, workdir, results, examples):
  rows = [{k: r.get(k) for k in ('name', 'method', 'student', 'metrics', 'dev_metrics', 'train_seconds',
                                  'pretrain_seconds')} for r in results['rows']]
  scores, questions = question_scores(workdir / 'eval' / 'probabilities.npz', examples)
  return {'student': arch, 'seed': seed, 'settings': settings, 'provenance': results['provenance'], 'rows': rows,
          'teacher_diversity': results.get('teacher_diversity', {}), 'questions': questions,
          'question_scores': scores}


def load_record(path, settings):
  """A finished run's record; UserError if it was made with other settings."""
  try:
    record = json.loads(path.read_text())
    recorded = saved_runs.with_new_defaults(record['settings'], settings)
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise UserError(f'{path}: not a readable study record ({e}); move it away to rerun that run') from None
  changed = sorted(k for k in set(recorded) | set(settings) if recorded.get(k) != settings.get(k))
  if changed:
    details = '; '.join(f'{k}: recorded {recorded.get(k)!r}, now {settings.get(k)!r}' for k in changed)
    raise UserError(f'{path}: recorded with other settings ({details}); use another --records folder, or move '
                    'the record away to rerun that run')
  return record


def write_record(path, record):
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = path.with_name(path.name + '.tmp')
  tmp.write_text(json.dumps(record, indent=1))
  tmp.replace(path)


def mean_std(values):
  """Mean and sample standard deviation (ddof=1; None for one value)."""
  values = np.asarray(values, float)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else None}


def summarise(records, students):
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
    runs_of = [{r['name']: r for r in record['rows']} for record in arch_records]
    for name in [r['name'] for r in arch_records[0]['rows'] if r['student'] == arch]:
      rows = [run[name] for run in runs_of]
      entry = {'name': name, 'method': rows[0]['method'], 'student': arch, 'seeds': len(rows)}
      for key in ('metrics', 'dev_metrics'):
        if rows[0][key] is not None:
          entry[key] = {m: mean_std([r[key][m] for r in rows]) for m in rows[0][key]}
      summary.append(entry)
  return summary


def records_of(records, arch):
  return [r for r in records if r['student'] == arch]


def paired_tests(pairs, students, records, metric):
  """Per student architecture, each pair's tests on the question scores averaged over its seeds; Holm within
  the architecture."""
  tests = []
  for arch in students:
    runs_of = records_of(records, arch)
    if not runs_of:
      continue
    scores = lambda name: np.mean([r['question_scores'][metric][name] for r in runs_of], axis=0)
    rows = []
    for a, b in pairs:
      x, y = scores(f'{arch}_{a}'), scores(f'{arch}_{b}')
      rows.append({'student': arch, 'a': a, 'b': b, 'seeds': len(runs_of), 'questions': len(x),
                   **stats.paired_bootstrap(x, y), 'mde': stats.minimal_detectable_difference(x - y, ALPHA, POWER)})
    for row, p in zip(rows, stats.holm([r['p_value'] for r in rows])):
      row['p_holm'] = float(p)
    tests += rows
  return tests


def provenance_line(p):
  return f"{p['date']}, {p['cpu_model']} ({p['backend']}), commit {p['commit'][:12]}"


def markdown(report):
  summary = report['summary']
  names = list(summary[0]['metrics'])
  cell = lambda s: f"{s['mean']:.4f}" + ('' if s['std'] is None else f" ± {s['std']:.4f}")
  lines = [f"# Study: {report['task']} ({report['split']}), seeds {', '.join(map(str, report['seeds']))}", '',
           f"`{report['base_flagfile']}`" + (f" with `{' '.join(report['extra_flags'])}`" if report['extra_flags']
                                            else '') + f". Report: {provenance_line(report['provenance'])}.", '',
           'Runs: ' + '; '.join(f"{arch} seeds {', '.join(map(str, seeds))}"
                                for arch in report['students']
                                if (seeds := [r['seed'] for r in report['runs'] if r['student'] == arch]))
           + '.' + (f" Not yet run: {', '.join(f'{a} seed {s}' for a, s in report['missing'])}." if report['missing']
                    else ''), '',
           *(['Teacher diversity (mkdm_jax.metrics.teacher_diversity): ' + '; '.join(
               f"{split}: disagreement {d['disagreement']:.4f}, symmetric KL {d['symmetric_kl']:.4f}"
               for split, d in report['teacher_diversity'].items()) + '.', ''] if report['teacher_diversity'] else []),
           f"## Mean ± std over seeds ({report['split']}; teachers are fixed, seeds '-')", '',
           '| model | method | student | seeds | ' + ' | '.join(names) + ' |', '|' + '---|' * (4 + len(names))]
  for r in summary:
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | {r['seeds'] or '-'} | "
                 + ' | '.join(cell(r['metrics'][n]) for n in names) + ' |')
  lines += ['', f"## Paired tests: `{report['metric']}` per question, averaged over seeds", '',
            f"A - B over the questions, with its 95% bootstrap interval (questions resampled), the two-sided "
            f"sign-flip p-value, Holm-corrected over each student's pairs, and the minimal detectable difference "
            f"(power {POWER} at level {ALPHA}).", '',
            '| student | A - B | seeds | questions | mean diff | 95% CI | p | Holm p | MDE |', '|' + '---|' * 9]
  for t in report['tests']:
    lines.append(f"| {t['student']} | {t['a']} - {t['b']} | {t['seeds']} | {t['questions']} | "
                 f"{t['mean_difference']:+.4f} | [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {t['p_value']:.4f} | "
                 f"{t['p_holm']:.4f} | {t['mde']:.4f} |")
  if report['skipped_pairs']:
    lines += ['', 'Skipped: ' + '; '.join(report['skipped_pairs']) + '.']
  lines += ['', 'Run provenance: ' + '; '.join(f"{r['student']} seed {r['seed']}: {provenance_line(r['provenance'])}"
                                             for r in report['runs']) + '.']
  return '\n'.join(lines) + '\n'


def plot(report, records, path):
  """Per student architecture: each method's metric per seed (points) and its mean (bar), teachers as lines."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  metric, summary = report['metric'], report['summary']
  students = [a for a in report['students'] if records_of(records, a)]
  fig, axes = plt.subplots(1, len(students), figsize=(1.5 + 3 * len(students), 4.5), sharey=True, squeeze=False)
  for ax, arch in zip(axes[0], students):
    per_seed = [{r['name']: r['metrics'][metric] for r in record['rows']} for record in records_of(records, arch)]
    rows = [r for r in summary if r['student'] == arch]
    for i, row in enumerate(rows):
      values = [seed[row['name']] for seed in per_seed]
      xs = i + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [i]
      ax.scatter(xs, values, s=16, color='C0', zorder=3, label='seed' if i == 0 else None)
      ax.hlines(row['metrics'][metric]['mean'], i - 0.3, i + 0.3, color='black', label='mean' if i == 0 else None)
    for j, row in enumerate(r for r in summary if r['student'] is None):
      ax.axhline(row['metrics'][metric]['mean'], color=f'C{j + 1}', alpha=0.7,
                 linestyle='--' if row['method'] == 'teacher_ensemble' else ':', label=row['name'])
    ax.set_xticks(range(len(rows)), [r['method'] for r in rows], rotation=30, ha='right')
    ax.set_title(f'{arch} ({len(per_seed)} seeds)')
    ax.grid(alpha=0.3, axis='y')
  axes[0][0].set_ylabel(f"{metric} ({report['split']})")
  axes[0][-1].legend(fontsize='small', loc='best')
  fig.suptitle(f"{report['task']}: {metric} over seeds {', '.join(map(str, report['seeds']))}")
  fig.text(0.01, 0.01, provenance_line(report['provenance']), fontsize=6, color='gray')
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=120, metadata={'Description': json.dumps(report['provenance'])})
  plt.close(fig)


def main(argv):
  extra = runs.parse_extra_flags(argv[1:], RESERVED_FLAGS, 'study.py')
  seeds = parse_seeds(FLAGS.seeds)
  if FLAGS.metric not in METRICS:
    raise UserError(f'--metric={FLAGS.metric}: choose from {METRICS}')
  pairs = parse_pairs(FLAGS.pairs)
  base = pathlib.Path(FLAGS.base_flagfile).absolute()
  if not base.is_file():
    raise UserError(f'--base_flagfile={FLAGS.base_flagfile}: no such file')
  root = pathlib.Path(FLAGS.workdir).absolute()
  records_dir = pathlib.Path(FLAGS.records).absolute() if FLAGS.records else root / 'records'
  cfg = config.config_from_flagfile(base, **config_overrides(extra))
  if not cfg.students:
    raise UserError('--students is empty: the study compares student methods; give at least one architecture')
  planned = [(arch, seed) for arch in cfg.students for seed in seeds]
  runs.check_command(run_command(base, extra, root, *planned[0]), 'the study')
  tested = [(a, b) for a, b in pairs if a in cfg.methods and b in cfg.methods]
  skipped = [f"{a}:{b} ({', '.join(m for m in (a, b) if m not in cfg.methods)} not in --methods)"
             for a, b in pairs if (a, b) not in tested]
  for note in skipped:
    print(f'skipping pair {note}', flush=True)
  examples = eval_examples(cfg)
  if examples.groups is None:
    raise UserError(f'--metric={FLAGS.metric} scores questions, and the eval split of task {cfg.task} has no '
                    'question groups')
  root.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(root):
    records, missing = [], []
    for i, (arch, seed) in enumerate(planned):
      path, settings = runs.record_path(records_dir, arch, seed), run_settings(cfg, arch, seed)
      label = f'[{i + 1}/{len(planned)}] {arch} seed {seed}'
      if path.exists():
        records.append(load_record(path, settings))
        print(f'{label}: recorded in {path}', flush=True)
      elif FLAGS.report_only:
        missing.append((arch, seed))
      else:
        workdir = run_dir(root, arch, seed)
        results = runs.run_logged(run_command(base, extra, root, arch, seed), workdir, label)
        records.append(make_record(arch, seed, settings, workdir, results, examples))
        write_record(path, records[-1])
    if not records:
      raise UserError(f'no finished run is recorded in {records_dir} for --seeds={",".join(map(str, seeds))} '
                      f'and --students={",".join(cfg.students)}; run the study without --report_only')
    report = {'base_flagfile': str(base), 'extra_flags': extra, 'seeds': seeds, 'metric': FLAGS.metric,
              'task': cfg.task, 'split': cfg.eval_split, 'students': list(cfg.students),
              'methods': list(cfg.methods),
              'config': {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESERVED_FLAGS},
              'provenance': provenance.record(), 'records': str(records_dir),
              'runs': [{k: r[k] for k in ('student', 'seed', 'provenance', 'rows')} for r in records],
              'missing': missing, 'teacher_diversity': records[0]['teacher_diversity'],
              'summary': summarise(records, cfg.students),
              'tests': paired_tests(tested, cfg.students, records, FLAGS.metric), 'skipped_pairs': skipped}
    (root / 'study.json').write_text(json.dumps(report, indent=1))
    (root / 'study.md').write_text(markdown(report))
    plot(report, records, root / f'study_{FLAGS.metric}.png')
  print(markdown(report))


if __name__ == '__main__':
  cli.main(main)
