"""Speed benchmarks: student vs teacher, JAX vs PyTorch, distance to the matmul peak, KD step costs;
the same for MPNet-base (vs transformers' MPNet, and its mpnet3 student); the bert student served by JAX
against ONNX Runtime (fp32 and int8) on its exported ONNX file.

  python benchmarks/speed.py --out=/tmp/bench/speed.json

Everything runs in one process after warm-up and compilation; each number is a median over repeats,
and numbers that are compared (JAX vs PyTorch, a model vs the GEMM peak, 3 vs 1 teachers, bucketed
vs fixed length) are measured alternately (A B A B ...) and reported as the median of per-round
ratios, because this machine's absolute speed drifts. --quick runs tiny models (smoke test only).
See BENCHMARKS.md for the results and what each number means.
"""
import dataclasses
import datetime
import json
import os
import pathlib
import platform
import shutil
import sys
import tempfile
import time

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
import jax.numpy as jnp
import numpy as np
from absl import app, flags

from mkdm_jax import data as data_lib
from mkdm_jax.allocator import keep_freed_memory
from mkdm_jax.data import batching
from mkdm_jax import losses, models, provenance
from mkdm_jax.models import cpu_attention, factory
from mkdm_jax.train import compile_train_step, sharding
from mkdm_jax.train import step as step_lib

FLAGS = flags.FLAGS
flags.DEFINE_string('out', None, 'Where to write the results JSON.')
flags.DEFINE_boolean('quick', False, 'Tiny models and sizes, one repeat: a smoke test, not a benchmark.')
flags.DEFINE_integer('repeats', 3, 'Timed repeats per measurement (after one warm-up run).')
flags.DEFINE_integer('compare_repeats', 9, 'Timed rounds of the JAX vs PyTorch / GEMM comparison (one '
                     'round is a few seconds; its medians need more rounds than the rest to be stable).')
flags.DEFINE_integer('big_repeats', 3, 'Timed rounds of the BERT-base/large-shaped teacher against MiniLM-L6 '
                     '(its speedups chain these ratios; one round moved them by 30% between runs).')
flags.DEFINE_enum('big_teacher', 'base', ['base', 'large', 'none'], 'Shape of the random big teacher.')
flags.DEFINE_list('batch_sizes', ['32', '128'], 'Inference batch sizes.')
flags.DEFINE_integer('length', 128, 'Fixed sequence length (and max_length of the bucketed data).')
flags.DEFINE_integer('rows', 256, 'WikiQA train rows in each bucketed inference pass.')
flags.DEFINE_integer('compare_batch', 32, 'Batch size of the JAX vs PyTorch and MFU comparison.')
flags.DEFINE_integer('large_batch', 128, 'Second batch size of the JAX vs PyTorch fp32 comparison '
                     '(keys forward_ratio_batch<N>, train_ratio_batch<N>; 0 skips it).')
flags.DEFINE_integer('large_repeats', 5, 'Timed rounds of the --large_batch comparison.')
flags.DEFINE_bool('bf16', True, 'Also compare JAX at --precision=bf16 (bf16 compute, fp32 params) against '
                  'PyTorch under torch.autocast("cpu", dtype=torch.bfloat16), at --compare_batch.')
flags.DEFINE_integer('kd_batch', 32, 'Batch size of the distillation-step measurements.')
flags.DEFINE_integer('kd_length', 64, 'Sequence length of the multi-teacher step measurement.')
flags.DEFINE_integer('bucket_rows', 384, 'WikiQA train rows in each end-to-end bucketing pass.')
flags.DEFINE_integer('gemm_size', 3000, 'N of the N x N x N fp32 GEMM that measures the matmul peak '
                     '(not a power of two: 2048 ran 25-30% slower here, cache-set conflicts).')
flags.DEFINE_integer('mpnet_length', 64, 'Sequence length of the MPNet-base vs PyTorch comparison (its batch is '
                     '--compare_batch; the WikiQA pairs are 39 tokens long on average).')
flags.DEFINE_integer('mpnet_repeats', 5, 'Timed rounds of the MPNet-base vs PyTorch comparison and of mpnet3 vs '
                     'MPNet-base inference (its rounds are long).')
flags.DEFINE_integer('torch_threads', 2, 'PyTorch intra-op threads.')
flags.DEFINE_list('serving_batch_sizes', ['1', '32', '128'], 'Batch sizes of the JAX vs ONNX Runtime serving '
                  'comparison (on WikiQA test rows).')
flags.DEFINE_integer('batch1_rows', 64, 'WikiQA test rows of the batch-1 serving comparison.')
flags.DEFINE_enum('torch_attention', 'sdpa', ['sdpa', 'eager'], "transformers' attention implementation "
                  '(where the model has it: MPNet is eager only).')
flags.DEFINE_string('data_dir', None, 'Data folder (default: as the pipeline resolves it).')
flags.DEFINE_enum('malloc', 'keep', ['keep', 'default'],
                  "glibc malloc policy, set before either framework allocates: 'keep' "
                  "(mkdm_jax.allocator.keep_freed_memory: no mmap, no trimming, one arena) reuses freed "
                  "memory, so no call page-faults fresh buffers and the numbers do not depend on the heap's "
                  "history; 'default' leaves glibc as a user gets it.")

NUM_CLASSES = 2
ALPHA, TEMPERATURE = 0.5, 2.0
OPTIMIZER = dict(learning_rate=5e-5, total_steps=1000, warmup_steps=100)  # the timed train steps' AdamW schedule
BUCKETS = (32, 64, 128)
STEP_KEYS = ('input_ids', 'token_type_ids', 'attention_mask', 'labels', 'weight', 'teacher_logits')
HEADLINE = ('jax_vs_torch_forward_ratio', 'jax_vs_torch_train_ratio', 'forward_mfu', 'train_mfu',
            'multi_teacher_cost_ratio', 'bucketing_speedup', 'mpnet_vs_torch_forward_ratio',
            'mpnet_vs_torch_train_ratio', 'mpnet_forward_mfu', 'mpnet_train_mfu', 'mpnet3_speedup',
            'mpnet3_flop_ratio')
