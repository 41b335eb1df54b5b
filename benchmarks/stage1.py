"""Stage-1 throughput on the real corpus (issue 29, item 1): TMKD stage-1 train steps of the students and teacher
scoring (JAX against PyTorch and ONNX Runtime), on bucketed SQuAD v1.1 train question-sentence pairs.

  python benchmarks/stage1.py  # the defaults: --rows=512 --steps=40 --warmup=4 --rounds=3 (about 10 min, 2 cores)

1. Students (bert3: bottom 3 layers of MiniLM-L6; mpnet3: of MPNet-base), 3 heads, the pipeline's compiled train
   step (speed.Stepper) with soft labels only (per_head KL, alpha 1, T 2) against random teacher logits [B, 3, 2],
   on the first --rows pairs in the training order (shuffled windows sorted by length, bucketed). Every bucket
   shape is compiled first (compile_seconds), then --warmup steps run untimed and --steps timed steps run split
   over --rounds rounds, alternating with an fp32 GEMM (the matmul peak). pairs/s = real pairs / seconds;
   MFU = model FLOPs/s (`train_step_flops`, on the padded tokens the step computes) / the GEMM median. In the
   same rounds: the step with frozen word embeddings (--freeze_word_embeddings; `frozen_embeddings_speedup` is
   the median per-round ratio to the default step) and one layer's weight matmuls at the step's most common
   shape (`dense_matmul_ceiling`: their FLOP rate over the GEMM's, what the step's MFU can reach at that size).
2. Teachers (MPNet-base, MiniLM-L6) score the same pairs: JAX through the pipeline's `train.predict` (rows sorted
   by length, bucketed), PyTorch fp32 (transformers' sequence classifier with the same weights and head,
   inference_mode, SDPA where the model has it) and ONNX Runtime fp32 (the project's exporter) on the same
   length-sorted batches, each cut to its longest row; alternating rounds (GEMM, JAX, PyTorch, ORT) x --rounds,
   after one warm-up round whose outputs are compared (max abs logit difference).
Writes --out (JSON); --tiny runs random tiny models (a smoke test, not a benchmark).
"""
import datetime
import json
import os
import pathlib
import shutil
import sys
import tempfile
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
import jax.numpy as jnp
import numpy as np
from absl import flags

import speed  # benchmarks/speed.py: timing, FLOPs, the train-step runner, the PyTorch twin, machine info
from mkdm_jax import data as data_lib
from mkdm_jax import losses, models, provenance
from mkdm_jax.allocator import keep_freed_memory
from mkdm_jax.models import factory, onnx_export
from mkdm_jax.train import predict, sharding

FLAGS = flags.FLAGS
# Reused from speed.py: --gemm_size, --torch_threads, --torch_attention, --data_dir, --malloc. Its --out and
# --rows (WikiQA rows) mean something else here: replaced.
delattr(FLAGS, 'out')
delattr(FLAGS, 'rows')
flags.DEFINE_string('out', None, 'Results JSON (default: results/benchmarks/stage1_<date>.json, '
                    'stage1_<date>_after.json with --label=after).')
flags.DEFINE_integer('rows', 512, 'First SQuAD v1.1 train pairs (rounded up to whole questions) trained on and '
                     'scored.')
flags.DEFINE_integer('steps', 40, 'Timed stage-1 train steps per student, split over --rounds rounds.')
flags.DEFINE_integer('warmup', 4, 'Untimed train steps per student after every bucket shape is compiled.')
flags.DEFINE_integer('rounds', 3, 'Timed alternating rounds (train chunks, and scoring passes per framework).')
flags.DEFINE_integer('batch_size', 32, 'Stage-1 train batch size.')
flags.DEFINE_integer('score_batch_size', 128, "Teacher scoring batch size (the pipeline's eval_batch_size).")
flags.DEFINE_integer('max_length', 64, 'Pair length cap (tokens, special tokens included).')
flags.DEFINE_list('buckets', ['32', '48', '64'], 'Padded lengths of the JAX batches.')
flags.DEFINE_list('students', ['bert3', 'mpnet3'], 'Students to train (bert3, mpnet3).')
flags.DEFINE_list('teachers', ['mpnet-base', 'minilm-l6'], 'Teachers to score with (mpnet-base, minilm-l6).')
flags.DEFINE_boolean('tiny', False, 'Random tiny models (no weights loaded; tokenizer of minilm-l6): a smoke test.')
flags.DEFINE_enum('score_buckets', 'inference', ['inference', 'train'],
                  "JAX scoring pads batches to predict's default grid (inference: max_length in steps of 8) or to "
                  '--buckets (train; what the before run of 2026-12-06 used).')
