"""Ablations: runs experiments/run.py once per swept setting and tabulates and plots one metric.

  python experiments/ablate.py --base_flagfile=experiments/configs/quickstart.flags --workdir=runs/ablate \
      --sweep=alpha=0.1,0.5,0.9 --sweep=temperature=1,2,4 [--metric=map] [-- --methods=student_scratch,mkdm]

Each value of each --sweep is one variant that changes one flag of the base (sweeps are not crossed):
  run.py --flagfile=<base> <flags after --> --<flag>=<value> --workdir=<dir>/<flag>=<value> --shared_dir=...
Which flags change the teachers is declared once, in mkdm_jax.distill.SETTINGS: flags that change only
students (or only evaluation) share `<dir>/shared`, where the first variant trains the teachers and
computes their logits and the later ones reuse them. Sweeping --num_teachers retrains nothing either:
teacher_0..teacher_{k-1} are shared. A flag that changes the teachers (data, training, teacher settings:
teacher_epochs, max_length, data_seed, ...) gives each variant its own teachers, in its work directory.

Writes <dir>/ablation.json (every variant's results), <dir>/ablation.md (per sweep, setting x method) and
<dir>/ablation_<flag>.png (metric vs setting, one line per method). A variant's log is <variant>/run.log.
Rerunning the same command resumes: run.py skips finished stages and resumes interrupted training.
"""
import json
import pathlib
import re

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import runs
from absl import flags

from mkdm_jax import distill
from mkdm_jax.errors import UserError
from mkdm_jax.metrics import METRICS
from mkdm_jax.workdir import WorkdirLock

RESERVED_FLAGS = ('workdir', 'shared_dir', 'flagfile')

FLAGS = flags.FLAGS
flags.DEFINE_string('base_flagfile', None, 'run.py flagfile every variant starts from.')
flags.DEFINE_string('workdir', None, 'Ablation folder: one work directory per variant, plus shared/.')
flags.DEFINE_multi_string('sweep', [], 'FLAG=V1,V2,...: one variant per value (repeat for more flags).')
flags.DEFINE_string('metric', None, "Metric tabulated and plotted (default: the task's primary metric).")
flags.DEFINE_boolean('dry_run', False, 'Print the variants\' run.py commands and stop.')

flags.mark_flags_as_required(['base_flagfile', 'workdir'])


def parse_sweeps(specs):
  """[(flag, [values])] from --sweep values 'flag=v1,v2'."""
  if not specs:
    raise UserError('give at least one --sweep=FLAG=V1,V2,...')
  sweeps = []
  for spec in specs:
    flag, _, values = spec.partition('=')
    values = [v.strip() for v in values.split(',')] if values else []
    if not re.fullmatch(r'[a-z_][a-z0-9_]*', flag) or not values or '' in values:
      raise UserError(f'--sweep={spec}: expected FLAG=V1,V2,... (e.g. --sweep=alpha=0.1,0.5,0.9)')
    if flag in RESERVED_FLAGS:
      raise UserError(f'--sweep={spec}: --{flag} is set by ablate.py itself')
    if flag in [f for f, _ in sweeps]:
      raise UserError(f'--sweep={spec}: --{flag} is swept twice; give all its values in one --sweep')
    if len(set(values)) != len(values):
      raise UserError(f'--sweep={spec}: repeated value')
    sweeps.append((flag, values))
  return sweeps


def variant_dir(root, flag, value):
  return root / f"{flag}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def variant_command(base, extra, root, flag, value):
  """run.py command line of one variant; teacher-side flags keep teachers in the variant's own folder."""
  workdir = variant_dir(root, flag, value)
  shared = workdir if distill.changes_teachers(flag) else root / 'shared'
  return runs.command(base, extra, f'--{flag}={value}', f'--workdir={workdir}', f'--shared_dir={shared}')


def summarise(flag, values, results, metric, root):
  """One sweep's record: per variant its scores by method (student_method when several students)."""
  students = [{r['student'] for r in res['rows'] if r['student']} for res in results]
  by_name = any(len(s) > 1 for s in students)
  columns, variants = [], []
  for value, res in zip(values, results):
    scores = {}
    for row in res['rows']:
      if row['method'] == 'teacher':
        continue
      if metric not in row['metrics']:
        raise UserError(f'--metric={metric}: not among the metrics {sorted(row["metrics"])} '
                        f'of {flag}={value}')
      key = row['name'] if by_name else row['method']
      scores[key] = row['metrics'][metric]
      if key not in columns:
        columns.append(key)
    variants.append({'value': value, 'workdir': str(variant_dir(root, flag, value)), 'scores': scores,
                     'rows': res['rows']})
  return {'flag': flag, 'shares_teachers': not distill.changes_teachers(flag), 'columns': columns,
          'variants': variants}