OPTIONAL_HEADLINE = ('forward_ratio_batch', 'train_ratio_batch', 'mpnet_forward_ratio_batch',
                     'mpnet_train_ratio_batch', 'jax_vs_torch_bf16_', 'mpnet_vs_torch_bf16_')


# ---------------------------------------------------------------------------------------------------
# Timing.

def run_once(fn):
  """Seconds for one call of `fn`, waiting for JAX results."""
  start = time.perf_counter()
  jax.block_until_ready(fn())
  return time.perf_counter() - start


def interleaved(fns, repeats):
  """Warms each of `fns` (name -> callable) up once, then runs them in turn `repeats` times.

  Returns name -> list of seconds, one per round.
  """
  for fn in fns.values():
    run_once(fn)
  times = {name: [] for name in fns}
  for _ in range(repeats):
    for name, fn in fns.items():
      times[name].append(run_once(fn))
  return times


def median(values):
  return float(np.median(values))


def pair_ratio(numerator, denominator):
  """Median over rounds of numerator[i] / denominator[i]."""
  return median(np.asarray(numerator) / np.asarray(denominator))


# ---------------------------------------------------------------------------------------------------
# FLOPs (matmul FLOPs, 2 per multiply-add; embeddings, norms, softmax and the tiny heads excluded).

def model_flops(config, batch, length):
  """Forward FLOPs of one [batch, length] input (MPNet's relative-position bias is an addition)."""
  if isinstance(config, (models.BertConfig, models.MPNetConfig)):
    d, f = config.hidden_size, config.intermediate_size
    per_layer = 2 * length * (4 * d * d + 2 * d * f) + 4 * length * length * d  # projections + attention
    return batch * (config.num_layers * per_layer + 2 * d * d)  # + pooler
  e, h = config.embed_dim, config.hidden_size
  return batch * (2 * length * 2 * (e + h) * 4 * h + 2 * 4 * h * 2 * h)  # 2 directions + feature layer


def batches_flops(config, batch_list):
  return sum(model_flops(config, *b['input_ids'].shape) for b in batch_list)