flags.DEFINE_string('before_json', None, "An earlier run's JSON whose stage1_pairs_per_sec fill this run's other "
                    'labels (e.g. the before run, beside an after run).')
LABELS = ('before', 'after')
flags.DEFINE_enum('label', 'before', list(LABELS), "Key of this run's default step in stage1_pairs_per_sec (its "
                  'step with frozen word embeddings, timed alternately with it, is frozen_embeddings).')

NUM_CLASSES, NUM_HEADS = speed.NUM_CLASSES, 3
STAGE1_LOSS = losses.LossConfig(teacher_mode='per_head', alpha=1.0, temperature=2.0)  # soft labels only
STUDENT_CHECKPOINTS = {'bert3': 'minilm-l6', 'mpnet3': 'mpnet-base'}
TEACHER_KINDS = {'minilm-l6': 'bert', 'mpnet-base': 'mpnet'}  # --tiny: a random encoder of that kind
TINY_OPTIONS = factory.ModelOptions(random_shape=(4, 32, 2, 64))  # layers, hidden, heads, intermediate
CORPUS_SIZES = (100_000, 436_559)  # pairs: a 100k slice, and all of SQuAD v1.1 train
flags.register_validator('students', lambda v: set(v) <= set(STUDENT_CHECKPOINTS),
                         f'students are some of {list(STUDENT_CHECKPOINTS)}')
flags.register_validator('teachers', lambda v: set(v) <= set(TEACHER_KINDS),
                         f'teachers are some of {list(TEACHER_KINDS)}')


def train_step_flops(config, batch, length):
  """Model FLOPs of one train step on a padded [batch, length] input: forward + backward = 3 x forward,

    6 * P * batch * length                 P = layers * (4 d^2 + 2 d f), the encoder layers' matmul params
    + 12 * layers * batch * length^2 * d   attention scores Q K^T and mix A V (2 length^2 d each, forward)
    + 6 * d^2 * batch                      the pooler, on the first token only

  (d hidden size, f intermediate size), i.e. 3 x speed.model_flops. Tokens are the padded ones the step
  computes (batch x bucket length, padding rows included), not the real tokens; embeddings, norms, softmax, the
  heads and MPNet's relative-position bias (an addition) are not counted.
  """
  return 3 * speed.model_flops(config, batch, length)


FROZEN = '+frozen_embeddings'  # the same step with --freeze_word_embeddings


def dense_matmuls(config, tokens):
  """(callable, FLOPs) of one encoder layer's weight matmuls at `tokens` rows, forward and backward (x W, dY W^T,
  X^T dY for the Q, K, V, output, FFN-in and FFN-out weights): the rate the step's dense part can reach on
  these shapes, the ceiling of its MFU (the 1024^3 GEMM runs bigger, faster blocks)."""
  d, f = config.hidden_size, config.intermediate_size
  rng = np.random.default_rng(0)
  shapes = [(d, d)] * 4 + [(d, f), (f, d)]
  xs = [jnp.asarray(rng.normal(size=(tokens, a)), jnp.float32) for a, _ in shapes]
  ws = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in shapes]
  dys = [jnp.asarray(rng.normal(size=(tokens, b)), jnp.float32) for _, b in shapes]
  run = jax.jit(lambda xs, ws, dys: [(x @ w, dy @ w.T, x.T @ dy) for x, w, dy in zip(xs, ws, dys)])
  return (lambda: run(xs, ws, dys)), sum(3 * 2 * tokens * a * b for a, b in shapes)


def gemm(size):
  """(callable, FLOPs) of the fp32 size^3 GEMM that speed.py's `jax_vs_torch` times as the matmul peak."""
  a = jnp.asarray(np.random.default_rng(0).normal(size=(size, size)), jnp.float32)
  square = jax.jit(lambda x: x @ x)
  return lambda: square(a), 2 * size**3


def cpu_info():
  """lscpu's model name and the presence of the flags that change CPU matmul speed."""
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
    cpu_flags = next(line.split(':', 1)[1].split() for line in lines if line.startswith('flags'))
  except (OSError, StopIteration):
    cpu_flags = []
  return {'model_name': provenance.cpu_model(), 'avx512f': 'avx512f' in cpu_flags,
          'avx512_bf16': 'avx512_bf16' in cpu_flags, 'amx': any(f.startswith('amx') for f in cpu_flags)}