def markdown(report):
  lines = [f"# Ablation: `{report['metric']}` on {report['task']} ({report['split']})", '',
           f"Base: `{report['base_flagfile']}`" + (f" with `{' '.join(report['extra_flags'])}`"
                                                   if report['extra_flags'] else '') + '.']
  for sweep in report['sweeps']:
    columns = sweep['columns']
    shared = 'shared by all variants' if sweep['shares_teachers'] else 'trained per variant'
    lines += ['', f"## {sweep['flag']} (teachers {shared})", '',
              f"| {sweep['flag']} | " + ' | '.join(columns) + ' |', '|' + '---|' * (len(columns) + 1)]
    for v in sweep['variants']:
      cells = [f"{v['scores'][c]:.4f}" if c in v['scores'] else '-' for c in columns]
      lines.append(f"| {v['value']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'


def plot(sweep, metric, path):
  """Metric vs setting, one line per method; numeric settings on a numeric axis."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  values = [v['value'] for v in sweep['variants']]
  try:
    xs = [float(v) for v in values]
  except ValueError:
    xs = values
  fig, ax = plt.subplots(figsize=(6, 4))
  for column in sweep['columns']:
    points = [(x, v['scores'][column]) for x, v in zip(xs, sweep['variants']) if column in v['scores']]
    style = '--' if column.endswith('teacher_ensemble') else '-'
    ax.plot([p[0] for p in points], [p[1] for p in points], style, marker='o', label=column)
  if xs != values:  # numeric: ticks at the settings, a log axis when they span two decades
    if min(xs) > 0 and max(xs) >= 100 * min(xs):
      ax.set_xscale('log')
    ax.set_xticks(xs, values)
    ax.minorticks_off()
  ax.set_xlabel(f"--{sweep['flag']}")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} vs --{sweep['flag']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv):
  extra = runs.parse_extra_flags(argv[1:], RESERVED_FLAGS, 'ablate.py')
  if FLAGS.metric is not None and FLAGS.metric not in METRICS:
    raise UserError(f'--metric={FLAGS.metric}: unknown; choose from {METRICS}')
  sweeps = parse_sweeps(FLAGS.sweep)
  base = pathlib.Path(FLAGS.base_flagfile).absolute()
  if not base.is_file():
    raise UserError(f'--base_flagfile={FLAGS.base_flagfile}: no such file')
  root = pathlib.Path(FLAGS.workdir).absolute()
  plan = [(flag, value, variant_command(base, extra, root, flag, value))
          for flag, values in sweeps for value in values]
  names = [variant_dir(root, flag, value) for flag, value, _ in plan]
  if len(set(names)) != len(names):
    raise UserError('two swept values map to the same variant folder; make them differ in letters or digits')
  for flag, value, cmd in plan:
    runs.check_command(cmd, f'variant {flag}={value}')
  if FLAGS.dry_run:
    print('\n'.join(' '.join(cmd) for _, _, cmd in plan))
    return
  root.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(root):
    results = {}
    for i, (flag, value, cmd) in enumerate(plan):
      label = f'[{i + 1}/{len(plan)}] {flag}={value}'
      results[flag, value] = runs.run_logged(cmd, variant_dir(root, flag, value), label)
    first = results[plan[0][0], plan[0][1]]
    metric = FLAGS.metric or first['primary_metric']
    report = {'base_flagfile': str(base), 'extra_flags': extra, 'metric': metric, 'task': first['task'],
              'split': first['split'],
              'sweeps': [summarise(flag, values, [results[flag, v] for v in values], metric, root)
                         for flag, values in sweeps]}
    (root / 'ablation.json').write_text(json.dumps(report, indent=1))
    (root / 'ablation.md').write_text(markdown(report))
    for sweep in report['sweeps']:
      plot(sweep, metric, root / f"ablation_{sweep['flag']}.png")
  print(markdown(report))


if __name__ == '__main__':
  cli.main(main)
