"""Reproduction study: a flagfile's methods over several student seeds, with paired tests between methods.

  python experiments/study.py --base_flagfile=experiments/configs/quickstart.flags --workdir=runs/study \
      --seeds=0,1,2 [--records=results/study/records] [--metric=map] [--pairs=mkdm:kd_single,...] \
      [--report_only] [-- <run.py flags>]

Each student architecture a of --students and seed s is one run (mkdm_jax.studies): the base flagfile's settings,
the run.py flags after `--` over them (settings, --name=value), then --students=a --student_seed=s, run by
run.py in <dir>/<a>/seed_<s> (its log in run.log there); teachers and their logits live in <dir>/shared, trained
once and reused by every run, so only the students vary. A finished run leaves a record,
<records>/<a>_seed<s>.json: its config, provenance, every row's metrics on eval and dev, and each evaluated
question's AP and RR per row. The report is assembled from the records alone, so a study may span sessions and
machines: keep the records (they are small; commit them) and rerun; runs with a record are not repeated (a
record made with other settings is an error naming them, before any run starts), interrupted runs resume from
their work directories, and rerunning with more seeds or architectures extends the study. --report_only trains
nothing and reports the records found.

Then, per student architecture and pair a:b of --pairs (a pair with a method outside --methods is skipped
with a note), each question's --metric score on the eval split (average precision for map, reciprocal rank
for mrr) per seed: seeds and questions are both resampled (two-level bootstrap, mkdm_jax.stats; seed s of a is
paired with seed s of b): the mean difference a - b with its 95% interval and p-value, Holm-corrected over the
architecture's pairs, and the smallest difference the study could detect (power 0.8 at level 0.05 / pairs, with
the bootstrap's standard error). --noseeds_random averages each question over the seeds and resamples questions
only, with the sign-flip p-value: the seeds are then fixed, as in the reports made before 2026-12-06.

Writes <dir>/study.json (config and provenance; every record's metrics; per row the mean and sample std
(ddof=1) over seeds of every metric, teachers once as they are fixed; the tests), <dir>/study.md (the tables)
and <dir>/study_<metric>.png (per architecture each method's score per seed and its mean, the teachers as
horizontal lines).
"""
from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax.studies import records, sweeps, tables, variants

DEFAULT_PAIRS = ['mkdm:kd_single', 'mkdm:kd_ensemble', 'tmkd:mkdm', 'mkdm:student_scratch', 'tmkd:student_scratch',
                 'kd_single:student_scratch', 'kd_ensemble:student_scratch']

FLAGS = flags.FLAGS
flags.DEFINE_string('base_flagfile', None, 'run.py flagfile of every seed.')
flags.DEFINE_string('workdir', None, 'Study folder: <arch>/seed_<s>/ per run, shared/ for the teachers.')
flags.DEFINE_list('seeds', ['0', '1', '2'], 'Student seeds (--student_seed of each run).')
flags.DEFINE_string('metric', 'map', f'Per-question score of the paired tests and the plot, one of {records.METRICS}: '
                    'average precision (map) or reciprocal rank (mrr).')
flags.DEFINE_list('pairs', DEFAULT_PAIRS, 'Method pairs A:B tested as A - B within each student architecture.')
flags.DEFINE_string('records', None, 'Folder of the finished runs\' records (default <workdir>/records).')
flags.DEFINE_bool('report_only', False, 'Train nothing: report the records found for --seeds and --students.')
flags.DEFINE_bool('seeds_random', True, 'Paired tests resample seeds and questions (two-level bootstrap: seed-to-seed '
                  'variance in the intervals); --noseeds_random averages each question over the seeds and resamples '
                  'questions only (the reports made before 2026-12-06).')

flags.DEFINE_bool('allow_dirty', False, 'Run from a work tree with uncommitted changes, storing its diff (git diff '
                  'HEAD) in each new record; without it such a tree is refused before any run.')

flags.mark_flags_as_required(['base_flagfile', 'workdir'])


def main(argv):
  study = variants.study(FLAGS.base_flagfile, argv[1:], seeds=variants.parse_seeds(FLAGS.seeds),
                         root=FLAGS.workdir, records=FLAGS.records or f'{FLAGS.workdir}/records',
                         pairs=variants.parse_pairs(FLAGS.pairs), metric=FLAGS.metric, seeds_random=FLAGS.seeds_random,
                         allow_dirty=FLAGS.allow_dirty)
  report, _ = sweeps.run_study(study, FLAGS.report_only)
  print(tables.study_markdown(report))


if __name__ == '__main__':
  cli.main(main)