def minutes(pairs_per_sec):
  """Minutes for each of CORPUS_SIZES at `pairs_per_sec`."""
  return {str(n): n / pairs_per_sec / 60 for n in CORPUS_SIZES}


# ---------------------------------------------------------------------------------------------------
# Data and models.

def encoded_pairs(examples, checkpoint, max_length):
  """SQuAD `examples` encoded by `checkpoint`'s tokenizer."""
  return data_lib.encode(models.load_tokenizer(models.resolve_checkpoint(checkpoint)), examples, max_length)


def build_student(arch, tiny):
  """(model, host params) of a 3-head student from the pipeline's factory."""
  options = TINY_OPTIONS if tiny else factory.ModelOptions()
  return factory.student(arch, 'random' if tiny else STUDENT_CHECKPOINTS[arch], NUM_CLASSES, NUM_HEADS, 0, options)


def build_teacher(name, tiny):
  """(model, host params) of a one-head teacher classifier on checkpoint `name` (--tiny: random, same kind)."""
  if not tiny:
    return factory.teacher(name, NUM_CLASSES, 0, factory.ModelOptions())
  model = models.Classifier(factory.random_config(TINY_OPTIONS, TEACHER_KINDS[name]), NUM_CLASSES)
  return model, factory.host_init_params(model, 0)


def train_batches(encoded, count, batch_size, buckets):
  """The first `count` stage-1 batches (epoch after epoch, the pipeline's order), with random teacher logits."""
  logits = np.random.default_rng(0).normal(size=(len(encoded), NUM_HEADS, NUM_CLASSES)).astype(np.float32)
  out, epoch = [], 0
  while len(out) < count:
    out += data_lib.batches(encoded, batch_size, seed=0, epoch=epoch, buckets=buckets,
                            extra={'teacher_logits': logits})
    epoch += 1
  return out[:count]


def peer_batches(batch_list, names):
  """PyTorch/ORT inputs of JAX's length-sorted batches: real rows only, each batch cut to its longest row."""
  out = []
  for b in batch_list:
    keep = b['weight'] > 0
    longest = int(b['attention_mask'][keep].sum(1).max())
    out.append({k: np.ascontiguousarray(b[k][keep, :longest], np.int64) for k in names})
  return out


# ---------------------------------------------------------------------------------------------------
# 1. Stage-1 train steps.

