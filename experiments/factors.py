"""What drives a method difference: the same small study (experiments/study.py) under several variants of the
flags, and how each variant moves the difference of a method pair against a reference variant.

  python experiments/factors.py --base_flagfile=experiments/configs/wikiqa_study.flags --workdir=runs/factors \
      --records=results/study/factors --student=bert3 --seeds=0,1 --pair=mkdm:kd_single \
      --variant='reference:' --variant='alpha=0.2:--alpha=0.2' [--report_only] [-- <flags of every variant>]

Each --variant NAME:FLAGS is one study (experiments/study.py's, run in this process by mkdm_jax.studies) over
--seeds of --student, with the flags after `--` and then the variant's space-separated run.py flags (settings,
--name=value), in <workdir>/<NAME> (its study.json, study.md and plot there) with records in <records>/<NAME>
(so, like a study, factors resume across sessions from their records). The first variant is the reference; with
--reference_records its records may come from another study (e.g. the main study's, when the flags agree).

For each variant and each method pair of --pair whose methods it runs: both methods' mean metric, the mean
difference A - B with its 95% interval over questions (each question's score averaged over seeds first), the
teachers' diversity on dev, and against the reference variant the change of the difference (per question:
(A - B) in the variant minus (A - B) in the reference), with its interval and sign-flip p-value. Writes
<workdir>/factors.json and <workdir>/factors.md. With --study_pairs, <workdir>/merged/ holds one study report of
every variant's methods side by side (the reference's by name, another variant's as METHOD@VARIANT, e.g.
mkdm@head_layers1), with seed-aware paired tests of those pairs across variants: a variant that runs only
--methods=mkdm is then compared with the reference's kd_single directly. With --size_curve, <workdir>/curve.json and curve_<metric>.png
give each method's metric against the stage-1 pairs of its variant's --unlabelled_corpus (0 for one-stage methods),
e.g. --variant='100k:--unlabelled_corpus=corpora/squad-100000' --variant='436k:--unlabelled_corpus=corpora/squad-all'. With --report_only, a variant other than the reference that has
no records yet is listed as not run, so a factor analysis spread over sessions can be reported as it lands.
"""
import pathlib
import re

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax.errors import UserError
from mkdm_jax.studies import sweeps, tables, variants

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
flags.DEFINE_bool('seeds_random', True, 'Tests resample seeds and questions (two-level bootstrap); '
                  '--noseeds_random: questions only, seeds fixed (the reports made before 2026-12-06).')
flags.DEFINE_list('study_pairs', [], 'Also write one study of every variant\'s methods side by side in '
                  '<workdir>/merged (study.json, study.md, plot): the reference\'s methods by name, another variant\'s '
                  'as METHOD@VARIANT, with paired tests of these A:B pairs, e.g. mkdm@head_layers1:kd_single.')
flags.DEFINE_bool('size_curve', False, 'Also write the stage-1 size curve of variants that differ in '
                  '--unlabelled_corpus: <workdir>/curve.json (per student and method, the metric against the '
                  'corpus\'s pairs) and curve_<metric>.png.')
flags.DEFINE_bool('report_only', False, 'Train nothing: report the records found (variants without any '
                  'are listed as not run).')

flags.DEFINE_bool('allow_dirty', False, 'Run from a work tree with uncommitted changes, storing its diff (git diff '
                  'HEAD) in each new record; without it such a tree is refused before any run.')

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


def records_dir(index, name):
  if index == 0 and FLAGS.reference_records:
    return FLAGS.reference_records
  return pathlib.Path(FLAGS.records or f'{FLAGS.workdir}/records') / name


def main(argv):
  extra = argv[1:]
  root = pathlib.Path(FLAGS.workdir).absolute()
  factor_variants = variants.factor_variants(
      FLAGS.base_flagfile, extra, parse_variants(FLAGS.variant), student=FLAGS.student,
      seeds=variants.parse_seeds(FLAGS.seeds), root=root, records=records_dir,
      pairs=variants.parse_pairs(FLAGS.pair, 'pair'), metric=FLAGS.metric, seeds_random=FLAGS.seeds_random,
      allow_dirty=FLAGS.allow_dirty)
  report = sweeps.run_factors(factor_variants, flagfile=FLAGS.base_flagfile, flags=extra, root=root,
                              report_only=FLAGS.report_only,
                              study_pairs=variants.parse_pairs(FLAGS.study_pairs, 'study_pairs', known=False)
                              if FLAGS.study_pairs else (), curve=FLAGS.size_curve)
  print(tables.factors_markdown(report))


if __name__ == '__main__':
  cli.main(main)
