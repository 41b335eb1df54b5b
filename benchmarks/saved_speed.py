"""Inference examples/s of saved models (teachers or students of a work directory) on a task's split, measured
alternately: e.g. what a layer-head student (--head_layers) costs at inference beside the linear-head one.

  python benchmarks/saved_speed.py --models=runs/a/students/bert3_mkdm,runs/b/students/bert3_mkdm \
      --task=wikiqa --split=test --out=/tmp/saved_speed.json

Each model encodes the rows with its own tokenizer and predicts them all (length-sorted, padded in steps of 8,
batch --batch_size) after a warm-up pass; then the models run in turn --rounds times. Prints and writes per model
its parameters, heads, median examples/s, and the median over rounds of its time relative to the first model's
(with the machine's load average at the start: timings of a busy machine are not comparable to a quiet one's).
"""
import json
import pathlib
import sys

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
import numpy as np
from absl import flags

import speed  # benchmarks/speed.py: the alternating timer
from mkdm_jax import data as data_lib
from mkdm_jax import models, paths, saved_model, train
from mkdm_jax.errors import UserError

FLAGS = flags.FLAGS
delattr(FLAGS, 'out')  # speed.py's --out: replaced
flags.DEFINE_list('models', None, 'Saved model folders; the first is the reference of the time ratios.')
flags.DEFINE_string('task', 'wikiqa', 'Task whose split is predicted.')
flags.DEFINE_string('split', 'test', 'Split of --task.')
flags.DEFINE_integer('max_rows', 0, 'Only the first N rows (0 = all; whole questions kept).')
flags.DEFINE_integer('batch_size', 128, 'Inference batch size.')
flags.DEFINE_integer('rounds', 5, 'Timed rounds (each model once a round) after one warm-up pass each.')
flags.DEFINE_string('out', None, 'Also write the results JSON here (its folder must exist).')
flags.mark_flag_as_required('models')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  if FLAGS.rounds < 1:
    raise UserError(f'--rounds={FLAGS.rounds}: give at least one round')
  for folder in FLAGS.models:
    if not (pathlib.Path(folder) / 'final').exists():
      raise UserError(f'--models: {folder} is not a finished saved model (no final/ parameters)')
  examples = data_lib.load_split(FLAGS.task, FLAGS.split, max_rows=FLAGS.max_rows or None)
  mesh = train.make_mesh()
  runs, entries = {}, []
  for i, folder in enumerate(FLAGS.models):
    model, params, spec = saved_model.load(folder)
    encoded = data_lib.encode(models.load_tokenizer(spec['tokenizer_dir']), examples, spec['max_length'])
    name = f'{i}:{folder}'
    runs[name] = (lambda m=model, p=params, e=encoded:
                  train.predict(m, p, e, mesh=mesh, batch_size=FLAGS.batch_size)['logits'])
    entries.append({'model': str(pathlib.Path(folder).absolute()), 'params': models.count_params(params),
                    'heads': spec['num_heads'], 'head_layers': spec.get('head_layers', 0)})
  times = speed.interleaved(runs, FLAGS.rounds)
  reference = times[next(iter(runs))]
  for entry, name in zip(entries, runs):
    entry['examples_per_sec'] = len(examples) / speed.median(times[name])
    entry['time_vs_first'] = speed.pair_ratio(times[name], reference)
  result = {'task': FLAGS.task, 'split': FLAGS.split, 'rows': len(examples), 'batch_size': FLAGS.batch_size,
            'rounds': FLAGS.rounds, 'command': ' '.join(sys.argv), 'machine': speed.machine_info(),
            'devices': [str(d) for d in jax.devices()], 'models': entries}
  for entry in entries:
    print(f"{entry['examples_per_sec']:8.1f} ex/s  x{entry['time_vs_first']:.3f} time  {entry['params'] / 1e6:6.2f}M "
          f"params  {entry['heads']} heads ({entry['head_layers']} own layers)  {entry['model']}", flush=True)
  if FLAGS.out:
    paths.write_text_atomic(pathlib.Path(FLAGS.out), json.dumps(result, indent=1))

if __name__ == '__main__':
  cli.main(main)