def stage1(students, encoded, steps, warmup, rounds, batch_size, buckets, gemm_size):
  """Pairs/s and MFU of each student's stage-1 train step (module docstring, 1); `encoded[arch]`: its rows."""
  gemm_fn, gemm_flops = gemm(gemm_size)
  fns, runs, dense = {'gemm': gemm_fn}, {}, {}
  for arch in students:
    model, params = build_student(arch, FLAGS.tiny)
    batch_list = train_batches(encoded[arch], warmup + steps, batch_size, buckets)
    # interleaved() runs every callable once before its rounds: the first chunk is the warm-up.
    chunks = [batch_list[:warmup]] + [[batch_list[warmup + i] for i in idx]
                                      for idx in np.array_split(np.arange(steps), rounds)]
    for name, frozen in ((arch, ()), (f'{arch}{FROZEN}', ('word_embeddings',))):
      stepper = speed.Stepper(model, params, STAGE1_LOSS, frozen=frozen)
      start = time.perf_counter()
      firsts = {b['input_ids'].shape[1]: b for b in reversed(batch_list)}  # the first batch of each bucket
      for batch in firsts.values():  # compiles the step for every shape it will time
        jax.block_until_ready(stepper(speed.device_batch(batch)))
      compile_seconds = time.perf_counter() - start
      fns[name] = lambda stepper=stepper, chunks=iter(chunks): [stepper(speed.device_batch(b)) for b in next(chunks)]
      runs[name] = (model.encoder, chunks[1:], compile_seconds)
    lengths = [b['input_ids'].shape[1] for b in batch_list]
    tokens = batch_size * max(set(lengths), key=lengths.count)
    fns[f'{arch}_dense'], flops = dense_matmuls(model.encoder, tokens)
    dense[arch] = tokens, flops
  times = speed.interleaved(fns, rounds)
  peak = gemm_flops / np.asarray(times['gemm'])
  out = {'gemm_gflops_median': speed.median(peak) / 1e9, 'gemm_seconds': times['gemm']}
  for arch, (tokens, flops) in dense.items():
    out[f'{arch}_dense_matmuls'] = {
        'tokens': tokens, 'gflop': flops / 1e9,
        'of_gemm_peak': speed.median(flops / np.asarray(times[f'{arch}_dense']) / peak)}
  for arch, (cfg, chunks, compile_seconds) in runs.items():
    seconds = np.asarray(times[arch])
    pairs = np.array([sum(float(b['weight'].sum()) for b in c) for c in chunks])
    flops = np.array([sum(train_step_flops(cfg, *b['input_ids'].shape) for b in c) for c in chunks])
    lengths = [b['input_ids'].shape[1] for c in chunks for b in c]
    padded = sum(b['input_ids'].size for c in chunks for b in c)
    real = sum(int(b['attention_mask'][b['weight'] > 0].sum()) for c in chunks for b in c)
    out[arch] = {
        'checkpoint': 'random' if FLAGS.tiny else STUDENT_CHECKPOINTS[arch.removesuffix(FROZEN)],
        'shape': {'layers': cfg.num_layers, 'hidden': cfg.hidden_size, 'intermediate': cfg.intermediate_size,
                  'attention_heads': cfg.num_attention_heads, 'heads': NUM_HEADS},
        'batch_size': batch_size, 'warmup_steps': warmup, 'timed_steps': len(lengths),
        'steps_per_length': {str(n): lengths.count(n) for n in sorted(set(lengths))},
        'compile_seconds': compile_seconds, 'pairs': float(pairs.sum()),
        'pairs_per_sec': float(pairs.sum() / seconds.sum()),
        'timed_gflop': float(flops.sum()) / 1e9, 'gflops': float(flops.sum() / seconds.sum()) / 1e9,
        'flops_counted_on': 'padded tokens (batch x bucket length, padding rows included)',
        'real_token_fraction': real / padded,
        'mfu': float(flops.sum() / seconds.sum()) / (out['gemm_gflops_median'] * 1e9),
        'mfu_per_round': (flops / seconds / peak).tolist(),
        'pairs_per_sec_per_round': (pairs / seconds).tolist(), 'seconds': seconds.tolist()}
    if arch.endswith(FROZEN):  # per-round speed-up over the default step, alternating with it
      out[arch]['speedup_over_default'] = speed.pair_ratio(times[arch.removesuffix(FROZEN)], times[arch])
    print(f"  {arch}: {out[arch]['pairs_per_sec']:.1f} pairs/s, MFU {out[arch]['mfu']:.3f} "
          f"(GEMM {out['gemm_gflops_median']:.0f} GFLOP/s), compile {compile_seconds:.1f} s", flush=True)
  return out


# ---------------------------------------------------------------------------------------------------
# 2. Teacher scoring: JAX against PyTorch and ONNX Runtime.

