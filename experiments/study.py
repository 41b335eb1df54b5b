"""Reproduction study: a flagfile's methods over several student seeds, with paired tests between methods.

  python experiments/study.py --base_flagfile=experiments/configs/quickstart.flags --workdir=runs/study \
      --seeds=0,1,2 [--metric=map] [--pairs=mkdm:kd_single,...] [-- <run.py flags>]

Seed s is one run.py run, `--flagfile=<base> <flags after --> --student_seed=s`, in <dir>/seed_<s> (its log in
<dir>/seed_<s>/run.log); teachers and their logits live in <dir>/shared, trained once and reused by every
seed, so only the students vary. Rerunning resumes: run.py skips finished stages and resumes interrupted
training, so a study may span several sessions, and rerunning with more seeds extends it.

Then, per student architecture and pair a:b of --pairs (a pair with a method outside --methods is skipped
with a note), each question's --metric score on the eval split (average precision for map, reciprocal rank
for mrr) is averaged over seeds, and questions are resampled (seeds x questions are not independent):
the mean difference a - b with its 95% bootstrap interval, the sign-flip p-value (mkdm_jax.stats),
Holm-corrected over the architecture's pairs, and the smallest difference the study could detect (power
0.8 at level 0.05).

Writes <dir>/study.json (config and provenance; per seed every row's metrics and dev_metrics; per row the
mean and sample std (ddof=1) over seeds of every metric; the tests), <dir>/study.md (the tables) and
<dir>/study_<metric>.png (per architecture each method's score per seed and its mean, the teachers as
horizontal lines).
"""
import dataclasses
import json
import pathlib
import sys

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402
import runs  # noqa: E402
from absl import app, flags  # noqa: E402

from mkdm_jax import distill, pipeline, provenance, stats  # noqa: E402
from mkdm_jax.errors import UserError  # noqa: E402
from mkdm_jax.metrics import average_precisions  # noqa: E402
from mkdm_jax.workdir import WorkdirLock, run_cli  # noqa: E402

RESERVED_FLAGS = ('workdir', 'shared_dir', 'flagfile', 'student_seed')
METRICS = ('map', 'mrr')
ALPHA, POWER = 0.05, 0.8
DEFAULT_PAIRS = ['mkdm:kd_single', 'mkdm:kd_ensemble', 'tmkd:mkdm', 'mkdm:student_scratch', 'tmkd:student_scratch',
                 'kd_single:student_scratch', 'kd_ensemble:student_scratch']

FLAGS = flags.FLAGS
flags.DEFINE_string('base_flagfile', None, 'run.py flagfile of every seed.')
flags.DEFINE_string('workdir', None, 'Study folder: seed_<s>/ per seed, shared/ for the teachers.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Student seeds (--student_seed of each run).')
flags.DEFINE_string('metric', 'map', f'Per-question score of the paired tests and the plot, one of {METRICS}: '
                    'average precision (map) or reciprocal rank (mrr).')
flags.DEFINE_list('pairs', DEFAULT_PAIRS, 'Method pairs A:B tested as A - B within each student architecture.')

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
  types = pipeline.config_types()
  values = {}
  for arg in args:
    name, eq, value = arg[2:].partition('=')
    if not eq and name.startswith('no') and types.get(name[2:]) is bool:
      name, value = name[2:], 'false'
    values[name] = value if eq else 'true'
  return {name: value for name, value in values.items() if name in types}


def seed_dir(root, seed):
  return root / f'seed_{seed}'


def seed_command(base, extra, root, seed):
  return runs.command(base, extra, f'--student_seed={seed}', f'--workdir={seed_dir(root, seed)}',
                      f'--shared_dir={root / "shared"}')


def eval_examples(cfg):
  """The eval split's rows as mkdm_jax.pipeline.load_examples reads them (labels and question groups)."""
  return pipeline.load_split_rows(cfg, cfg.eval_split, cfg.max_eval_rows)


def question_scores(path, examples, metric):
  """Row name -> score per evaluated question (AP for map, RR for mrr) from a run's eval/probabilities.npz,
  its rows aligned to `examples` by row key."""
  with np.load(path) as saved:
    position = {key: i for i, key in enumerate(saved['eval/ids'].tolist())}
    if any(key not in position for key in examples.ids.tolist()):
      raise UserError(f'{path}: its eval rows are not the eval split of the flags given (changed data or '
                      '--max_eval_rows?); rerun the study in a new --workdir')
    rows = np.array([position[key] for key in examples.ids.tolist()])
    score = 1 if metric == 'map' else 2  # average_precisions gives (group keys, AP, RR)
    return {name.removeprefix('eval/'): average_precisions(examples.labels, saved[name][rows, 1],
                                                           examples.groups)[score]
            for name in saved.files if name.startswith('eval/') and name != 'eval/ids'}


def seed_record(seed, workdir, results):
  rows = [{k: r.get(k) for k in ('name', 'method', 'student', 'metrics', 'dev_metrics')} for r in results['rows']]
  return {'seed': seed, 'workdir': str(workdir), 'provenance': results['provenance'], 'rows': rows}


