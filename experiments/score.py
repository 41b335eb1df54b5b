"""Scores a file of question-passage pairs of any size with a saved teacher or student (re-ranking).

  python experiments/score.py --model=runs/quickstart/students/bert3_mkdm --input=pairs.tsv \
      --text_a_col=question --text_b_col=passage --group_col=qid --output=scores.tsv

The file is read, tokenised and scored --chunk_rows rows at a time (memory does not grow with the file),
with length buckets and a progress bar. The output is the prediction file of `experiments/evaluate.py
--predictions` (`mkdm_jax.predictions`: group, row key, label, then the combined and per-head
positive-class probabilities), one row per input pair in input order; it appears under its name only
when every row is scored. Labels are optional (-1 when --label_col is not given); for metrics use
evaluate.py. TSV columns are header names, or 0-based indices for a file without a header; .jsonl files
(or --format=jsonl) name keys.
"""
import json
import pathlib
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
from absl import flags

from mkdm_jax import predictions, saved_model, train
from mkdm_jax.data import readers
from mkdm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Saved model folder (a teacher or student folder of a work directory).')
flags.DEFINE_string('input', None, 'Pairs to score: a TSV or JSON-lines file.')
flags.DEFINE_string('output', None, 'Prediction file to write (TSV).')
flags.DEFINE_enum('format', None, ['tsv', 'jsonl'], 'Input format (default: jsonl for *.jsonl, else tsv).')
flags.DEFINE_string('text_a_col', None, 'Question column (TSV header name or index; JSONL key).')
flags.DEFINE_string('text_b_col', None, 'Passage column.')
flags.DEFINE_string('label_col', None, "Optional gold-label column, copied to the output (one of the model's "
                    'label names or its index).')
flags.DEFINE_string('group_col', None, 'Optional question-id column, copied to the output.')
flags.DEFINE_boolean('skip_bad_rows', False, 'Skip malformed rows (counted) instead of failing.')
flags.DEFINE_integer('batch_size', 128, 'Inference batch size.')
flags.DEFINE_integer('chunk_rows', 16384, 'Rows read, tokenised and scored at a time (bounds memory).')
flags.DEFINE_boolean('overwrite', False, 'Replace --output if it exists.')
flags.DEFINE_boolean('progress', True, 'Show a progress bar.')

for _name in ('model', 'input', 'output', 'text_a_col', 'text_b_col'):
  flags.mark_flag_as_required(_name)


def open_input(spec):
  """The input's `PairStream`, with the model's label names."""
  path = pathlib.Path(FLAGS.input)
  fmt = FLAGS.format or ('jsonl' if path.suffix == '.jsonl' else 'tsv')
  open_pairs = readers.open_jsonl if fmt == 'jsonl' else readers.open_tsv
  return open_pairs(path, text_a_col=FLAGS.text_a_col, text_b_col=FLAGS.text_b_col, label_col=FLAGS.label_col,
                    group_col=FLAGS.group_col, label_names=spec['label_names'], skip_bad_rows=FLAGS.skip_bad_rows)


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  for name in ('batch_size', 'chunk_rows'):
    if FLAGS[name].value <= 0:
      raise UserError(f'--{name}={FLAGS[name].value} must be positive')
  if FLAGS.batch_size % jax.device_count():
    raise UserError(f'--batch_size={FLAGS.batch_size} must be a multiple of the {jax.device_count()} devices')
  output = pathlib.Path(FLAGS.output)
  if output.exists() and not FLAGS.overwrite:
    raise UserError(f'--output={output} exists; pass --overwrite to replace it')
  if output.resolve() == pathlib.Path(FLAGS.input).resolve():
    raise UserError('--output must differ from --input')
  spec = saved_model.read_spec(FLAGS.model)
  stream = open_input(spec)
  start = time.perf_counter()
  rows = predictions.score_stream(stream, FLAGS.model, output, mesh=train.make_mesh(), batch_size=FLAGS.batch_size,
                                  chunk_rows=FLAGS.chunk_rows, progress=FLAGS.progress)
  seconds = time.perf_counter() - start
  print(json.dumps({'model': str(pathlib.Path(FLAGS.model).absolute()), 'input': str(stream.path.absolute()),
                    'output': str(output.absolute()), 'rows': rows, 'skipped_rows': stream.skipped,
                    'seconds': round(seconds, 2), 'pairs_per_second': round(rows / seconds, 1)}, indent=1))


if __name__ == '__main__':
  cli.main(main)