def scoring(name, encoded, rounds, batch_size, buckets, gemm_size):
  """Pairs/s of teacher `name` scoring `encoded` in JAX, PyTorch and ORT (module docstring, 2)."""
  import onnxruntime
  import torch
  model, params = build_teacher(name, FLAGS.tiny)
  tmodel, torch_attention = speed.torch_model(model.encoder, params)
  tmodel.eval()
  folder = pathlib.Path(tempfile.mkdtemp(prefix='stage1-onnx-'))
  try:
    models.export_hf(folder, model, params)
    onnx_export.export_onnx(folder)
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = len(os.sched_getaffinity(0))
    session = onnxruntime.InferenceSession(str(folder / 'model.onnx'), options, providers=['CPUExecutionProvider'])
    names = onnx_export.onnx_input_names(folder)
  finally:
    shutil.rmtree(folder)
  device_params, mesh = jax.tree.map(jnp.asarray, params), sharding.make_mesh()
  if FLAGS.score_buckets == 'inference':
    buckets = data_lib.batching.inference_buckets(encoded.max_length)  # predict's default
  batch_list = speed.inference_batches(encoded, batch_size, buckets)  # predict's batches, length-sorted
  feeds = peer_batches(batch_list, names)
  torch_inputs = [{k: torch.from_numpy(v) for k, v in feed.items()} for feed in feeds]
  gemm_fn, gemm_flops = gemm(gemm_size)
  outputs = {}  # each framework's logits in sorted row order, from its latest pass

  def jax_pass():
    outputs['jax'] = predict(model, device_params, encoded, mesh=mesh, batch_size=batch_size,
                             buckets=buckets)['logits']
    return outputs['jax']

  def torch_pass():
    with torch.inference_mode():
      outputs['pytorch'] = np.concatenate([tmodel(**x).logits.numpy() for x in torch_inputs])
    return outputs['pytorch']

  def ort_pass():
    outputs['onnxruntime'] = np.concatenate([session.run(['logits'], feed)[0] for feed in feeds])
    return outputs['onnxruntime']

  times = speed.interleaved({'gemm': gemm_fn, 'jax': jax_pass, 'pytorch': torch_pass, 'onnxruntime': ort_pass},
                            rounds)
  jax_sorted = outputs['jax'][np.argsort(encoded.lengths, kind='stable')]
  diff = {peer: float(np.abs(jax_sorted - outputs[peer]).max()) for peer in ('pytorch', 'onnxruntime')}
  n = len(encoded)
  peak = speed.median(gemm_flops / np.asarray(times['gemm']))
  forward_flops = speed.batches_flops(model.encoder, batch_list)
  rate = {k: n / speed.median(times[k]) for k in ('jax', 'pytorch', 'onnxruntime')}
  best_peer = np.minimum(times['pytorch'], times['onnxruntime'])
  out = {
      'checkpoint': 'random' if FLAGS.tiny else name, 'rows': n, 'batch_size': batch_size, 'jax_buckets': list(buckets),
      'torch_attention': torch_attention, 'torch_threads': torch.get_num_threads(),
      'onnxruntime': onnxruntime.__version__, 'onnxruntime_threads': options.intra_op_num_threads,
      'pairs_per_sec': rate,
      'jax_over_pytorch': speed.pair_ratio(times['pytorch'], times['jax']),
      'jax_over_onnxruntime': speed.pair_ratio(times['onnxruntime'], times['jax']),
      'jax_over_best_peer': speed.pair_ratio(best_peer, times['jax']),
      'jax_over_best_peer_per_round': (best_peer / np.asarray(times['jax'])).tolist(),
      'faster_peer': max(('pytorch', 'onnxruntime'), key=rate.get),
      'logits_max_abs_diff': diff, 'logits_agree': diff['pytorch'] < 1e-3,
      'gemm_gflops_median': peak / 1e9,
      'jax_forward_gflop': forward_flops / 1e9,
      'jax_forward_mfu': forward_flops / speed.median(times['jax']) / peak,
      'seconds': times}
  print(f'  {name}: ' + ', '.join(f'{k} {v:.1f}' for k, v in rate.items()) + ' pairs/s; JAX / best peer '
        f"{out['jax_over_best_peer']:.2f}; max |logit diff| vs PyTorch {diff['pytorch']:.2e}, vs ORT "
        f"{diff['onnxruntime']:.2e}" + ('' if out['logits_agree'] else '  MISMATCH'), flush=True)
  return out


# ---------------------------------------------------------------------------------------------------

def default_out(date, label):
  folder = pathlib.Path(__file__).resolve().parents[1] / 'results' / 'benchmarks'
  return folder / f"stage1_{date}{'' if label == 'before' else '_' + label}.json"