def mean_std(values):
  """Mean and sample standard deviation (ddof=1; None for one value)."""
  values = np.asarray(values, float)
  return {'mean': float(values.mean()), 'std': float(values.std(ddof=1)) if len(values) > 1 else None}


def summarise(per_seed):
  """Per row (in results.json order): mean and std over seeds of every metric, on eval and on dev."""
  by_name = [{r['name']: r for r in record['rows']} for record in per_seed]
  summary = []
  for first in per_seed[0]['rows']:
    rows = [seed[first['name']] for seed in by_name]
    entry = {'name': first['name'], 'method': first['method'], 'student': first['student'], 'seeds': len(rows)}
    for key in ('metrics', 'dev_metrics'):
      if first[key] is not None:
        entry[key] = {m: mean_std([r[key][m] for r in rows]) for m in first[key]}
    summary.append(entry)
  return summary


def paired_tests(pairs, students, scores):
  """Per student architecture, each pair's tests on the seed-averaged question scores; Holm within the
  architecture."""
  tests = []
  for arch in students:
    rows = []
    for a, b in pairs:
      x, y = scores[f'{arch}_{a}'], scores[f'{arch}_{b}']
      rows.append({'student': arch, 'a': a, 'b': b, 'questions': len(x), **stats.paired_bootstrap(x, y),
                   'mde': stats.minimal_detectable_difference(x - y, ALPHA, POWER)})
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
                                            else '') + f". {provenance_line(report['provenance'])}.", '',
           f"## Mean ± std over seeds ({report['split']})", '',
           '| model | method | student | seeds | ' + ' | '.join(names) + ' |', '|' + '---|' * (4 + len(names))]
  for r in summary:
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | {r['seeds']} | "
                 + ' | '.join(cell(r['metrics'][n]) for n in names) + ' |')
  lines += ['', f"## Paired tests: `{report['metric']}` per question, averaged over seeds", '',
            f"A - B over the questions, with its 95% bootstrap interval (questions resampled), the two-sided "
            f"sign-flip p-value, Holm-corrected over each student's pairs, and the minimal detectable difference "
            f"(power {POWER} at level {ALPHA}).", '',
            '| student | A - B | questions | mean diff | 95% CI | p | Holm p | MDE |', '|' + '---|' * 8]
  for t in report['tests']:
    lines.append(f"| {t['student']} | {t['a']} - {t['b']} | {t['questions']} | {t['mean_difference']:+.4f} | "
                 f"[{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {t['p_value']:.4f} | {t['p_holm']:.4f} | "
                 f"{t['mde']:.4f} |")
  if report['skipped_pairs']:
    lines += ['', 'Skipped: ' + '; '.join(report['skipped_pairs']) + '.']
  return '\n'.join(lines) + '\n'


def plot(report, path):
  """Per student architecture: each method's metric per seed (points) and its mean (bar), teachers as lines."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  metric, summary = report['metric'], report['summary']
  per_seed = [{r['name']: r['metrics'][metric] for r in record['rows']} for record in report['per_seed']]
  fig, axes = plt.subplots(1, len(report['students']), figsize=(1.5 + 3 * len(report['students']), 4.5),
                           sharey=True, squeeze=False)
  for ax, arch in zip(axes[0], report['students']):
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
    ax.set_title(arch)
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
  commands = [seed_command(base, extra, root, s) for s in seeds]
  runs.check_command(commands[0], 'the study')
  cfg = pipeline.config_from_flagfile(base, **config_overrides(extra))
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
    per_seed = []
    for i, (seed, cmd) in enumerate(zip(seeds, commands)):
      results = runs.run_logged(cmd, seed_dir(root, seed), f'[{i + 1}/{len(seeds)}] seed {seed}')
      per_seed.append(seed_record(seed, seed_dir(root, seed), results))
    by_seed = [question_scores(seed_dir(root, s) / 'eval' / 'probabilities.npz', examples, FLAGS.metric)
               for s in seeds]
    scores = {name: np.mean([run[name] for run in by_seed], axis=0) for name in by_seed[0]}
    report = {'base_flagfile': str(base), 'extra_flags': extra, 'seeds': seeds, 'metric': FLAGS.metric,
              'task': cfg.task, 'split': cfg.eval_split, 'students': list(cfg.students),
              'methods': list(cfg.methods),
              'config': {k: v for k, v in dataclasses.asdict(cfg).items() if k not in RESERVED_FLAGS},
              'provenance': provenance.record(), 'per_seed': per_seed, 'summary': summarise(per_seed),
              'tests': paired_tests(tested, cfg.students, scores), 'skipped_pairs': skipped}
    (root / 'study.json').write_text(json.dumps(report, indent=1))
    (root / 'study.md').write_text(markdown(report))
    plot(report, root / f'study_{FLAGS.metric}.png')
  print(markdown(report))


if __name__ == '__main__':
  run_cli(lambda: app.run(main))
