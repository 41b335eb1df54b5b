"""Evaluates a saved teacher or student on any labelled pair file (or a named task's split).

  python experiments/evaluate.py --model=runs/quickstart/students/bert3_mkdm --task=tsv \
      --eval_file=my_pairs.tsv --text_a_col=question --text_b_col=passage --label_col=label \
      --group_col=qid
  python experiments/evaluate.py --model=runs/quickstart/students/bert3_mkdm --split=test

Prints one JSON object (model, task, data, rows, metrics, and per-head metrics for multi-head students) on
stdout. `--task` defaults to the model's own task. map/mrr need question groups: for tsv/jsonl files
without --group_col they are left out. A model folder saved by the pipeline holds a threshold tuned on
its dev split; accuracy_at_threshold / f1_at_threshold use it.

`--predictions=FILE` also writes one tab-separated row per pair (the format of `mkdm_jax.predictions`,
which `experiments/score.py` writes too). With --predictions, unlabelled files are allowed (no metrics
are computed). To score a file too large for memory, use experiments/score.py.
"""
import json
import pathlib

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
from absl import flags

from mkdm_jax import data as data_lib
from mkdm_jax import models, predictions, saved_model, train
from mkdm_jax.errors import UserError

FILE_TASKS = ('tsv', 'jsonl')

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Saved model folder (a teacher or student folder of a work directory).')
flags.DEFINE_string('task', None, "Task name (default: the model's task); tsv/jsonl for your own file.")
flags.DEFINE_string('eval_file', None,
                    'File to evaluate: required for tsv/jsonl, replaces the split file of wikiqa/rte/qnli.')
flags.DEFINE_string('split', 'test', 'Split of a named task (ignored for tsv/jsonl).')
flags.DEFINE_string('data_dir', None,
                    'Data folder of named tasks (default: $MKDM_DATA_DIR, then ../shared/data).')
flags.DEFINE_string('text_a_col', None, 'tsv/jsonl: question column (header name, or index without header).')
flags.DEFINE_string('text_b_col', None, 'tsv/jsonl: passage column.')
flags.DEFINE_string('label_col', None, 'tsv/jsonl: label column (0/1).')
flags.DEFINE_string('group_col', None, 'tsv/jsonl: question-id column (needed for map/mrr).')
flags.DEFINE_integer('max_rows', 0, 'Evaluate only the first N rows (0 = all; whole questions are kept).')
flags.DEFINE_boolean('skip_bad_rows', False, 'Skip malformed rows (counted) instead of failing.')
flags.DEFINE_integer('batch_size', 128, 'Inference batch size.')
flags.DEFINE_string('predictions', None, 'Also write per-pair scores to this TSV file (see the module doc).')

flags.mark_flag_as_required('model')


def load_examples(task):
  """The rows to evaluate, with a UserError when nothing in them is labelled."""
  is_file_task = task.name in FILE_TASKS
  if is_file_task and not FLAGS.eval_file:
    raise UserError(f'--task={task.name} needs --eval_file')
  if FLAGS.eval_file and task.name.startswith('tfds:'):
    raise UserError(f'--eval_file does not apply to {task.name}: tfds tasks read --split from tfds')
  if is_file_task and FLAGS.label_col is None and not FLAGS.predictions:
    raise UserError('evaluation needs gold labels: give --label_col (or only write --predictions)')
  columns = dict(text_a_col=FLAGS.text_a_col, text_b_col=FLAGS.text_b_col, label_col=FLAGS.label_col,
                 group_col=FLAGS.group_col)
  examples = data_lib.load_split(task, None if is_file_task else FLAGS.split, FLAGS.data_dir,
                                 path=FLAGS.eval_file, skip_bad_rows=FLAGS.skip_bad_rows,
                                 max_rows=FLAGS.max_rows or None, **columns)
  if not (examples.labels >= 0).any() and not FLAGS.predictions:
    raise UserError(f'{examples.source}: no labelled rows to evaluate (use --predictions to score it)')
  return examples


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  if FLAGS.batch_size <= 0 or FLAGS.batch_size % jax.device_count():
    raise UserError(f'--batch_size={FLAGS.batch_size} must be a positive multiple of the '
                    f'{jax.device_count()} devices')
  spec = saved_model.read_spec(FLAGS.model)
  task = data_lib.get_task(FLAGS.task or spec['task'])
  if task.num_classes != spec['num_classes']:
    raise UserError(f"task {task.name} has {task.num_classes} classes but the model in {FLAGS.model} "
                    f"predicts {spec['num_classes']} ({spec['task']})")
  examples = load_examples(task)
  encoded = data_lib.encode(models.load_tokenizer(spec['tokenizer_dir']), examples, spec['max_length'])
  model, params, _ = saved_model.load(FLAGS.model)
  out = train.predict(model, params, encoded, mesh=train.make_mesh(), batch_size=FLAGS.batch_size)
  report = {'model': str(pathlib.Path(FLAGS.model).absolute()), 'task': task.name, 'data': examples.source,
            'rows': len(examples), 'labelled_rows': int((examples.labels >= 0).sum()),
            'skipped_rows': examples.skipped, 'threshold': spec.get('threshold')}
  if FLAGS.predictions:
    predictions.write(FLAGS.predictions, examples, out)
    report['predictions'] = str(pathlib.Path(FLAGS.predictions).absolute())
  if (examples.labels >= 0).any():
    metric_names, _ = task.metrics_for(examples)
    result = train.scores(out, examples, metric_names, threshold=spec.get('threshold'))
    report['metrics'] = {k: v for k, v in result.items() if '/' not in k}
    if spec['num_heads'] > 1:
      report['head_metrics'] = {k: v for k, v in result.items() if '/' in k}
  print(json.dumps(report, indent=1))

if __name__ == '__main__':
  cli.main(main)