def main(argv):
  del argv
  import torch
  malloc = 'keep' if FLAGS.malloc == 'keep' and keep_freed_memory() else 'default'
  torch.set_num_threads(FLAGS.torch_threads)
  started = time.time()
  now = datetime.datetime.now(datetime.timezone.utc)
  out_path = pathlib.Path(FLAGS.out or default_out(now.date().isoformat(), FLAGS.label))
  buckets = data_lib.batching.bucket_sizes(FLAGS.max_length, tuple(int(b) for b in FLAGS.buckets))
  used = ('rows', 'steps', 'warmup', 'rounds', 'batch_size', 'score_batch_size', 'max_length', 'buckets',
          'score_buckets', 'before_json', 'students',
          'teachers', 'tiny', 'label', 'gemm_size', 'torch_threads', 'torch_attention', 'data_dir', 'malloc')
  result = {'date': now.isoformat(timespec='seconds'), 'command': ' '.join([sys.executable] + sys.argv),
            'flags': {k: FLAGS[k].value for k in used}, 'tiny': FLAGS.tiny, 'label': FLAGS.label,
            'buckets': list(buckets), 'cpu_model': cpu_info(), 'machine': {**speed.machine_info(), 'malloc': malloc}}

  examples = data_lib.load_split('squad', 'train', FLAGS.data_dir, max_rows=FLAGS.rows)
  tokenizer_of = lambda checkpoint: 'minilm-l6' if FLAGS.tiny else checkpoint
  encoded = {c: encoded_pairs(examples, c, FLAGS.max_length)
             for c in {tokenizer_of(c) for c in [STUDENT_CHECKPOINTS[s] for s in FLAGS.students] + FLAGS.teachers}}
  result['rows'] = len(examples)
  print(f'{len(examples)} SQuAD train pairs, buckets {buckets}, on {result["cpu_model"]["model_name"]}', flush=True)

  print(f'[{time.time() - started:.0f} s] 1. stage-1 train steps', flush=True)
  train = stage1(FLAGS.students, {s: encoded[tokenizer_of(STUDENT_CHECKPOINTS[s])] for s in FLAGS.students},
                 FLAGS.steps, FLAGS.warmup, FLAGS.rounds, FLAGS.batch_size, buckets, FLAGS.gemm_size)
  result['train'] = train
  result['train_mfu'] = {s: train[s]['mfu'] for s in FLAGS.students}
  before = json.loads(pathlib.Path(FLAGS.before_json).read_text()) if FLAGS.before_json else {}
  result['before_json'] = FLAGS.before_json
  result['stage1_pairs_per_sec'] = {
      s: {**{k: train[s]['pairs_per_sec'] if k == FLAGS.label else before.get('stage1_pairs_per_sec', {}).get(s, {}).get(k)
             for k in LABELS}, 'frozen_embeddings': train[s + FROZEN]['pairs_per_sec']} for s in FLAGS.students}
  result['frozen_embeddings_speedup'] = {s: train[s + FROZEN]['speedup_over_default'] for s in FLAGS.students}
  result['dense_matmul_ceiling'] = {s: train[f'{s}_dense_matmuls']['of_gemm_peak'] for s in FLAGS.students}

  print(f'[{time.time() - started:.0f} s] 2. teacher scoring: JAX, PyTorch, ONNX Runtime', flush=True)
  score = {t: scoring(t, encoded[tokenizer_of(t)], FLAGS.rounds, FLAGS.score_batch_size, buckets, FLAGS.gemm_size)
           for t in FLAGS.teachers}
  result['scoring'] = score
  result['scoring_pairs_per_sec'] = {t: s['pairs_per_sec'] for t, s in score.items()}
  result['scoring_ratio_vs_best_peer'] = {t: s['jax_over_best_peer'] for t, s in score.items()}
  result['logits_max_abs_diff'] = {t: s['logits_max_abs_diff'] for t, s in score.items()}
  gemm_runs = np.concatenate([train['gemm_seconds']] + [s['seconds']['gemm'] for s in score.values()])
  result['gemm_gflops_median'] = speed.median(2 * FLAGS.gemm_size**3 / gemm_runs) / 1e9
  result['minutes'] = {
      'scoring': {t: {k: minutes(v) for k, v in s['pairs_per_sec'].items()} for t, s in score.items()},
      'stage1_epoch': {s: minutes(train[s]['pairs_per_sec']) for s in FLAGS.students}}
  result['machine']['load_average_end'] = os.getloadavg()
  result['wall_seconds'] = time.time() - started
  out_path.parent.mkdir(parents=True, exist_ok=True)
  out_path.write_text(json.dumps(result, indent=2, default=str))

  print(f"GEMM median {result['gemm_gflops_median']:.1f} GFLOP/s")
  for s in FLAGS.students:
    print(f"stage 1 {s}: {train[s]['pairs_per_sec']:.1f} pairs/s, MFU {train[s]['mfu']:.3f}, epoch of "
          f"{CORPUS_SIZES[-1]} pairs {result['minutes']['stage1_epoch'][s][str(CORPUS_SIZES[-1])]:.0f} min")
  for t, s in score.items():
    print(f"scoring {t}: JAX / best peer ({s['faster_peer']}) {s['jax_over_best_peer']:.2f}; "
          + ', '.join(f"{k} {m[str(CORPUS_SIZES[-1])]:.0f} min" for k, m in result['minutes']['scoring'][t].items())
          + f' for {CORPUS_SIZES[-1]} pairs')
  print(f'wrote {out_path} ({result["wall_seconds"]:.0f} s)')


if __name__ == '__main__':
  cli.main(main)
