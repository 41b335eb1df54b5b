"""Where the distillation train step spends its time: a jax.profiler trace of the pipeline's jitted train step,
its XLA ops ranked by time (grouped by fusion name), with each op's output shape from the compiled HLO.

  python benchmarks/profile_step.py --checkpoint=minilm-l6 --batch=32 --length=128 --out=runs/profile/minilm

The step is the one benchmarks/speed.py times against PyTorch (MiniLM-L6 or MPNet-base, KD to 3 averaged
teachers, AdamW, dropout on), run --warmup times, then traced for --steps steps. The trace is converted by
xprof (`pip install xprof`; a test requirement) into per-op events; an op's share is its summed duration over
the summed duration of every op (on a multi-core CPU ops may overlap, so shares are of op time, not of wall
time). Writes <out>/ops.json (every op group) and <out>/ops.md (the top --top), and keeps the raw trace in
<out>/trace (open it with `xprof --logdir=<out>/trace`). --quick: a tiny random BERT, a smoke test.
"""
import collections
import json
import pathlib
import re
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
import numpy as np
from absl import app, flags

from mkdm_jax import data as data_lib
from mkdm_jax import losses, models, provenance
from mkdm_jax.allocator import keep_freed_memory
from mkdm_jax.models import factory
from mkdm_jax.train import compile_train_step, sharding

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Output folder (ops.json, ops.md, trace/).')
flags.DEFINE_string('checkpoint', 'minilm-l6', 'Model profiled (a checkpoint name or folder).')
flags.DEFINE_enum('student', None, ['bert3', 'mpnet3'], "Profile this student's TMKD stage-1 step instead (bottom 3 "
                  'layers of --checkpoint, one head per teacher, soft labels only: alpha 1, T 2).')
flags.DEFINE_integer('batch', 32, 'Batch size.')
flags.DEFINE_integer('length', 128, 'Sequence length (WikiQA train rows, padded to it).')
flags.DEFINE_integer('warmup', 3, 'Untraced steps first (compilation, allocator warm-up).')
flags.DEFINE_integer('steps', 5, 'Traced steps.')
flags.DEFINE_integer('top', 25, 'Op groups listed in ops.md.')
flags.DEFINE_boolean('quick', False, 'A tiny random BERT at batch 4, length 16, one traced step: a smoke test.')
flags.mark_flag_as_required('out')

NUM_TEACHERS, NUM_CLASSES = 3, 2
STEP_KEYS = ('input_ids', 'token_type_ids', 'attention_mask', 'labels', 'weight', 'teacher_logits')


def train_step(quick):
  """(step, state, batch): the pipeline's jitted, donating KD train step, its state and one batch."""
  if quick:
    options = factory.ModelOptions(random_shape=(2, 32, 2, 64))
    model = models.Classifier(factory.random_config(options), NUM_CLASSES)
    params, checkpoint, batch_size, length = factory.host_init_params(model, 0), 'minilm-l6', 4, 16
  else:
    checkpoint, batch_size, length = FLAGS.checkpoint, FLAGS.batch, FLAGS.length
    options = factory.ModelOptions(max_length=length)
    model, params = (factory.student(FLAGS.student, checkpoint, NUM_CLASSES, NUM_TEACHERS, 0, options) if FLAGS.student
                     else factory.teacher(checkpoint, NUM_CLASSES, 0, options))
  tokenizer = models.load_tokenizer(models.resolve_checkpoint(checkpoint))
  examples = data_lib.load_split('wikiqa', 'train', None).select(np.arange(batch_size))
  rows = next(data_lib.batches(data_lib.encode(tokenizer, examples, length), batch_size, seed=0, epoch=0,
                               buckets=(length,)))
  logits = np.random.default_rng(0).normal(size=(batch_size, NUM_TEACHERS, NUM_CLASSES)).astype(np.float32)
  batch = {k: jax.numpy.asarray(v) for k, v in {**rows, 'teacher_logits': logits}.items() if k in STEP_KEYS}
  loss = (losses.LossConfig(teacher_mode='per_head', alpha=1.0, temperature=2.0) if FLAGS.student and not quick
          else losses.LossConfig(teacher_mode='ensemble', alpha=0.5, temperature=2.0))
  compiled = compile_train_step(model, params, loss, mesh=sharding.make_mesh(), rng=jax.random.key(1),
                                learning_rate=5e-5, total_steps=1000, warmup_steps=100)
  return compiled.step, compiled.init(), batch


