"""What drives a method difference: the same small study (experiments/study.py) under several variants of the
flags, and how each variant moves the difference of a method pair against a reference variant.

  python experiments/factors.py --base_flagfile=experiments/configs/wikiqa_study.flags --workdir=runs/factors \
      --records=results/study/factors --student=bert3 --seeds=0,1 --pair=mkdm:kd_single \
      --variant='reference:' --variant='alpha=0.2:--alpha=0.2' [--report_only] [-- <flags of every variant>]

Each --variant NAME:FLAGS is one study.py study over --seeds of --student, with the flags after `--` and then
the variant's space-separated run.py flags, in <workdir>/<NAME> with records in <records>/<NAME> (so, like a
study, factors resume across sessions from their records). The first variant is the reference; with
--reference_records its records may come from another study (e.g. the main study's, when the flags agree).

For each variant and each method pair of --pair whose methods it runs: both methods' mean metric, the mean
difference A - B with its 95% interval over questions (each question's score averaged over seeds first), the
teachers' diversity on dev, and against the reference variant the change of the difference (per question:
(A - B) in the variant minus (A - B) in the reference), with its interval and sign-flip p-value. Writes
<workdir>/factors.json and <workdir>/factors.md. With --report_only, a variant other than the reference that has
no records yet is listed as not run, so a factor analysis spread over sessions can be reported as it lands.
"""
import json
import pathlib
import re
import subprocess
import sys

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import numpy as np
import runs
from absl import flags

from mkdm_jax import provenance, stats
from mkdm_jax.errors import UserError

STUDY_PY = pathlib.Path(__file__).with_name('study.py')

FLAGS = flags.FLAGS
flags.DEFINE_string('base_flagfile', None, 'run.py flagfile of every variant.')
flags.DEFINE_string('workdir', None, 'Folder of the variants\' studies (<workdir>/<variant>).')
flags.DEFINE_string('records', None, 'Folder of the variants\' records (default <workdir>/records/<variant>).')
flags.DEFINE_string('reference_records', None, 'Records folder of the first (reference) variant, if not its own.')
flags.DEFINE_string('student', 'bert3', 'The one student architecture of every variant.')
flags.DEFINE_list('seeds', ['0', '1'], 'Student seeds of every variant.')
flags.DEFINE_list('pair', ['mkdm:kd_single'], 'Method pairs A:B whose difference the variants may move.')
flags.DEFINE_multi_string('variant', [], 'NAME:FLAGS, run.py flags separated by spaces; the first is the reference.')
flags.DEFINE_string('metric', 'map', 'Per-question score: map (average precision) or mrr (reciprocal rank).')
flags.DEFINE_bool('report_only', False, 'Train nothing: report the records found (variants without any '
                  'are listed as not run).')

flags.mark_flags_as_required(['base_flagfile', 'workdir'])


def parse_variants(specs):
  """[(name, [flags])] from --variant values NAME:FLAGS."""
  variants = []
  for spec in specs:
    name, sep, rest = spec.partition(':')
    if not sep or not re.fullmatch(r'[\w.=-]+', name):
      raise UserError(f'--variant={spec}: expected NAME:FLAGS with a name of letters, digits and _-.= '
                      '(e.g. --variant="alpha=0.2:--alpha=0.2")')
    variant_flags = rest.split()
    bad = [f for f in variant_flags if not f.startswith('--')]
    if bad:
      raise UserError(f'--variant={spec}: {bad[0]!r} is not a --flag')
    variants.append((name, variant_flags))
  if len(variants) < 2 or len({n for n, _ in variants}) != len(variants):
    raise UserError('give at least two --variant values (the first is the reference), each name once')
  return variants


def records_dir(name, first):
  if first and FLAGS.reference_records:
    return pathlib.Path(FLAGS.reference_records).absolute()
  root = pathlib.Path(FLAGS.records).absolute() if FLAGS.records else pathlib.Path(FLAGS.workdir).absolute() / 'records'
  return root / name


def run_variant(name, variant_flags, extra, records):
  """study.py for one variant; its study.json."""
  workdir = pathlib.Path(FLAGS.workdir).absolute() / name
  cmd = [sys.executable, str(STUDY_PY), f'--base_flagfile={FLAGS.base_flagfile}', f'--workdir={workdir}',
         f'--records={records}', f'--seeds={",".join(FLAGS.seeds)}', f'--metric={FLAGS.metric}',
         f'--pairs={",".join(FLAGS.pair)}', *(['--report_only'] if FLAGS.report_only else []),
         '--', *extra, f'--students={FLAGS.student}', *variant_flags]
  print(f'variant {name}: {" ".join(cmd[2:])}', flush=True)
  proc = subprocess.run(cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True)
  if proc.returncode:
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    raise UserError(f'variant {name}: study.py failed: {lines[-1] if lines else proc.returncode}')
  return json.loads((workdir / 'study.json').read_text())


