"""MKDM / TMKD pipeline: teachers -> logits -> pretrain -> distill -> evaluate -> report.

  python experiments/run.py --flagfile=experiments/configs/quickstart.flags --workdir=runs/quickstart

Every stage writes under --workdir and is skipped on rerun once complete; an interrupted training run
resumes from its last checkpoint. Teachers and the teacher-logit store live in --shared_dir (default:
the work directory) so that ablations can reuse them.
"""
import contextlib
import hashlib
import json
import pathlib
import re
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

import mkdm_jax  # noqa: E402,F401  (sets XLA CPU flags before jax is imported)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from absl import app, flags, logging  # noqa: E402

from mkdm_jax import data as data_lib  # noqa: E402
from mkdm_jax import metrics as metrics_lib  # noqa: E402
from mkdm_jax import models, saved_model, train  # noqa: E402
from mkdm_jax.allocator import keep_freed_memory  # noqa: E402
from mkdm_jax.errors import UserError  # noqa: E402
from mkdm_jax.workdir import WorkdirLock, run_cli  # noqa: E402

STAGES = ('teachers', 'logits', 'pretrain', 'distill', 'evaluate', 'report')
METHODS = ('student_scratch', 'kd_single', 'kd_ensemble', 'mkdm', 'tmkd')

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Work directory (created; reruns resume in it).')
flags.DEFINE_string('shared_dir', None, 'Where teachers and the logit store live (default: --workdir).')
flags.DEFINE_list('stages', list(STAGES), f'Stages to run, a subset of {STAGES}.')
# Data.
flags.DEFINE_string('task', 'wikiqa', 'Task name (see mkdm_jax.data.TASKS).')
flags.DEFINE_string('data_dir', None, 'Data folder (default: $MKDM_DATA_DIR, then ../shared/data).')
flags.DEFINE_string('train_split', 'train', 'Training split (or file path for tsv/jsonl tasks).')
flags.DEFINE_string('dev_split', 'dev', "Split for model selection during training ('none': no dev "
                    'evaluation; the final step is kept and kd_single uses teacher_0).')
flags.DEFINE_string('eval_split', 'test', 'Split reported in results.json.')
flags.DEFINE_string('text_a_col', None, 'tsv/jsonl tasks: question column (name or index).')
flags.DEFINE_string('text_b_col', None, 'tsv/jsonl tasks: passage column (name or index).')
flags.DEFINE_string('label_col', None, 'tsv/jsonl tasks: label column (name or index).')
flags.DEFINE_string('group_col', None, 'tsv/jsonl tasks: question-id column for MAP/MRR.')
flags.DEFINE_integer('max_train_rows', 0, 'Use only the first N training rows (0 = all).')
flags.DEFINE_integer('max_eval_rows', 0, 'Use only the first N dev/eval rows (0 = all).')
flags.DEFINE_integer('negatives_per_positive', 0,
                     'Subsample training negatives to k per positive (0 = keep all).')
flags.DEFINE_integer('unlabelled_extra', 0, 'Extra synthetic question-passage pairs for TMKD stage 1.')
flags.DEFINE_boolean('skip_bad_rows', False, 'Skip malformed rows (counted) instead of failing.')
flags.DEFINE_integer('max_length', 128, 'Maximum tokens per pair (longest-first truncation).')
flags.DEFINE_list('buckets', ['32', '64', '128'], 'Padded lengths for length bucketing.')
flags.DEFINE_string('tokenizer', 'minilm-l6', 'Checkpoint name or folder whose tokenizer is used.')
# Models.
flags.DEFINE_integer('num_teachers', 3, 'Number of teachers.')
flags.DEFINE_list('teacher_checkpoints', ['minilm-l6'],
                  "Teacher init per teacher (one value = all): checkpoint name/folder or 'random'.")
flags.DEFINE_list('teacher_seeds', [], 'Seed per teacher (default: seed + i).')
flags.DEFINE_list('teacher_learning_rates', ['5e-5'], 'Learning rate per teacher (one value = all).')
flags.DEFINE_list('students', ['bert3', 'bilstm'], 'Student architectures: bert<k> and/or bilstm.')
flags.DEFINE_string('student_checkpoint', 'minilm-l6',
                    "Checkpoint whose bottom layers / embeddings initialise students, or 'random'.")
