"""Compares two per-class logit files (`run.py --export_teacher_logits` exports) on the rows both hold.

  python experiments/compare_scores.py --a=results/study/teachers/teacher_0.tsv.gz \
      --b=results/study/teachers_squad/teacher_0.tsv.gz [--num_classes=2]

Prints one JSON object (mkdm_jax.teachers.scores.compare_logits): row counts, the largest |logit difference|
and, for two classes, the mean |margin difference|, the margins' Spearman correlation and the share of rows
with the same predicted class. Use it to check that a retrained teacher reproduces an exported one.
"""
import json

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax.errors import UserError
from mkdm_jax.teachers import scores

FLAGS = flags.FLAGS
flags.DEFINE_string('a', None, 'First logit file (TSV or JSONL, optionally gzipped).')
flags.DEFINE_string('b', None, 'Second logit file.')
flags.DEFINE_integer('num_classes', 2, 'Logits per row.', lower_bound=2)

flags.mark_flags_as_required(['a', 'b'])


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  print(json.dumps(scores.compare_logits(FLAGS.a, FLAGS.b, FLAGS.num_classes)))


if __name__ == '__main__':
  cli.main(main)