def question_differences(records, a, b):
  """Per question, (A - B) averaged over the records' seeds."""
  scores = lambda method: np.mean([r['question_scores'][FLAGS.metric][f"{FLAGS.student}_{method}"]
                                   for r in records], axis=0)
  return scores(a) - scores(b)


def variant_records(study):
  return [json.loads(runs.record_path(study['records'], run['student'], run['seed']).read_text())
          for run in study['runs']]


def markdown(report):
  lines = [f"# Factors: {report['student']}, seeds {', '.join(report['seeds'])}, `{report['metric']}` per question",
           '', f"`{report['base_flagfile']}`; reference variant `{report['variants'][0]['name']}`. "
           f"{report['provenance']['date']}, {report['provenance']['cpu_model']}, commit "
           f"{report['provenance']['commit'][:12]}.", '',
           'A - B: mean over questions of the seed-averaged difference, 95% bootstrap interval. Change: the '
           'variant\'s A - B minus the reference\'s, per question, with its interval and sign-flip p-value '
           '(not corrected for the number of variants).', '',
           '| variant | flags | seeds | teacher disagreement (dev) | A | B | mean A | mean B | A - B [95% CI] | '
           'change vs reference [95% CI] | p |', '|' + '---|' * 11]
  for v in report['variants']:
    for t in v['pairs']:
      change = t.get('change')
      lines.append(
          f"| {v['name']} | `{' '.join(v['flags']) or '-'}` | {v['seeds']} | "
          f"{v['teacher_disagreement']:.4f} | {t['a']} | {t['b']} | {t['mean_a']:.4f} | {t['mean_b']:.4f} | "
          f"{t['mean_difference']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | "
          + (f"{change['mean_difference']:+.4f} [{change['ci_low']:+.4f}, {change['ci_high']:+.4f}] | "
             f"{change['p_value']:.4f} |" if change else '- | - |'))
  if report['not_run']:
    lines += ['', 'Not run yet (no records): ' + ', '.join(f'`{name}`' for name in report['not_run']) + '.']
  return '\n'.join(lines) + '\n'


def main(argv):
  extra = argv[1:]
  if extra and extra[0] == '--':
    extra = extra[1:]
  if any(not f.startswith('--') for f in extra):
    raise UserError(f'unexpected arguments {extra}: run.py flags after -- must start with --')
  variants = parse_variants(FLAGS.variant)
  if not pathlib.Path(FLAGS.base_flagfile).is_file():
    raise UserError(f'--base_flagfile={FLAGS.base_flagfile}: no such file')
  pairs = [tuple(p.split(':')) for p in FLAGS.pair]
  reference, out, not_run = {}, [], []
  for i, (name, variant_flags) in enumerate(variants):
    records_folder = records_dir(name, i == 0)
    if FLAGS.report_only and i and not any(
        runs.record_path(records_folder, FLAGS.student, seed).exists() for seed in FLAGS.seeds):
      print(f'variant {name}: no records in {records_folder} yet: listed as not run', flush=True)
      not_run.append(name)
      continue
    study = run_variant(name, variant_flags, extra, records_folder)
    records = variant_records(study)
    methods = set(study['methods'])
    entry = {'name': name, 'flags': variant_flags, 'seeds': len(records),
             'teacher_disagreement': records[0]['teacher_diversity']['dev']['disagreement'],
             'teacher_symmetric_kl': records[0]['teacher_diversity']['dev']['symmetric_kl'], 'pairs': []}
    for a, b in pairs:
      if not {a, b} <= methods:
        continue
      means = {r['name']: r['metrics'][FLAGS.metric]['mean'] for r in study['summary']}
      diff = question_differences(records, a, b)
      test = {'a': a, 'b': b, 'mean_a': means[f'{FLAGS.student}_{a}'], 'mean_b': means[f'{FLAGS.student}_{b}'],
              **stats.paired_bootstrap(diff, np.zeros_like(diff))}
      if i == 0:
        reference[(a, b)] = diff
      elif (a, b) in reference:
        test['change'] = stats.paired_bootstrap(diff, reference[(a, b)])
      entry['pairs'].append(test)
    out.append(entry)
  report = {'base_flagfile': FLAGS.base_flagfile, 'extra_flags': extra, 'student': FLAGS.student,
            'seeds': FLAGS.seeds, 'metric': FLAGS.metric, 'provenance': provenance.record(), 'variants': out,
            'not_run': not_run}
  root = pathlib.Path(FLAGS.workdir)
  (root / 'factors.json').write_text(json.dumps(report, indent=1))
  (root / 'factors.md').write_text(markdown(report))
  print(markdown(report))


if __name__ == '__main__':
  cli.main(main)