def skipped_attention_flops(config, mask):
  """Attention FLOPs on padded keys, which BERT inference skips where the CPU attention kernel runs."""
  if not cpu_attention.applies(jnp.float32, config.hidden_size // config.num_attention_heads):
    return 0
  length = mask.shape[1]
  return config.num_layers * 4 * length * int((length - mask.sum(1)).sum()) * config.hidden_size


def padding_stats(batch_list):
  """Real tokens, and each batch's longest row (the BiLSTM's steps), as fractions of the padded shapes."""
  masks = [np.asarray(b['attention_mask']) for b in batch_list]
  return {'real_token_fraction': sum(m.sum() for m in masks) / sum(m.size for m in masks),
          'longest_row_fraction': (sum(int(np.max(np.nonzero(m.any(0))[0], initial=-1)) + 1 for m in masks)
                                   / sum(m.shape[1] for m in masks))}


# ---------------------------------------------------------------------------------------------------
# Models and data.

def entry(built):
  """(encoder config, params on the device) of a factory-built (model, params)."""
  model, params = built
  return model.encoder, jax.tree.map(jnp.asarray, params)


def build_models(quick):
  """name -> (encoder config, params of a 2-class Classifier): the pipeline's teacher and students,
  built by the pipeline's own model factory."""
  if quick:
    options, checkpoint, cut, big_shape = factory.ModelOptions(random_shape=(2, 32, 2, 64), bilstm_hidden=16), \
        'random', 1, None
  else:
    options, checkpoint, cut = factory.ModelOptions(bilstm_hidden=256), 'minilm-l6', 3
    big_shape = {'base': (12, 768, 12, 3072), 'large': (24, 1024, 16, 4096), 'none': None}[FLAGS.big_teacher]
  out = {'minilm_l6': entry(factory.teacher(checkpoint, NUM_CLASSES, 0, options)),
         f'bert{cut}': entry(factory.student(f'bert{cut}', checkpoint, NUM_CLASSES, 1, 0, options)),
         'bilstm': entry(factory.student('bilstm', checkpoint, NUM_CLASSES, 1, 0, options))}
  if big_shape is not None:
    big = dataclasses.replace(options, random_shape=big_shape)
    out[f'bert_{FLAGS.big_teacher}'] = entry(factory.teacher('random', NUM_CLASSES, 0, big))
  return out


def build_mpnet(quick):
  """{'mpnet_base': MPNet-base, 'mpnet3': its bottom 3 layers} as `build_models`; --quick: a random
  4-layer MPNet of hidden size 32 and its 3-layer student."""
  if quick:
    options, checkpoint = factory.ModelOptions(random_shape=(4, 32, 2, 64)), 'random'
    model = models.Classifier(factory.random_config(options, 'mpnet'), NUM_CLASSES)
    teacher = model, factory.host_init_params(model, 0)
  else:
    options, checkpoint = factory.ModelOptions(), 'mpnet-base'
    teacher = factory.teacher(checkpoint, NUM_CLASSES, 0, options)
  return {'mpnet_base': entry(teacher),
          'mpnet3': entry(factory.student('mpnet3', checkpoint, NUM_CLASSES, 1, 0, options))}


def load_wikiqa(max_length, rows=None, checkpoint='minilm-l6', split='train'):
  """WikiQA rows of `split` (the first `rows`, or all) encoded by `checkpoint`'s tokenizer."""
  tokenizer = models.load_tokenizer(models.resolve_checkpoint(checkpoint))
  examples = data_lib.load_split('wikiqa', split, FLAGS.data_dir)
  if rows is not None:
    examples = examples.select(np.arange(min(rows, len(examples))))
  return data_lib.encode(tokenizer, examples, max_length)


def inference_batches(encoded, batch_size, buckets):
  """The pipeline's inference order (rows sorted by length) as numpy batches."""
  order = np.argsort(encoded.lengths, kind='stable')
  return [{k: b[k] for k in ('input_ids', 'token_type_ids', 'attention_mask', 'weight')}
          for b in data_lib.batches(encoded.select(order), batch_size, seed=0, epoch=0, shuffle=False,
                                    buckets=buckets)]


def head_params(width, num_heads, seed=0):
  """Fresh linear heads of a Classifier (kernel [H, width, C], bias [H, C]), from its own Heads module."""
  heads = models.classifier.Heads(num_heads, NUM_CLASSES)
  return heads.init(jax.random.key(seed), jnp.zeros((1, width)))['params']


def with_heads(params, num_heads):
  return {**params, 'heads': head_params(params['heads']['kernel'].shape[1], num_heads)}


def device_batch(batch):
  """The train step's inputs on the (one) device."""
  return {k: jnp.asarray(batch[k]) for k in STEP_KEYS}


def kd_batch(batch, num_teachers, seed=0):
  """A device batch for the train step, with random teacher logits [B, T, C]."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(len(batch['labels']), num_teachers, NUM_CLASSES)).astype(np.float32)
  return device_batch({**batch, 'teacher_logits': logits})


class Stepper:
  """Runs the pipeline's compiled train step (`train.compile_train_step`, as `train.fit` builds it) in place:
  `Stepper(...)(batch)` returns the step's measurements."""

  def __init__(self, model, params, loss_config, teacher_models=(), teacher_params=(), frozen=()):
    compiled = compile_train_step(model, params, loss_config, mesh=sharding.make_mesh(), rng=jax.random.key(1),
                                  teacher_models=teacher_models, frozen=frozen, **OPTIMIZER)
    self.step, self.state = compiled.step, compiled.init()
    self.teacher_params = teacher_params

  def __call__(self, batch):
    self.state, measurements = self.step(self.state, batch, self.teacher_params)
    return measurements


# ---------------------------------------------------------------------------------------------------
# 1. Inference throughput and student speedups.

def inference(model_zoo, encoded, batch_sizes, repeats, big_repeats, teacher, pairs):
  """Inference examples/s of every model, and each student's speedup over its teacher.

  Per batch size, on `encoded` rows: one pass with length bucketing, and one batch at fixed length.
  The pipeline's models run alternately for `repeats` rounds; the big teacher (if any) runs alternately
  with `teacher` for `big_repeats` rounds (its passes are long), so its speedups chain two per-round
  ratios: big/teacher times teacher/student. `pairs`: name -> (student, its teacher).
  Returns (results[model][batch size], speedups[batch size][name], padding[batch size][kind]).
  """
  big = next((n for n in model_zoo if n.startswith('bert_')), None)
  steps = {name: jax.jit(step_lib.make_eval_step(models.Classifier(cfg, NUM_CLASSES)))
           for name, (cfg, _) in model_zoo.items()}
  results, speedups, padding = {name: {} for name in model_zoo}, {}, {}
  for bs in batch_sizes:
    data = {'bucketed': inference_batches(encoded, bs, BUCKETS),
            'fixed': inference_batches(encoded, bs, (encoded.max_length,))[:1]}
    rows = {kind: int(sum(b['weight'].sum() for b in batch_list)) for kind, batch_list in data.items()}

    def run(name, kind):
      params = model_zoo[name][1]
      return lambda: [steps[name](params, {k: jnp.asarray(v) for k, v in b.items()})['logits']
                      for b in data[kind]]

    times = interleaved({f'{n}/{k}': run(n, k) for n in model_zoo if n != big for k in data}, repeats)
    big_times = interleaved({f'{n}/{k}': run(n, k) for n in (big, teacher) for k in data},
                            big_repeats) if big else {}
    for name, (cfg, _) in model_zoo.items():
      t = big_times if name == big else times
      results[name][str(bs)] = {
          **{f'{k}_examples_per_s': rows[k] / median(t[f'{name}/{k}']) for k in data},
          **{f'{k}_gflop': batches_flops(cfg, data[k]) / 1e9 for k in data},
          'bucketed_shapes': sorted({b['input_ids'].shape for b in data['bucketed']})}
      print(f'  {name} batch {bs}: ' + ', '.join(
          f'{k} {results[name][str(bs)][f"{k}_examples_per_s"]:.1f} ex/s' for k in data), flush=True)

    def measured(slow, fast, kind):
      if slow == big:
        ratio = pair_ratio(big_times[f'{big}/{kind}'], big_times[f'{teacher}/{kind}'])
        return ratio * measured(teacher, fast, kind)
      return pair_ratio(times[f'{slow}/{kind}'], times[f'{fast}/{kind}'])

    padding[str(bs)] = {kind: padding_stats(batch_list) for kind, batch_list in data.items()}
    speedups[str(bs)] = {}
    for key, (student, slow) in pairs.items():
      entry = {'teacher': slow, 'batch_size': bs}
      for kind in data:
        entry[kind] = {'measured': measured(slow, student, kind),
                       'flop_ratio': (results[slow][str(bs)][f'{kind}_gflop']
                                      / results[student][str(bs)][f'{kind}_gflop'])}
      entry.update(entry['bucketed'])  # headline: real WikiQA pairs with bucketing
      speedups[str(bs)][key] = entry
  return results, speedups, padding


# ---------------------------------------------------------------------------------------------------
# 2 + 3. JAX vs PyTorch, and model FLOPs utilisation against the GEMM peak.

def torch_model(cfg, params):
  """transformers' {Bert,MPNet}ForSequenceClassification holding the same weights and head (as
  `export_hf` writes them), and the attention implementation it runs."""
  import safetensors.numpy
  import torch
  import transformers
  with tempfile.TemporaryDirectory() as tmp:
    models.export_hf(tmp, models.Classifier(cfg, NUM_CLASSES), params)
    config = transformers.AutoConfig.from_pretrained(tmp)
    state = safetensors.numpy.load_file(f'{tmp}/model.safetensors')
  architecture = getattr(transformers, config.architectures[0])
  config._attn_implementation = FLAGS.torch_attention if architecture._supports_sdpa else 'eager'
  model = architecture(config)
  missing, unexpected = model.load_state_dict({k: torch.tensor(v) for k, v in state.items()}, strict=False)
  if unexpected or any(not k.endswith('position_ids') for k in missing):
    raise RuntimeError(f'torch weights: missing {missing}, unexpected {unexpected}')
  return model, config._attn_implementation


def torch_kd_loss(logits, teacher_logits, labels):
  """The same objective as LossConfig(teacher_mode='ensemble'): CE + T^2 KL to averaged teachers."""
  import torch
  target = torch.log(torch.softmax(teacher_logits, -1).mean(1).clamp_min(1e-12))
  p_teacher = torch.softmax(target / TEMPERATURE, -1)
  kl = (p_teacher * (torch.log_softmax(target / TEMPERATURE, -1)
                     - torch.log_softmax(logits / TEMPERATURE, -1))).sum(-1)
  gold = torch.nn.functional.cross_entropy(logits, labels, reduction='none')
  return (ALPHA * TEMPERATURE**2 * kl + (1 - ALPHA) * gold).mean()


def torch_precision(bf16):
  """The context PyTorch computes in: bf16 autocast (its fastest CPU mode), or plain fp32."""
  import contextlib
  import torch
  return torch.autocast('cpu', dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()


def torch_train_step(model, bf16=False):
  """AdamW (decay on matrices only), clipping at 1.0: the JAX optimiser's settings; the forward and loss
  under bf16 autocast when `bf16` (the backward follows it, as torch.autocast documents)."""
  import torch
  no_decay = lambda n: 'bias' in n or 'LayerNorm' in n
  groups = [{'params': [p for n, p in model.named_parameters() if not no_decay(n)], 'weight_decay': 0.01},
            {'params': [p for n, p in model.named_parameters() if no_decay(n)], 'weight_decay': 0.0}]
  optimizer = torch.optim.AdamW(groups, lr=5e-5, fused=True)

  def step(inputs, teacher_logits, labels):
    model.train()
    optimizer.zero_grad(set_to_none=True)
    with torch_precision(bf16):
      loss = torch_kd_loss(model(**inputs).logits.float(), teacher_logits, labels)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    return loss

  return step


def jax_vs_torch(cfg, params, batch, repeats, gemm_size, bf16=False):
  """Forward and train-step examples/s of both frameworks on one batch, plus the GEMM peak and MFU.

  `cfg` is a BERT (transformers' BertForSequenceClassification) or MPNet config (MPNetForSequenceClassification:
  dense + tanh + out_proj on the first token, i.e. our pooler and head; no token types). `bf16`: JAX computes
  in bfloat16 (the pipeline's --precision=bf16: fp32 params, fp32 heads and loss) and PyTorch under bf16
  autocast; the GEMM peak is then a bf16 GEMM's, and logits_max_abs_diff compares two bf16 forwards.
  """
  import torch
  torch.set_num_threads(FLAGS.torch_threads)
  torch.manual_seed(0)
  model = models.Classifier(cfg, NUM_CLASSES, dtype=jnp.bfloat16 if bf16 else jnp.float32)
  jbatch = kd_batch(batch, 3)
  bs, length = batch['input_ids'].shape
  eval_step = jax.jit(step_lib.make_eval_step(model))
  jax_train = Stepper(model, params, losses.LossConfig(teacher_mode='ensemble', alpha=ALPHA,
                                                         temperature=TEMPERATURE))
  tmodel, torch_attention = torch_model(cfg, params)
  names = ('input_ids', 'attention_mask') + (('token_type_ids',) if isinstance(cfg, models.BertConfig) else ())
  inputs = {k: torch.tensor(np.asarray(jbatch[k]), dtype=torch.long) for k in names}
  teacher_logits = torch.tensor(np.asarray(jbatch['teacher_logits']))
  labels = torch.tensor(np.asarray(jbatch['labels']), dtype=torch.long)
  tstep = torch_train_step(tmodel, bf16)

  def torch_forward():
    tmodel.eval()
    with torch.inference_mode(), torch_precision(bf16):
      return tmodel(**inputs).logits

  torch_logits = torch_forward().float().numpy().copy()
  parity = float(np.abs(torch_logits - np.array(eval_step(params, jbatch)['logits'])).max())
  a = jnp.asarray(np.random.default_rng(0).normal(size=(gemm_size, gemm_size)),
                  dtype=jnp.bfloat16 if bf16 else jnp.float32)
  gemm = jax.jit(lambda x: x @ x)
  xla_flops = eval_step.lower(params, jbatch).cost_analysis()
  xla_flops = xla_flops[0] if isinstance(xla_flops, list) else xla_flops
  times = interleaved({
      'gemm': lambda: gemm(a),
      'jax_forward': lambda: eval_step(params, jbatch)['logits'],
      'torch_forward': torch_forward,
      'jax_train': lambda: jax_train(jbatch),
      'torch_train': lambda: tstep(inputs, teacher_logits, labels),
  }, repeats)
  gemm_flops = 2 * gemm_size**3
  fwd_flops = model_flops(cfg, bs, length)
  executed_flops = fwd_flops - skipped_attention_flops(cfg, batch['attention_mask'])
  peak = gemm_flops / np.asarray(times['gemm'])
  fwd_rate = fwd_flops / np.asarray(times['jax_forward'])
  train_rate = 3 * fwd_flops / np.asarray(times['jax_train'])
  ex = lambda name: bs / median(times[name])
  return {
      'batch_size': bs, 'length': length, 'precision': 'bf16' if bf16 else 'fp32', 'torch_attention': torch_attention,
      'torch_threads': FLAGS.torch_threads, 'logits_max_abs_diff': parity,
      'jax_forward_examples_per_s': ex('jax_forward'), 'torch_forward_examples_per_s': ex('torch_forward'),
      'jax_train_examples_per_s': ex('jax_train'), 'torch_train_examples_per_s': ex('torch_train'),
      'forward_ratio': pair_ratio(times['torch_forward'], times['jax_forward']),
      'train_ratio': pair_ratio(times['torch_train'], times['jax_train']),
      'gemm_size': gemm_size, 'gemm_gflops_median': median(peak) / 1e9,
      'gemm_gflops_max': float(peak.max()) / 1e9,
      'forward_gflop': fwd_flops / 1e9, 'xla_cost_analysis_forward_gflop': float(xla_flops['flops']) / 1e9,
      'train_gflop': 3 * fwd_flops / 1e9,
      'forward_gflops': median(fwd_rate) / 1e9, 'train_gflops': median(train_rate) / 1e9,
      'forward_mfu': median(fwd_rate / peak), 'train_mfu': median(train_rate / peak),
      'real_token_fraction': float(batch['attention_mask'].mean()),
      'forward_executed_gflop': executed_flops / 1e9,
      'forward_mfu_executed': median(fwd_rate / peak) * executed_flops / fwd_flops,
      'seconds': times}


def framework_comparisons(cfg, params, encoded, length, batch, large, repeats, large_repeats, gemm_size, bf16):
  """`jax_vs_torch` on the first rows of `encoded` at fixed `length`: fp32 at `batch` ('jax_vs_torch'), fp32
  at `large` ('jax_vs_torch_batch<large>'; 0 skips it) and, if `bf16`, bf16 at `batch` ('jax_vs_torch_bf16')."""
  first = lambda n: next(data_lib.batches(encoded, n, seed=0, epoch=0, buckets=(length,)))
  out = {'jax_vs_torch': jax_vs_torch(cfg, params, first(batch), repeats, gemm_size)}
  if large:
    out[f'jax_vs_torch_batch{large}'] = jax_vs_torch(cfg, params, first(large), large_repeats, gemm_size)
  if bf16:
    out['jax_vs_torch_bf16'] = jax_vs_torch(cfg, params, first(batch), repeats, gemm_size, bf16=True)
  return out


# ---------------------------------------------------------------------------------------------------
# 4. Multi-teacher distillation step cost.

def multi_teacher(student, teacher, batch, repeats):
  """Seconds per step: 1 and 3 teachers from the logit store (1 vs 3 heads), and 3 online teachers."""
  (s_cfg, s_params), (t_cfg, t_params) = student, teacher
  per_head = losses.LossConfig(teacher_mode='per_head', alpha=ALPHA, temperature=TEMPERATURE)

  teacher_model = models.Classifier(t_cfg, NUM_CLASSES)
  teacher_params = tuple(jax.jit(lambda p: jax.tree.map(jnp.copy, p))(t_params) for _ in range(3))
  one = Stepper(models.Classifier(s_cfg, NUM_CLASSES, num_heads=1), with_heads(s_params, 1), per_head)
  three = Stepper(models.Classifier(s_cfg, NUM_CLASSES, num_heads=3), with_heads(s_params, 3), per_head)
  online = Stepper(models.Classifier(s_cfg, NUM_CLASSES, num_heads=3), with_heads(s_params, 3), per_head,
                   (teacher_model,) * 3, teacher_params)
  b1, b3 = kd_batch(batch, 1), kd_batch(batch, 3)
  b_online = {k: v for k, v in b3.items() if k != 'teacher_logits'}
  times = interleaved({'cached_1': lambda: one(b1), 'cached_3': lambda: three(b3),
                       'online_3': lambda: online(b_online)}, repeats)
  return {'batch_size': batch['input_ids'].shape[0], 'length': batch['input_ids'].shape[1],
          'seconds_per_step': {k: median(v) for k, v in times.items()},
          'cached_3_over_cached_1': pair_ratio(times['cached_3'], times['cached_1']),
          'online_3_over_cached_1': pair_ratio(times['online_3'], times['cached_1']),
          'seconds': times}


# ---------------------------------------------------------------------------------------------------
# 5. Length bucketing, end to end.

def padded_tokens(encoded, batch_size, buckets):
  """(padded tokens, real tokens) over one epoch of the pipeline's training batches."""
  order = batching.batch_order(encoded.lengths, batch_size, seed=0, epoch=0, shuffle=True,
                                        drop_remainder=False)
  sizes = batching.bucket_sizes(encoded.max_length, buckets)
  padded = sum(batch_size * sizes[np.searchsorted(sizes, encoded.lengths[rows].max())] for rows in order)
  return int(padded), int(encoded.lengths.sum())


def bucketing(student, encoded, all_train, batch_size, repeats):
  """End-to-end distillation epochs over `encoded` (batching, transfer, steps), bucketed vs fixed."""
  cfg, params = student
  model = models.Classifier(cfg, NUM_CLASSES, num_heads=3)
  stepper = Stepper(model, with_heads(params, 3), losses.LossConfig(teacher_mode='per_head', alpha=ALPHA,
                                                       temperature=TEMPERATURE))
  logits = np.random.default_rng(0).normal(size=(len(encoded), 3, NUM_CLASSES)).astype(np.float32)
  fixed_buckets = (encoded.max_length,)

  def epoch(buckets):
    out = None
    for batch in data_lib.batches(encoded, batch_size, seed=0, epoch=0, buckets=buckets,
                                  extra={'teacher_logits': logits}):
      out = stepper(device_batch(batch))
    return out

  times = interleaved({'bucketed': lambda: epoch(BUCKETS), 'fixed': lambda: epoch(fixed_buckets)}, repeats)
  slice_bucketed, slice_real = padded_tokens(encoded, batch_size, BUCKETS)
  slice_fixed, _ = padded_tokens(encoded, batch_size, fixed_buckets)
  all_bucketed, all_real = padded_tokens(all_train, batch_size, BUCKETS)
  all_fixed, _ = padded_tokens(all_train, batch_size, fixed_buckets)
  return {
      'rows': len(encoded), 'batch_size': batch_size, 'buckets': list(BUCKETS),
      'bucketed_examples_per_s': len(encoded) / median(times['bucketed']),
      'fixed_examples_per_s': len(encoded) / median(times['fixed']),
      'speedup': pair_ratio(times['fixed'], times['bucketed']),
      'slice_padded_tokens': {'bucketed': slice_bucketed, 'fixed': slice_fixed, 'real': slice_real,
                              'fixed_over_bucketed': slice_fixed / slice_bucketed},
      'all_train_padded_tokens': {'rows': len(all_train), 'bucketed': all_bucketed, 'fixed': all_fixed,
                                  'real': all_real, 'fixed_over_bucketed': all_fixed / all_bucketed},
      'seconds': times}


# ---------------------------------------------------------------------------------------------------
# 6. MPNet-base: against PyTorch, its MFU, and its mpnet3 student.

def mpnet(quick, length, compare_length, rows, batch_size, large, repeats, gemm_size, bf16):
  """Sections 1-3 for MPNet-base: its forward and KD train step against transformers' MPNet at
  `compare_length` (`framework_comparisons` at batch_size and `large`, each with the GEMM peak, alternately),
  and the inference speedup of its bottom 3 layers (mpnet3) at batch_size on the first `rows` WikiQA rows,
  as `inference` measures it."""
  zoo = build_mpnet(quick)
  checkpoint = 'minilm-l6' if quick else 'mpnet-base'  # the tokenizer: the random MPNet takes BERT ids
  results, by_batch, padding = inference(zoo, load_wikiqa(length, rows, checkpoint), [batch_size], repeats, 0,
                                         'mpnet_base', {'mpnet3': ('mpnet3', 'mpnet_base')})
  compare_rows = load_wikiqa(compare_length, max(batch_size, large), checkpoint)
  return {'inference': results, 'inference_padding': padding, 'student_speedup': by_batch[str(batch_size)],
          **framework_comparisons(*zoo['mpnet_base'], compare_rows, compare_length, batch_size, large, repeats,
                                  repeats, gemm_size, bf16)}


# ---------------------------------------------------------------------------------------------------

# ---------------------------------------------------------------------------------------------------
# 7. Serving the student: JAX against ONNX Runtime on the exported model.

def serving(cfg, params, encoded, batch_sizes, repeats, batch1_rows):
  """Examples/s of the student served by JAX (the pipeline's jitted eval step) and by ONNX Runtime (fp32 and
  int8 dynamic quantisation of `experiments/export.py --onnx --onnx_int8`'s file), on the same bucketed
  batches of WikiQA test rows (batch 1 on the first `batch1_rows` rows), run alternately."""
  import onnxruntime
  from mkdm_jax.models import onnx_export
  model = models.Classifier(cfg, NUM_CLASSES)
  folder = pathlib.Path(tempfile.mkdtemp(prefix='serving-'))
  models.export_hf(folder, model, params, tokenizer_dir=models.resolve_checkpoint('minilm-l6'))
  onnx_export.export_onnx(folder, int8=True)
  options = onnxruntime.SessionOptions()
  options.intra_op_num_threads = len(os.sched_getaffinity(0))
  sessions = {kind: onnxruntime.InferenceSession(str(folder / file), options, providers=['CPUExecutionProvider'])
              for kind, file in (('onnxruntime_fp32', 'model.onnx'), ('onnxruntime_int8', 'model.int8.onnx'))}
  names = onnx_export.onnx_input_names(folder)
  step = jax.jit(step_lib.make_eval_step(model))
  out = {'onnxruntime': onnxruntime.__version__, 'threads': options.intra_op_num_threads}
  for bs in batch_sizes:
    rows = encoded.select(np.arange(min(batch1_rows, len(encoded)))) if bs == 1 else encoded
    batch_list = inference_batches(rows, bs, BUCKETS)
    feeds = [{k: b[k].astype(np.int64) for k in names} for b in batch_list]
    fns = {'jax': lambda: [step(params, {k: jnp.asarray(v) for k, v in b.items()})['logits'] for b in batch_list]}
    for kind, session in sessions.items():
      fns[kind] = lambda session=session: [session.run(['logits'], feed) for feed in feeds]
    times = interleaved(fns, repeats)
    n = int(sum(b['weight'].sum() for b in batch_list))
    out[f'batch{bs}'] = {'rows': n, **{f'{k}_examples_per_s': n / median(t) for k, t in times.items()},
                         'jax_over_onnxruntime_fp32': pair_ratio(times['onnxruntime_fp32'], times['jax']),
                         'jax_over_onnxruntime_int8': pair_ratio(times['onnxruntime_int8'], times['jax'])}
    print(f'  batch {bs}: ' + ', '.join(f'{k} {n / median(t):.1f} ex/s' for k, t in times.items()), flush=True)
  shutil.rmtree(folder)
  return out


def summary_markdown(result):
  """The run's measured examples/s and ratios as Markdown tables: what README and BENCHMARKS.md quote, so
  every speed they state comes from one run's file (written beside the JSON, same stem)."""
  m = result['machine']
  lines = [f"Measured by `{result['command']}` on {result['date']}: {m['cpu_model']}, {m['cores_usable']} usable "
           f"cores, commit {m.get('commit', '?')[:12]}, jax {m.get('jax', '?')}, torch {m['torch']}, "
           f"load average {m['load_average_start'][0]:.2f} at start, {m['load_average_end'][0]:.2f} at end"
           f"{' (--quick: tiny models, not a benchmark)' if result['quick'] else ''}. Ratios are medians of "
           'per-round ratios of alternating runs; examples/s are medians over rounds.', '',
           '| model | batch | length | precision | JAX fwd ex/s | PyTorch fwd ex/s | JAX / PyTorch fwd | '
           'JAX train ex/s | PyTorch train ex/s | JAX / PyTorch train | fwd MFU |', '|---' * 11 + '|']
  for family, section in (('MiniLM-L6', result), ('MPNet-base', result['mpnet'])):
    for key in sorted(k for k, v in section.items() if k.startswith('jax_vs_torch') and isinstance(v, dict)):
      c = section[key]
      lines.append(f"| {family} | {c['batch_size']} | {c['length']} | {c['precision']} | "
                   f"{c['jax_forward_examples_per_s']:.1f} | {c['torch_forward_examples_per_s']:.1f} | "
                   f"**{c['forward_ratio']:.2f}** | {c['jax_train_examples_per_s']:.1f} | "
                   f"{c['torch_train_examples_per_s']:.1f} | **{c['train_ratio']:.2f}** | {c['forward_mfu']:.2f} |")
  lines += ['', 'Inference on WikiQA train rows, bucketed by length (examples/s) and each student against its '
            'teacher (measured speedup, FLOP ratio):', '', '| model | batch | bucketed ex/s | fixed-length ex/s |',
            '|---|---|---|---|']
  for section in (result, result['mpnet']):
    for name, by_batch in section['inference'].items():
      for bs, r in by_batch.items():
        lines.append(f"| {name} | {bs} | {r['bucketed_examples_per_s']:.1f} | {r['fixed_examples_per_s']:.1f} |")
  lines += ['', '| student vs teacher | batch | measured speedup | FLOP ratio |', '|---|---|---|---|']
  for section in (result['student_speedup_by_batch'], {'x': result['mpnet']['student_speedup']}):
    for by_name in section.values():
      for name, e in by_name.items():
        lines.append(f"| {name} vs {e['teacher']} | {e['batch_size']} | **{e['measured']:.2f}** | "
                     f"{e['flop_ratio']:.2f} |")
  serving = result['serving']
  lines += ['', f"Serving {serving['student']} (WikiQA test rows, bucketed): JAX against ONNX Runtime "
            f"{serving['onnxruntime']} ({serving['threads']} threads) on the exported model:", '',
            '| batch | rows | JAX ex/s | ORT fp32 ex/s | ORT int8 ex/s | JAX / ORT fp32 | JAX / ORT int8 |',
            '|---|---|---|---|---|---|---|']
  for key in sorted((k for k in serving if k.startswith('batch')), key=lambda k: int(k[5:])):
    r = serving[key]
    lines.append(f"| {key[5:]} | {r['rows']} | {r['jax_examples_per_s']:.1f} | {r['onnxruntime_fp32_examples_per_s']:.1f}"
                 f" | {r['onnxruntime_int8_examples_per_s']:.1f} | **{r['jax_over_onnxruntime_fp32']:.2f}** | "
                 f"{r['jax_over_onnxruntime_int8']:.2f} |")
  lines += ['', f"3 cached teachers / 1 (train step): {result['multi_teacher_cost_ratio']:.2f}; bucketed / "
            f"fixed-length training epoch: {result['bucketing_speedup']:.2f}x; train MFU {result['train_mfu']:.2f} "
            f"(MiniLM-L6), {result['mpnet_train_mfu']:.2f} (MPNet-base). Wall time {result['wall_seconds']:.0f} s.", '']
  return '\n'.join(lines)


def machine_info():
  import torch
  import transformers
  return {**provenance.record(), **provenance.versions(), 'cpu_cores': os.cpu_count(), 'cores_usable': len(os.sched_getaffinity(0)),
          'platform': platform.platform(), 'torch': torch.__version__, 'transformers': transformers.__version__,
          'jax_backend': jax.default_backend(),
          'gpu': jax.devices()[0].device_kind if jax.default_backend() == 'gpu' else None,
          'xla_flags': os.environ.get('XLA_FLAGS', ''),
          'load_average_start': os.getloadavg()}


def main(argv):
  del argv
  if not FLAGS.out:
    raise app.UsageError('--out is required')
  malloc = FLAGS.malloc
  if malloc == 'keep' and not keep_freed_memory():
    print('--malloc=keep needs glibc; measuring with the default allocator', flush=True)
    malloc = 'default'
  quick = FLAGS.quick
  repeats = 1 if quick else FLAGS.repeats
  big_repeats = 1 if quick else FLAGS.big_repeats
  length = 32 if quick else FLAGS.length
  batch_sizes = [4] if quick else [int(b) for b in FLAGS.batch_sizes]
  rows = 16 if quick else FLAGS.rows
  bucket_rows = 32 if quick else FLAGS.bucket_rows
  compare_batch, kd_bs = (4, 4) if quick else (FLAGS.compare_batch, FLAGS.kd_batch)
  large_batch = 8 if quick else FLAGS.large_batch
  kd_length = length if quick else FLAGS.kd_length
  gemm_size = 128 if quick else FLAGS.gemm_size
  started = time.time()
  result = {'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
            'command': ' '.join(sys.argv), 'quick': quick, 'machine': {**machine_info(), 'malloc': malloc}}

  all_train = load_wikiqa(length)
  train_slice = all_train.select(np.arange(max(rows, bucket_rows, compare_batch, large_batch)))
  zoo = build_models(quick)
  teacher_name = 'minilm_l6'
  student_names = [n for n in zoo if n != teacher_name and not n.startswith('bert_')]
  big_name = next((n for n in zoo if n.startswith('bert_')), None)

  print(f'[{time.time() - started:.0f} s] ' + '1. inference throughput', flush=True)
  pairs = {s: (s, teacher_name) for s in student_names}
  if big_name:
    pairs.update({f'{s}_vs_{big_name}': (s, big_name) for s in student_names})
  result['inference'], by_batch, result['inference_padding'] = inference(
      zoo, train_slice.select(np.arange(rows)), batch_sizes, repeats, big_repeats, teacher_name, pairs)
  result['student_speedup'] = by_batch[str(max(batch_sizes))]
  result['student_speedup_by_batch'] = by_batch

  print(f'[{time.time() - started:.0f} s] ' + '2-3. JAX vs PyTorch, GEMM peak, MFU', flush=True)
  result.update(framework_comparisons(*zoo[teacher_name], train_slice, length, compare_batch, large_batch,
                                      1 if quick else FLAGS.compare_repeats, 1 if quick else FLAGS.large_repeats,
                                      gemm_size, FLAGS.bf16))

  print(f'[{time.time() - started:.0f} s] ' + '4. multi-teacher step cost', flush=True)
  kd_data = train_slice.select(np.arange(kd_bs))
  kd_rows = next(data_lib.batches(kd_data, kd_bs, seed=0, epoch=0, buckets=(length,)))
  kd_rows = {k: v[:, :kd_length] if v.ndim == 2 else v for k, v in kd_rows.items()}
  result['multi_teacher'] = multi_teacher(zoo[student_names[0]], zoo[teacher_name], kd_rows, repeats + 2)

  print(f'[{time.time() - started:.0f} s] ' + '5. bucketing end to end', flush=True)
  result['bucketing'] = bucketing(zoo[student_names[0]], train_slice.select(np.arange(bucket_rows)),
                                  all_train, kd_bs, repeats)

  print(f'[{time.time() - started:.0f} s] ' + '6. MPNet-base: vs PyTorch, MFU, mpnet3', flush=True)
  result['mpnet'] = mpnet(quick, length, length if quick else FLAGS.mpnet_length, rows, compare_batch, large_batch,
                          1 if quick else FLAGS.mpnet_repeats, gemm_size, FLAGS.bf16)

  print(f'[{time.time() - started:.0f} s] ' + '7. serving the student: JAX vs ONNX Runtime', flush=True)
  bert_student = next(n for n in student_names if n.startswith('bert'))
  serve_sizes = [1, 4] if quick else [int(b) for b in FLAGS.serving_batch_sizes]
  result['serving'] = serving(*zoo[bert_student], load_wikiqa(length, rows, split='test'), serve_sizes,
                              repeats, 8 if quick else FLAGS.batch1_rows)
  result['serving']['student'] = bert_student

  comparison, mpnet_comparison = result['jax_vs_torch'], result['mpnet']['jax_vs_torch']
  mpnet3 = result['mpnet']['student_speedup']['mpnet3']
  result.update({
      'jax_vs_torch_forward_ratio': comparison['forward_ratio'],
      'jax_vs_torch_train_ratio': comparison['train_ratio'],
      'forward_mfu': comparison['forward_mfu'], 'train_mfu': comparison['train_mfu'],
      'multi_teacher_cost_ratio': result['multi_teacher']['cached_3_over_cached_1'],
      'bucketing_speedup': result['bucketing']['speedup'],
      'mpnet_vs_torch_forward_ratio': mpnet_comparison['forward_ratio'],
      'mpnet_vs_torch_train_ratio': mpnet_comparison['train_ratio'],
      'mpnet_forward_mfu': mpnet_comparison['forward_mfu'], 'mpnet_train_mfu': mpnet_comparison['train_mfu'],
      'mpnet3_speedup': mpnet3['measured'], 'mpnet3_flop_ratio': mpnet3['flop_ratio'],
      'student_vs_onnxruntime': {f'batch{bs}': result['serving'][f'batch{bs}']['jax_over_onnxruntime_fp32']
                                 for bs in serve_sizes},
  })
  for prefix, section in (('', result), ('mpnet_', result['mpnet'])):
    if large_batch:
      large = section[f'jax_vs_torch_batch{large_batch}']
      result[f'{prefix}forward_ratio_batch{large_batch}'] = large['forward_ratio']
      result[f'{prefix}train_ratio_batch{large_batch}'] = large['train_ratio']
    if FLAGS.bf16:
      name = 'jax' if not prefix else 'mpnet'
      result[f'{name}_vs_torch_bf16_forward_ratio'] = section['jax_vs_torch_bf16']['forward_ratio']
      result[f'{name}_vs_torch_bf16_train_ratio'] = section['jax_vs_torch_bf16']['train_ratio']
  result['machine']['load_average_end'] = os.getloadavg()
  result['wall_seconds'] = time.time() - started
  out = pathlib.Path(FLAGS.out)
  out.parent.mkdir(parents=True, exist_ok=True)
  out.write_text(json.dumps(result, indent=2, default=str))
  out.with_suffix('.md').write_text(summary_markdown(result))
  for key in HEADLINE + tuple(k for k in result if k.startswith(OPTIONAL_HEADLINE)):
    print(f'{key}: {result[key]:.3f}')
  for name, s in result['student_speedup'].items():
    print(f'student_speedup {name}: measured {s["measured"]:.2f}, flop ratio {s["flop_ratio"]:.2f}')
  print(f'wrote {out} and {out.with_suffix(".md")} ({result["wall_seconds"]:.0f} s)')


if __name__ == '__main__':
  app.run(main)