flags.DEFINE_list('random_bert', ['2', '64', '2', '128'],
                  "Shape of 'random' BERT models: layers, hidden, heads, intermediate.")
flags.DEFINE_integer('bilstm_hidden', 256, 'BiLSTM hidden size per direction.')
flags.DEFINE_enum('head_combine', 'mean', ['mean', 'learned'], 'How student heads are combined.')
flags.DEFINE_enum('precision', 'fp32', ['fp32', 'bf16'], 'Compute dtype (params stay fp32).')
flags.DEFINE_boolean('allow_pickle', False, 'Allow pickle checkpoints (they can execute code).')
# Methods and losses.
flags.DEFINE_list('methods', list(METHODS), f'Student methods, a subset of {METHODS}.')
flags.DEFINE_float('alpha', 0.5, 'Weight of the soft-label term (1 - alpha on gold labels).')
flags.DEFINE_float('alpha_end', None, 'If set, alpha moves linearly to this value over each run.')
flags.DEFINE_float('temperature', 2.0, 'Distillation temperature T.')
flags.DEFINE_float('temperature_end', None, 'If set, T moves linearly to this value over each run.')
flags.DEFINE_enum('soft_loss', 'kl', ['kl', 'ce', 'mse'], 'Soft-label loss.')
flags.DEFINE_enum('teacher_weighting', 'uniform', ['uniform', 'fixed', 'confidence'],
                  'Per-teacher weights w_t.')
flags.DEFINE_list('teacher_weights', [], "Fixed per-teacher weights (with --teacher_weighting=fixed).")
flags.DEFINE_boolean('online_teachers', False,
                     'Run the frozen teachers inside the train step instead of reading the logit store.')
flags.DEFINE_float('hidden_weight', 0.0, 'Weight of the hidden-state MSE term (needs --online_teachers).')
flags.DEFINE_float('attention_weight', 0.0, 'Weight of the attention-map KL term (needs --online_teachers).')
# Optimisation.
flags.DEFINE_integer('batch_size', 32, 'Global batch size.')
flags.DEFINE_integer('eval_batch_size', 128, 'Inference batch size.')
flags.DEFINE_float('teacher_epochs', 1.0, 'Teacher fine-tuning epochs.')
flags.DEFINE_float('student_epochs', 2.0, 'Student (stage 2) epochs.')
flags.DEFINE_float('pretrain_epochs', 1.0, 'TMKD stage-1 epochs over the unlabelled pairs.')
flags.DEFINE_float('student_learning_rate', 1e-4, 'BERT student learning rate.')
flags.DEFINE_float('bilstm_learning_rate', 2e-3, 'BiLSTM student learning rate.')
flags.DEFINE_float('warmup_ratio', 0.1, 'Fraction of updates spent warming up.')
flags.DEFINE_enum('lr_decay', 'linear', ['linear', 'cosine', 'constant'], 'Learning-rate decay.')
flags.DEFINE_float('weight_decay', 0.01, 'AdamW weight decay (not on biases / LayerNorm).')
flags.DEFINE_float('layer_decay', 1.0, 'Layer-wise learning-rate decay (1 = off).')
flags.DEFINE_integer('accumulate', 1, 'Gradient accumulation micro-batches per update.')
flags.DEFINE_integer('seed', 0, 'Seed of students and data order.')
flags.DEFINE_integer('checkpoint_every', 200, 'Save a resumable checkpoint every N steps.')
flags.DEFINE_integer('eval_every', 0, 'Dev evaluation every N steps (0 = every epoch).')
flags.DEFINE_integer('fsdp', 1, 'Parameter sharding factor of the device mesh.')
flags.DEFINE_boolean('distributed', False,
                     'Multi-host run: call jax.distributed.initialize() (auto-detected on TPU pods, '
                     'SLURM, ...) and feed each host its slice of every batch.')
