"""Ablations: runs experiments/run.py once per swept setting and tabulates and plots one metric.

  python experiments/ablate.py --base_flagfile=experiments/configs/quickstart.flags --workdir=runs/ablate \
      --sweep=alpha=0.1,0.5,0.9 --sweep=temperature=1,2,4 [--metric=map] [-- --methods=student_scratch,mkdm]

Each value of each --sweep is one variant that changes one setting of the base (sweeps are not crossed): the
base flagfile's settings, the run.py flags after `--` over them (settings, --name=value), then --<flag>=<value>,
run by run.py in <dir>/<flag>=<value> (mkdm_jax.studies builds and runs the variants).
Which flags change the teachers is declared once, in mkdm_jax.distill.SETTINGS: flags that change only
students (or only evaluation) share `<dir>/shared`, where the first variant trains the teachers and
computes their logits and the later ones reuse them. Sweeping --num_teachers retrains nothing either:
teacher_0..teacher_{k-1} are shared. A flag that changes the teachers (data, training, teacher settings:
teacher_epochs, max_length, data_seed, ...) gives each variant its own teachers, in its work directory.

Writes <dir>/ablation.json (every variant's results), <dir>/ablation.md (per sweep, setting x method) and
<dir>/ablation_<flag>.png (metric vs setting, one line per method). A variant's log is <variant>/run.log.
Rerunning the same command resumes: run.py skips finished stages and resumes interrupted training.
--dry_run prints each variant's run.py command (every setting that differs from its default) and stops.
"""
import pathlib
import re
import shlex

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax.errors import UserError
from mkdm_jax.metrics import METRICS
from mkdm_jax.studies import runner, sweeps, tables, variants

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
    if flag in variants.ABLATION_RESERVED:
      raise UserError(f'--sweep={spec}: --{flag} is set by ablate.py itself')
    if flag in [f for f, _ in sweeps]:
      raise UserError(f'--sweep={spec}: --{flag} is swept twice; give all its values in one --sweep')
    if len(set(values)) != len(values):
      raise UserError(f'--sweep={spec}: repeated value')
    sweeps.append((flag, values))
  return sweeps


def main(argv):
  if FLAGS.metric is not None and FLAGS.metric not in METRICS:
    raise UserError(f'--metric={FLAGS.metric}: unknown; choose from {METRICS}')
  base, root = pathlib.Path(FLAGS.base_flagfile).absolute(), pathlib.Path(FLAGS.workdir).absolute()
  ablation = variants.ablation_variants(FLAGS.base_flagfile, argv[1:], parse_sweeps(FLAGS.sweep), root)
  if FLAGS.dry_run:
    print('\n'.join(shlex.join(runner.command(v.cfg)) for v in ablation))
    return
  report = sweeps.run_ablation(ablation, flagfile=str(base), flags=argv[1:], root=root, metric=FLAGS.metric)
  print(tables.ablation_markdown(report))


if __name__ == '__main__':
  cli.main(main)