def op_shapes(hlo_text):
  """HLO instruction name -> its output shape, from the compiled module's text."""
  return {name: re.sub(r'\{[^}]*\}', '', shape)  # without layouts
          for name, shape in re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = (.*?) [\w\-]+\(', hlo_text, re.MULTILINE)}


def op_groups(trace_events, shapes, steps):
  """The events of HLO instructions (names in `shapes`; runtime and Python events are left out), grouped by
  name without its numeric suffix: [{op, count per step, ms per step, share of op time, output shapes}]."""
  time_us, count, group_shapes = collections.Counter(), collections.Counter(), collections.defaultdict(set)
  for event in trace_events:
    name = event.get('name', '')
    if event.get('ph') != 'X' or name not in shapes:
      continue
    group = re.sub(r'\.\d+$', '', name)
    time_us[group] += event.get('dur', 0)
    count[group] += 1
    group_shapes[group].add(shapes[name])
  total = sum(time_us.values())
  return [{'op': g, 'per_step': count[g] / steps, 'ms_per_step': t / steps / 1e3, 'share': t / total,
           'shapes': sorted(group_shapes[g], key=elements, reverse=True)[:3]} for g, t in time_us.most_common()]


def elements(shape):
  """Elements of an HLO array shape such as 'f32[32,12,128,128]' (0 for tuples and scalars' 1)."""
  match = re.fullmatch(r'\w+\[([\d,]*)\]', shape)
  return int(np.prod([int(d) for d in match.group(1).split(',') if d])) if match else 0


def main(argv):
  del argv
  from xprof.convert import raw_to_tool_data  # the trace converter (test requirement)
  keep_freed_memory()
  out = pathlib.Path(FLAGS.out)
  steps = 1 if FLAGS.quick else FLAGS.steps
  step, state, batch = train_step(FLAGS.quick)
  shapes = op_shapes(step.lower(state, batch, ()).compile().as_text())
  for _ in range(1 if FLAGS.quick else FLAGS.warmup):
    state, measurements = step(state, batch, ())
  jax.block_until_ready(measurements)
  started = time.perf_counter()
  with jax.profiler.trace(str(out / 'trace')):
    for _ in range(steps):
      state, measurements = step(state, batch, ())
    jax.block_until_ready(measurements)
  seconds = (time.perf_counter() - started) / steps
  xspace = sorted((out / 'trace').rglob('*.xplane.pb'), key=lambda p: p.stat().st_mtime)[-1]
  data, _ = raw_to_tool_data.xspace_to_tool_data([str(xspace)], 'trace_viewer', {})
  trace = json.loads(data)
  groups = op_groups(trace['traceEvents'] if isinstance(trace, dict) else trace, shapes, steps)
  shape = batch['input_ids'].shape
  name = FLAGS.checkpoint + (f' {FLAGS.student} stage-1' if FLAGS.student else ' KD')
  result = {'checkpoint': 'random (--quick)' if FLAGS.quick else name, 'batch': shape[0],
            'length': shape[1], 'steps': steps, 'seconds_per_traced_step': seconds,
            'machine': provenance.record(), 'ops': groups}
  (out / 'ops.json').write_text(json.dumps(result, indent=1))
  lines = [f"{result['checkpoint']} train step, batch {shape[0]} x {shape[1]}, {steps} traced steps "
           f"({seconds:.2f} s each under the profiler), {result['machine']['cpu_model']}, "
           f"commit {result['machine']['commit'][:12]}.", '',
           '| op (fusion group) | per step | ms per step | share of op time | output shapes |', '|---|---|---|---|---|']
  lines += [f"| {g['op']} | {g['per_step']:g} | {g['ms_per_step']:.1f} | {100 * g['share']:.1f}% | "
            f"{', '.join(g['shapes'])} |" for g in groups[:FLAGS.top]]
  (out / 'ops.md').write_text('\n'.join(lines) + '\n')
  print('\n'.join(lines))


if __name__ == '__main__':
  app.run(main)