flags.DEFINE_integer('speed_rows', 1024, 'Eval rows timed for examples_per_sec.')
flags.DEFINE_boolean('progress', True, 'Show progress bars.')
flags.DEFINE_list('profile_steps', [], 'FIRST,LAST: write a jax.profiler trace of these steps of every '
                  'training run to <run dir>/profile (view with TensorBoard or Perfetto).')
flags.DEFINE_string('compilation_cache_dir', None,
                    'Persistent XLA compilation cache (default: <shared_dir>/cache/xla).')
flags.DEFINE_enum('malloc', 'keep', ['keep', 'default'],
                  "Host allocator: 'keep' tells glibc to keep freed memory (no page faults on every step's "
                  "buffers: a MiniLM train step on a 2-core CPU ran 25% faster; the process keeps its peak "
                  "heap); 'default' leaves glibc as it is.")

flags.mark_flag_as_required('workdir')


def validate_flags():
  """Checks every flag before any work starts (raises UserError naming the flag)."""
  checks = [
      (set(FLAGS.stages) <= set(STAGES), f'--stages: unknown stage in {FLAGS.stages}; choose from {STAGES}'),
      (set(FLAGS.methods) <= set(METHODS), f'--methods: unknown method in {FLAGS.methods}; choose from {METHODS}'),
      (0.0 <= FLAGS.alpha <= 1.0, f'--alpha={FLAGS.alpha} must lie in [0, 1]'),
      (FLAGS.temperature > 0, f'--temperature={FLAGS.temperature} must be > 0'),
      (FLAGS.alpha_end is None or 0.0 <= FLAGS.alpha_end <= 1.0,
       f'--alpha_end={FLAGS.alpha_end} must lie in [0, 1]'),
      (FLAGS.temperature_end is None or FLAGS.temperature_end > 0,
       f'--temperature_end={FLAGS.temperature_end} must be > 0'),
      (FLAGS.num_teachers >= 1, f'--num_teachers={FLAGS.num_teachers} must be >= 1'),
      (FLAGS.batch_size > 0 and FLAGS.batch_size % jax.device_count() == 0,
       f'--batch_size={FLAGS.batch_size} must be a positive multiple of the {jax.device_count()} devices'),
      (len(FLAGS.teacher_checkpoints) in (1, FLAGS.num_teachers),
       f'--teacher_checkpoints needs 1 or --num_teachers={FLAGS.num_teachers} values'),
      (len(FLAGS.teacher_learning_rates) in (1, FLAGS.num_teachers),
       f'--teacher_learning_rates needs 1 or --num_teachers={FLAGS.num_teachers} values'),
      (len(FLAGS.teacher_seeds) in (0, FLAGS.num_teachers),
       f'--teacher_seeds needs 0 or --num_teachers={FLAGS.num_teachers} values'),
      (FLAGS.teacher_weighting != 'fixed' or len(FLAGS.teacher_weights) == FLAGS.num_teachers,
       '--teacher_weighting=fixed needs --teacher_weights with one value per teacher'),
      (all(re.fullmatch(r'bert\d+|bilstm', s) for s in FLAGS.students),
       f'--students: {FLAGS.students}; each must be bert<k> (e.g. bert3) or bilstm'),
      (len(FLAGS.random_bert) == 4, '--random_bert needs 4 values: layers, hidden, heads, intermediate'),
      (FLAGS.accumulate >= 1, '--accumulate must be >= 1'),
      (len(FLAGS.profile_steps) in (0, 2), '--profile_steps needs two steps: FIRST,LAST'),
      (FLAGS.fsdp >= 1 and jax.device_count() % FLAGS.fsdp == 0,
       f'--fsdp={FLAGS.fsdp} must divide the {jax.device_count()} devices'),
      (FLAGS.online_teachers or not (FLAGS.hidden_weight or FLAGS.attention_weight),
       '--hidden_weight/--attention_weight need --online_teachers (teacher hidden states are not stored)'),
      (not (FLAGS.hidden_weight or FLAGS.attention_weight) or 'bilstm' not in FLAGS.students,
       '--hidden_weight/--attention_weight apply to bert<k> students only, not bilstm'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  try:
    buckets = tuple(sorted(int(b) for b in FLAGS.buckets))
    [float(x) for x in FLAGS.teacher_learning_rates + FLAGS.teacher_weights]
    [int(x) for x in FLAGS.teacher_seeds + FLAGS.random_bert + FLAGS.profile_steps]
  except ValueError as e:
    raise UserError(f'a numeric list flag has a non-number: {e}') from None
  if buckets[-1] > FLAGS.max_length or FLAGS.max_length not in buckets:
    buckets = tuple(b for b in buckets if b < FLAGS.max_length) + (FLAGS.max_length,)
  return buckets


# ---------------------------------------------------------------------------------------------
# Models.

def random_bert_config(num_layers=None):
  layers, hidden, heads, intermediate = (int(x) for x in FLAGS.random_bert)
  return models.BertConfig(num_layers=num_layers or layers, hidden_size=hidden,
                           num_attention_heads=heads, intermediate_size=intermediate,
                           max_position_embeddings=max(FLAGS.max_length, 128))


_checkpoints = {}


def load_checkpoint(name):
  """(BertConfig, encoder params) of a checkpoint name/folder, or (random config, None)."""
  if name == 'random':
    return random_bert_config(), None
  if name not in _checkpoints:
    _checkpoints[name] = models.load_hf_bert(models.resolve_checkpoint(name),
                                             allow_pickle=FLAGS.allow_pickle)
  return _checkpoints[name]


def compute_dtype():
  return jnp.bfloat16 if FLAGS.precision == 'bf16' else jnp.float32


def init_params(model, seed, encoder_params=None):
  """Random init of a classifier, with the encoder replaced by pretrained weights when given."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = model.init(jax.random.PRNGKey(seed), dummy, dummy, jnp.ones_like(dummy))['params']
  params = jax.tree.map(np.asarray, params)
  if encoder_params is not None:
    params = {**params, 'encoder': encoder_params}
  return params


def teacher_model(i, num_classes):
  config, encoder_params = load_checkpoint(FLAGS.teacher_checkpoints[i % len(FLAGS.teacher_checkpoints)])
  return models.Classifier(config, num_classes=num_classes, dtype=compute_dtype()), encoder_params


def student_model(arch, num_classes, num_heads):
  """Student classifier and its initial params (bottom-k BERT layers or BERT-initialised BiLSTM)."""
  config, encoder_params = load_checkpoint(FLAGS.student_checkpoint)
  if arch == 'bilstm':
    bilstm = models.BiLSTMConfig(vocab_size=config.vocab_size, embed_dim=config.hidden_size,
                                 hidden_size=FLAGS.bilstm_hidden)
    model = models.Classifier(bilstm, num_classes, num_heads, FLAGS.head_combine, compute_dtype())
    params = init_params(model, FLAGS.seed)
    if encoder_params is not None:
      params = jax.tree.map(np.asarray, models.bilstm_embeddings_from_bert(params, encoder_params))
    return model, params
  k = int(arch[len('bert'):])
  if encoder_params is None:
    config = random_bert_config(k)
  else:
    config, encoder_params = models.cut_bottom_layers(config, encoder_params, k)
  model = models.Classifier(config, num_classes, num_heads, FLAGS.head_combine, compute_dtype())
  return model, init_params(model, FLAGS.seed, encoder_params)


def params_fingerprint(params):
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


# ---------------------------------------------------------------------------------------------
# Data.

def load_data(task, buckets, cache_dir):
  """Examples and encodings of the train, unlabelled, dev and eval sets."""
  tokenizer_dir = models.resolve_checkpoint(FLAGS.tokenizer)
  tokenizer = models.load_tokenizer(tokenizer_dir)
  columns = dict(text_a_col=FLAGS.text_a_col, text_b_col=FLAGS.text_b_col,
                 label_col=FLAGS.label_col, group_col=FLAGS.group_col)

  def load(split, max_rows):
    is_file = FLAGS.task in ('tsv', 'jsonl')
    return data_lib.load_split(task, None if is_file else split, FLAGS.data_dir,
                               path=split if is_file else None, skip_bad_rows=FLAGS.skip_bad_rows,
                               max_rows=max_rows or None, **columns)

  examples = {'train': load(FLAGS.train_split, FLAGS.max_train_rows),
              'eval': load(FLAGS.eval_split, FLAGS.max_eval_rows)}
  if FLAGS.dev_split != 'none':
    examples['dev'] = load(FLAGS.dev_split, FLAGS.max_eval_rows)
  if FLAGS.negatives_per_positive:
    examples['train'] = subsample_negatives(examples['train'], FLAGS.negatives_per_positive, FLAGS.seed)
  examples['unlabelled'] = data_lib.make_unlabelled_pairs(examples['train'], FLAGS.unlabelled_extra,
                                                          FLAGS.seed)
  encoded = {k: data_lib.encode(tokenizer, v, FLAGS.max_length, cache_dir=cache_dir)
             for k, v in examples.items()}
  for name, e in examples.items():
    logging.info('%s: %d rows (%d labelled) from %s', name, len(e), int((e.labels >= 0).sum()), e.source)
  return examples, encoded, tokenizer_dir


def subsample_negatives(examples, per_positive, seed):
  """All positives plus `per_positive` times as many negatives, sampled with `seed`, in file order."""
  positives = np.flatnonzero(examples.labels == 1)
  negatives = np.flatnonzero(examples.labels == 0)
  rng = np.random.default_rng(seed)
  keep = rng.choice(negatives, min(len(negatives), per_positive * len(positives)), replace=False)
  return examples.select(np.sort(np.concatenate([positives, keep])))


# ---------------------------------------------------------------------------------------------
# Stages.

def train_config(epochs, learning_rate, seed, buckets):
  return train.TrainConfig(
      batch_size=FLAGS.batch_size, epochs=epochs, learning_rate=learning_rate,
      warmup_ratio=FLAGS.warmup_ratio, lr_decay=FLAGS.lr_decay, weight_decay=FLAGS.weight_decay,
      layer_decay=FLAGS.layer_decay, accumulate=FLAGS.accumulate, seed=seed, buckets=buckets,
      checkpoint_every=FLAGS.checkpoint_every, eval_every=FLAGS.eval_every, progress=FLAGS.progress,
      profile_steps=tuple(int(s) for s in FLAGS.profile_steps))


def fit_model(directory, model, params, encoded, cfg, loss_config, ctx, eval_data=True, teachers=None):
  """Runs (or resumes, or skips when finished) one training run and saves a model folder.

  `teachers`: a `teacher_inputs` callable, or None (gold labels only).
  """
  saved_model.write_spec(directory, model, tokenizer_dir=ctx['tokenizer_dir'],
                         max_length=FLAGS.max_length, task=FLAGS.task,
                         label_names=ctx['task'].label_names)
  if train.is_complete(directory):
    logging.info('%s: already trained, skipping', directory)
    return
  t0 = time.perf_counter()
  train.fit(directory, model, encoded, cfg, loss_config, mesh=ctx['mesh'], init_params=params,
            **(teachers() if teachers else {}), eval_data=ctx['encoded'].get('dev') if eval_data else None,
            eval_metrics=ctx['metrics'], primary_metric=ctx['primary'])
  logging.info('%s: trained in %.0f s', directory, time.perf_counter() - t0)


def teacher_dirs(shared):
  return [shared / 'teachers' / f'teacher_{i}' for i in range(FLAGS.num_teachers)]


def stage_teachers(ctx):
  for i, directory in enumerate(teacher_dirs(ctx['shared'])):
    model, encoder_params = teacher_model(i, ctx['task'].num_classes)
    seed = int(FLAGS.teacher_seeds[i]) if FLAGS.teacher_seeds else FLAGS.seed + i
    lr = float(FLAGS.teacher_learning_rates[i % len(FLAGS.teacher_learning_rates)])
    fit_model(directory, model, init_params(model, seed, encoder_params), ctx['encoded']['train'],
              train_config(FLAGS.teacher_epochs, lr, seed, ctx['buckets']), train.LossConfig(), ctx)


def teacher_fingerprint(directory):
  """Identity of a trained teacher for the logit store: a hash of its final parameters."""
  path = directory / 'fingerprint'
  if not path.exists():
    _, params, _ = saved_model.load(directory)
    path.write_text(params_fingerprint(params))
  return path.read_text()


def store_manifest(ctx, directory, dataset):
  return {'teacher': teacher_fingerprint(directory), 'data': ctx['examples'][dataset].fingerprint,
          'max_length': FLAGS.max_length}


def row_keys(encoded):
  """One key per row, equal for rows that are identical model inputs (token ids and types)."""
  return [ids.tobytes() + types.tobytes()
          for ids, types in zip(encoded.input_ids, encoded.token_type_ids)]


def stage_logits(ctx):
  """Teacher logits on every dataset, computed once per teacher and stored (reused on reruns).

  A row already predicted for an earlier dataset is not predicted again (TMKD's unlabelled set starts
  with every train pair, and dev and eval may overlap).
  """
  store = data_lib.LogitStore(ctx['shared'] / 'logits')
  for directory in teacher_dirs(ctx['shared']):
    if not train.is_complete(directory):
      raise UserError(f'teacher {directory} is not trained yet: run the teachers stage first')
    model, params = None, None
    known = {}  # row key -> this teacher's logits, over the datasets seen so far
    for dataset, encoded in ctx['encoded'].items():
      name, manifest = f'{directory.name}.{dataset}', store_manifest(ctx, directory, dataset)
      keys = row_keys(encoded)
      if store.has(name, manifest):
        known.update(zip(keys, store.read(name, manifest)[0]))
        continue
      if model is None:
        model, params, _ = saved_model.load(directory)
      todo = np.array([i for i, key in enumerate(keys) if key not in known], np.int64)
      logging.info('%s: predicting %d rows, %d reused from earlier sets', name, len(todo),
                   len(keys) - len(todo))
      if len(todo):
        out = train.predict(model, params, encoded.select(todo), mesh=ctx['mesh'],
                            batch_size=FLAGS.eval_batch_size, buckets=ctx['buckets'],
                            desc=f'{name} logits' if FLAGS.progress else None)
        known.update(zip((keys[i] for i in todo), out['logits']))
      logits = np.stack([known[key] for key in keys])
      if jax.process_index() == 0:
        store.write(name, logits, ctx['examples'][dataset].ids, manifest)


def teacher_logits(ctx, dataset, teachers=None):
  """[N, T, C] logits of the chosen teachers (default all) on `dataset`, read from the store."""
  store = data_lib.LogitStore(ctx['shared'] / 'logits')
  dirs = teacher_dirs(ctx['shared'])
  dirs = dirs if teachers is None else [dirs[i] for i in teachers]
  stacked = []
  for directory in dirs:
    name = f'{directory.name}.{dataset}'
    manifest = store_manifest(ctx, directory, dataset)
    if not store.has(name, manifest):
      raise UserError(f'teacher logits {name} are missing or stale: run the logits stage')
    logits, _ = store.read(name, manifest)
    stacked.append(logits)
  return np.stack(stacked, axis=1)


def teacher_inputs(ctx, dataset, teachers=None):
  """A callable giving fit()'s teacher arguments for the chosen teachers (default all): their stored
  logits, or with --online_teachers the frozen models run inside the train step. Deferred, so that
  finished runs load nothing."""
  def load():
    if not FLAGS.online_teachers:
      return {'teacher_logits': teacher_logits(ctx, dataset, teachers)}
    dirs = teacher_dirs(ctx['shared'])
    loaded = [saved_model.load(dirs[i])[:2] for i in (teachers or range(len(dirs)))]
    return {'teacher_models': tuple(m for m, _ in loaded), 'teacher_params': tuple(p for _, p in loaded)}
  return load


def best_teacher(ctx):
  """Index of the teacher with the best dev score (the kd_single teacher)."""
  scores = [train.read_summary(d)['best_score'] for d in teacher_dirs(ctx['shared'])]
  if None in scores:
    return 0  # trained without a dev set
  return int(np.argmax(scores))


def student_dir(ctx, arch, method):
  return ctx['workdir'] / 'students' / f'{arch}_{method}'


def student_learning_rate(arch):
  return FLAGS.bilstm_learning_rate if arch == 'bilstm' else FLAGS.student_learning_rate


def distill_loss_config(teacher_mode):
  return train.LossConfig(
      teacher_mode=teacher_mode, soft=FLAGS.soft_loss, alpha=FLAGS.alpha, alpha_end=FLAGS.alpha_end,
      temperature=FLAGS.temperature, temperature_end=FLAGS.temperature_end, weighting=FLAGS.teacher_weighting,
      fixed_weights=tuple(float(w) for w in FLAGS.teacher_weights) or None,
      hidden_weight=FLAGS.hidden_weight if teacher_mode != 'none' else 0.0,
      attention_weight=FLAGS.attention_weight if teacher_mode != 'none' else 0.0)


def stage_pretrain(ctx):
  """TMKD stage 1: every teacher's soft labels on unlabelled pairs, one head per teacher."""
  if 'tmkd' not in FLAGS.methods:
    return
  for arch in FLAGS.students:
    model, params = student_model(arch, ctx['task'].num_classes, FLAGS.num_teachers)
    fit_model(student_dir(ctx, arch, 'tmkd_stage1'), model, params, ctx['encoded']['unlabelled'],
              train_config(FLAGS.pretrain_epochs, student_learning_rate(arch), FLAGS.seed, ctx['buckets']),
              distill_loss_config('per_head'), ctx, eval_data=False,
              teachers=teacher_inputs(ctx, 'unlabelled'))


def stage_distill(ctx):
  """Stage 2: every method x student architecture, the same budget and seed."""
  for arch in FLAGS.students:
    for method in FLAGS.methods:
      num_heads = FLAGS.num_teachers if method in ('mkdm', 'tmkd') else 1
      model, params = student_model(arch, ctx['task'].num_classes, num_heads)
      teachers, mode = teacher_inputs(ctx, 'train'), 'per_head'
      if method == 'student_scratch':
        teachers, mode = None, 'none'
      elif method == 'kd_single':
        teachers = teacher_inputs(ctx, 'train', [best_teacher(ctx)])
      elif method == 'kd_ensemble':
        mode = 'ensemble'
      elif method == 'tmkd':
        stage1 = student_dir(ctx, arch, 'tmkd_stage1')
        if not train.is_complete(stage1):
          raise UserError(f'tmkd needs TMKD stage 1 ({stage1}): run the pretrain stage first')
        params = train.load_final(stage1)[0]
      cfg = train_config(FLAGS.student_epochs, student_learning_rate(arch), FLAGS.seed, ctx['buckets'])
      fit_model(student_dir(ctx, arch, method), model, params, ctx['encoded']['train'], cfg,
                distill_loss_config(mode), ctx, teachers=teachers)


def measure_speed(model, params, ctx):
  """Inference examples/s on the first --speed_rows eval rows, after a compiling warm-up pass."""
  data = ctx['encoded']['eval'].select(np.arange(min(FLAGS.speed_rows, len(ctx['encoded']['eval']))))
  run = lambda: train.predict(model, params, data, mesh=ctx['mesh'], batch_size=FLAGS.eval_batch_size,
                              buckets=ctx['buckets'])
  run()
  t0 = time.perf_counter()
  run()
  return len(data) / (time.perf_counter() - t0)


def stage_evaluate(ctx):
  """Metrics on the eval split and inference speed of every teacher and student."""
  out_dir = ctx['workdir'] / 'eval'
  out_dir.mkdir(parents=True, exist_ok=True)
  examples, metric_names = ctx['examples']['eval'], ctx['metrics']
  compute = lambda probs: metrics_lib.compute(metric_names, examples.labels, probs, examples.groups)
  teachers = teacher_dirs(ctx['shared'])
  logits = teacher_logits(ctx, 'eval')
  model, params, _ = saved_model.load(teachers[0])
  teacher_speed = measure_speed(model, params, ctx)
  teacher_params = models.count_params(params)
  rows = [{'name': d.name, 'method': 'teacher', 'student': None, 'params': teacher_params,
           'examples_per_sec': teacher_speed, 'metrics': compute(train.softmax(logits[:, i]))}
          for i, d in enumerate(teachers)]
  rows.append({'name': 'teacher_ensemble', 'method': 'teacher_ensemble', 'student': None,
               'params': teacher_params * len(teachers),
               'examples_per_sec': teacher_speed / len(teachers),
               'metrics': compute(np.mean([train.softmax(logits[:, i]) for i in range(len(teachers))], 0))})
  for arch in FLAGS.students:
    speed = None
    for method in FLAGS.methods:
      directory = student_dir(ctx, arch, method)
      model, params, _ = saved_model.load(directory)
      speed = speed or measure_speed(model, params, ctx)
      result = train.evaluate(model, params, ctx['encoded']['eval'], metric_names, mesh=ctx['mesh'],
                              batch_size=FLAGS.eval_batch_size, buckets=ctx['buckets'])
      rows.append({'name': f'{arch}_{method}', 'method': method, 'student': arch,
                   'params': models.count_params(params), 'examples_per_sec': speed,
                   'metrics': {k: v for k, v in result.items() if '/' not in k},
                   'head_metrics': {k: v for k, v in result.items() if '/' in k}})
  (out_dir / 'rows.json').write_text(json.dumps(rows, indent=1))


def stage_report(ctx):
  rows = json.loads((ctx['workdir'] / 'eval' / 'rows.json').read_text())
  results = {'task': FLAGS.task, 'split': FLAGS.eval_split, 'primary_metric': ctx['primary'],
             'rows': rows}
  (ctx['workdir'] / 'results.json').write_text(json.dumps(results, indent=1))
  (ctx['workdir'] / 'results.md').write_text(results_markdown(results))
  print(results_markdown(results))


def results_markdown(results):
  rows = results['rows']
  names = list(rows[0]['metrics'])
  teacher_speed = next(r['examples_per_sec'] for r in rows if r['method'] == 'teacher')
  lines = [f"Task `{results['task']}`, split `{results['split']}`.", '',
           '| model | method | student | params | ex/s | speedup vs teacher | '
           + ' | '.join(names) + ' |', '|' + '---|' * (6 + len(names))]
  for r in rows:
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | {r['params'] / 1e6:.2f}M | "
                 f"{r['examples_per_sec']:.0f} | {r['examples_per_sec'] / teacher_speed:.1f}x | "
                 + ' | '.join(f"{r['metrics'][n]:.4f}" for n in names) + ' |')
  return '\n'.join(lines) + '\n'


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  if FLAGS.malloc == 'keep':
    if keep_freed_memory():
      logging.info('host allocator: glibc keeps freed memory (--malloc=keep)')
    else:
      logging.warning('--malloc=keep needs glibc; using the default allocator')
  if FLAGS.distributed:
    jax.distributed.initialize()
  buckets = validate_flags()
  workdir = pathlib.Path(FLAGS.workdir).absolute()
  shared = pathlib.Path(FLAGS.shared_dir).absolute() if FLAGS.shared_dir else workdir
  workdir.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    train.enable_compilation_cache(FLAGS.compilation_cache_dir or shared / 'cache' / 'xla')
    task = data_lib.get_task(FLAGS.task)
    examples, encoded, tokenizer_dir = load_data(task, buckets, shared / 'cache' / 'tokens')
    metric_names, primary = task.metrics_for(examples['eval'])
    ctx = dict(workdir=workdir, shared=shared, task=task, buckets=buckets, examples=examples,
               encoded=encoded, tokenizer_dir=tokenizer_dir, mesh=train.make_mesh(FLAGS.fsdp),
               metrics=metric_names, primary=primary)
    (workdir / 'flags.txt').write_text(FLAGS.flags_into_string())
    stages = dict(teachers=stage_teachers, logits=stage_logits, pretrain=stage_pretrain,
                  distill=stage_distill, evaluate=stage_evaluate, report=stage_report)
    for stage in STAGES:
      if stage in FLAGS.stages:
        logging.info('stage %s', stage)
        stages[stage](ctx)


if __name__ == '__main__':
  run_cli(lambda: app.run(main))
