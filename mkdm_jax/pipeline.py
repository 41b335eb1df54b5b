"""The MKDM / TMKD pipeline: teachers -> logits -> pretrain -> distill -> evaluate -> report.

  from mkdm_jax import pipeline
  results = pipeline.run(pipeline.Config(workdir='runs/demo', task='wikiqa', ...))

Every stage writes under `workdir` and is skipped on rerun once complete; an interrupted training run
resumes from its last checkpoint. Each training run records the settings it depends on
(`settings.json`, see `mkdm_jax.distill.SETTINGS`); a rerun whose settings differ stops before any work
and names the changed settings, unless `overwrite` is set. Teachers and the teacher-logit store live
in `shared_dir` (default: the work directory) so that ablations and studies can reuse them.
"""
import dataclasses
import hashlib
import json
import logging
import pathlib
import shutil
import statistics
import time
import typing
from typing import Any

import jax
import numpy as np

from mkdm_jax import data as data_lib
from mkdm_jax import distill, losses, provenance, saved_model, train
from mkdm_jax import metrics as metrics_lib
from mkdm_jax.errors import UserError
from mkdm_jax.models import count_params, factory, load_tokenizer, resolve_checkpoint
from mkdm_jax.models.classifier import combination_weights

log = logging.getLogger(__name__)
STAGES = ('teachers', 'logits', 'pretrain', 'distill', 'evaluate', 'report')
SETTINGS_FILE = 'settings.json'


def _setting(default, help, choices=None):
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a pipeline run (experiments/run.py turns each field into a flag)."""
  workdir: str | None = _setting(None, 'Work directory (created; reruns resume in it).')
  shared_dir: str | None = _setting(None, 'Where teachers and the logit store live (default: workdir).')
  stages: tuple[str, ...] = _setting(STAGES, f'Stages to run, a subset of {STAGES}.')
  overwrite: bool = _setting(False, 'Delete saved runs whose recorded settings differ from this run\'s and '
                             'retrain them (default: stop and list the changed settings).')
  # Data.
  task: str = _setting('wikiqa', 'Task name (see mkdm_jax.data.TASKS).')
  data_dir: str | None = _setting(None, 'Data folder (default: $MKDM_DATA_DIR, then ../shared/data).')
  train_split: str = _setting('train', 'Training split (or file path for tsv/jsonl tasks).')
  dev_split: str = _setting('dev', "Split for model selection, thresholds and learned head weights ('none': "
                            'no dev evaluation; the final step is kept and kd_single uses teacher_0).')
  eval_split: str = _setting('test', 'Split reported in results.json (must be labelled).')
  text_a_col: str | None = _setting(None, 'tsv/jsonl tasks: question column (name or index).')
  text_b_col: str | None = _setting(None, 'tsv/jsonl tasks: passage column (name or index).')
  label_col: str | None = _setting(None, 'tsv/jsonl tasks: label column (name or index).')
  group_col: str | None = _setting(None, 'tsv/jsonl tasks: question-id column for MAP/MRR.')
  max_train_rows: int = _setting(0, 'Use only the first N training rows (0 = all).')
  max_eval_rows: int = _setting(0, 'Use only the first N dev/eval rows (0 = all).')
  negatives_per_positive: int = _setting(0, 'Subsample training negatives to k per positive (0 = keep all).')
  unlabelled_extra: int = _setting(0, 'Extra synthetic question-passage pairs for TMKD stage 1.')
  data_seed: int = _setting(0, 'Seed of the negative subsample and the synthetic unlabelled pairs.')
  skip_bad_rows: bool = _setting(False, 'Skip malformed rows (counted) instead of failing.')
  max_length: int = _setting(128, 'Maximum tokens per pair (longest-first truncation).')
  buckets: tuple[int, ...] = _setting((32, 64, 128), 'Padded lengths for length bucketing.')
  tokenizer: str = _setting('minilm-l6', 'Checkpoint name or folder whose tokenizer is used.')
  # Models.
  num_teachers: int = _setting(3, 'Number of teachers.')
  teacher_checkpoints: tuple[str, ...] = _setting(
      ('minilm-l6',), "Teacher init per teacher (one value = all): checkpoint name/folder or 'random'.")
  teacher_seeds: tuple[int, ...] = _setting((), 'Seed per teacher (default: 0, 1, 2, ...).')
  teacher_learning_rates: tuple[float, ...] = _setting((5e-5,), 'Learning rate per teacher (one value = all).')
  students: tuple[str, ...] = _setting(('bert3', 'bilstm'), 'Student architectures: bert<k> and/or bilstm.')
  student_checkpoint: str = _setting('minilm-l6', "Checkpoint whose bottom layers / embeddings initialise "
                                     "students, or 'random'.")
  random_bert: tuple[int, ...] = _setting((2, 64, 2, 128), "Shape of 'random' BERT models: layers, hidden, "
                                          'heads, intermediate.')
  bilstm_hidden: int = _setting(256, 'BiLSTM hidden size per direction.')
  head_combine: str = _setting('mean', "How a multi-head student combines its heads: 'mean', or 'learned' "
                               '(softmax weights fitted on dev after training; see distill.fit_combination_weights).',
                               ('mean', 'learned'))
  precision: str = _setting('fp32', 'Compute dtype (params stay fp32).', ('fp32', 'bf16'))
  allow_pickle: bool = _setting(False, 'Allow pickle checkpoints (they can execute code).')
  # Methods and losses.
  methods: tuple[str, ...] = _setting(tuple(distill.METHODS), f'Student methods, a subset of {tuple(distill.METHODS)}.')
  alpha: float = _setting(0.5, 'Weight of the soft-label term (1 - alpha on gold labels).')
  alpha_end: float | None = _setting(None, 'If set, alpha moves linearly to this value over each run.')
  temperature: float = _setting(2.0, 'Distillation temperature T.')
  temperature_end: float | None = _setting(None, 'If set, T moves linearly to this value over each run.')
  soft_loss: str = _setting('kl', 'Soft-label loss: T^2 KL, T^2 soft cross-entropy, or MSE of logits.',
                            losses.SOFT_LOSSES)
  teacher_weighting: str = _setting(
      'uniform', 'Per-teacher weights w_t (methods with several teachers: per head in mkdm/tmkd, inside the '
      'target in kd_ensemble): uniform, fixed (--teacher_weights), or confidence (per example, the '
      "teacher's max probability).", losses.TEACHER_WEIGHTINGS)
  teacher_weights: tuple[float, ...] = _setting((), 'Fixed per-teacher weights (with --teacher_weighting=fixed).')
  ensemble_target: str = _setting(
      'probs', "kd_ensemble's target: 'probs', the mean of the teachers' distributions softened at T "
      "(Hinton et al.); 'logits', the mean of their logits (TextBrewer).", losses.ENSEMBLE_TARGETS)
  online_teachers: bool = _setting(False, 'Run the frozen teachers inside the train step instead of reading '
                                   'the logit store.')
  hidden_weight: float = _setting(0.0, 'Weight of the hidden-state MSE term, averaged over the method\'s '
                                  'teachers (needs --online_teachers).')
  attention_weight: float = _setting(0.0, 'Weight of the attention-map KL term, averaged over the method\'s '
                                     'teachers (needs --online_teachers and equal head counts).')
  # Optimisation.
  batch_size: int = _setting(32, 'Global batch size.')
  eval_batch_size: int = _setting(128, 'Inference batch size.')
  teacher_epochs: float = _setting(1.0, 'Teacher fine-tuning epochs.')
  student_epochs: float = _setting(2.0, 'Student (stage 2) epochs.')
  pretrain_epochs: float = _setting(1.0, 'TMKD stage-1 epochs over the unlabelled pairs.')
  student_learning_rate: float = _setting(1e-4, 'BERT student learning rate.')
  bilstm_learning_rate: float = _setting(2e-3, 'BiLSTM student learning rate.')
  warmup_ratio: float = _setting(0.1, 'Fraction of updates spent warming up.')
  lr_decay: str = _setting('linear', 'Learning-rate decay.', ('linear', 'cosine', 'constant'))
  weight_decay: float = _setting(0.01, 'AdamW weight decay (not on biases / LayerNorm).')
  layer_decay: float = _setting(1.0, 'Layer-wise learning-rate decay (1 = off).')
  accumulate: int = _setting(1, 'Gradient accumulation micro-batches per update.')
  student_seed: int = _setting(0, 'Seed of student initialisation, data order and dropout.')
  checkpoint_every: int = _setting(200, 'Save a resumable checkpoint every N steps.')
  eval_every: int = _setting(0, 'Dev evaluation every N steps (0 = every epoch).')
  fsdp: int = _setting(1, 'Parameter sharding factor of the device mesh.')
  distributed: bool = _setting(False, 'Multi-host run: call jax.distributed.initialize() (auto-detected on '
                               'TPU pods, SLURM, ...) and feed each host its slice of every batch.')
  speed_rows: int = _setting(1024, 'Eval rows timed for examples_per_sec.')
  speed_repeats: int = _setting(3, 'Timed passes per model after a warm-up pass (the median is reported).')
  progress: bool = _setting(True, 'Show progress bars.')
  profile_steps: tuple[int, ...] = _setting((), 'FIRST,LAST: write a jax.profiler trace of these steps of every '
                                            'training run to <run dir>/profile.')
  compilation_cache_dir: str | None = _setting(None, 'Persistent XLA compilation cache (default: '
                                               '<shared_dir>/cache/xla).')


def config_types():
  """Field name -> resolved type annotation of Config."""
  return typing.get_type_hints(Config)


def _convert(name, kind, value):
  """A flag value (typed already, or a string as in a flagfile) as the field's type."""
  if typing.get_origin(kind) is tuple:
    element = typing.get_args(kind)[0]
    items = value.split(',') if isinstance(value, str) else list(value)
    try:
      return tuple(element(v) for v in items if v != '')
    except ValueError:
      raise UserError(f'--{name}={",".join(map(str, items))}: a non-number where each value must be a '
                      f'{element.__name__}') from None
  if not isinstance(value, str) or kind in (str, str | None):
    return value
  if kind is bool:
    if value.lower() not in ('true', 'false', '1', '0'):
      raise UserError(f'--{name}={value}: expected true or false')
    return value.lower() in ('true', '1')
  scalar = float if kind in (float, float | None) else int
  try:
    return scalar(value)
  except ValueError:
    raise UserError(f'--{name}={value}: expected a {scalar.__name__}') from None


def config_from_strings(values: dict[str, Any]) -> Config:
  """A Config from flag values (lists of strings become typed tuples); UserError names a bad flag."""
  types = config_types()
  unknown = sorted(set(values) - set(types))
  if unknown:
    raise UserError(f'unknown setting(s) {unknown}; see the fields of mkdm_jax.pipeline.Config')
  return Config(**{name: _convert(name, types[name], value) for name, value in values.items()})


def config_from_flagfile(path, **overrides) -> Config:
  """A Config from an experiments/configs flagfile (`--name=value`, `--name` / `--noname` for booleans,
  `#` comments) with keyword overrides: what run.py would build, without absl (for notebooks and scripts)."""
  values = {}
  path = pathlib.Path(path)
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise UserError(f'{path}: cannot read flagfile: {e.strerror}') from None
  bools = {name for name, kind in config_types().items() if kind is bool}
  for lineno, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    if not line.startswith('--'):
      raise UserError(f'{path}:{lineno}: expected --name=value, got {line!r}')
    name, eq, value = line[2:].partition('=')
    if not eq and name in bools:
      value = 'true'
    elif not eq and name.startswith('no') and name[2:] in bools:
      name, value = name[2:], 'false'
    values[name] = value
  return config_from_strings({**values, **overrides})


# ---------------------------------------------------------------------------------------------
# Checks before any work.

def validate(cfg: Config):
  """Raises UserError naming the flag(s) of the first setting or combination without meaning."""
  methods = set(cfg.methods)
  kd_methods = [m for m in cfg.methods if m in distill.METHODS and distill.METHODS[m].teachers != 'none']
  weighted = [m for m in cfg.methods if m in distill.METHODS and distill.uses_teacher_weights(m)]
  multi_head = [m for m in cfg.methods if m in distill.METHODS and distill.METHODS[m].heads == 'per_teacher']
  aux = [f'--{name}_weight' for name in losses.AUX_TERMS if getattr(cfg, f'{name}_weight') > 0]
  checks = [
      (cfg.workdir is not None, '--workdir is required'),
      (set(cfg.stages) <= set(STAGES), f'--stages: unknown stage in {cfg.stages}; choose from {STAGES}'),
      (methods <= set(distill.METHODS),
       f'--methods: unknown method in {cfg.methods}; choose from {tuple(distill.METHODS)}'),
      (0.0 <= cfg.alpha <= 1.0, f'--alpha={cfg.alpha} must lie in [0, 1]'),
      (cfg.temperature > 0, f'--temperature={cfg.temperature} must be > 0'),
      (cfg.alpha_end is None or 0.0 <= cfg.alpha_end <= 1.0, f'--alpha_end={cfg.alpha_end} must lie in [0, 1]'),
      (cfg.temperature_end is None or cfg.temperature_end > 0,
       f'--temperature_end={cfg.temperature_end} must be > 0'),
      (cfg.num_teachers >= 1, f'--num_teachers={cfg.num_teachers} must be >= 1'),
      (cfg.batch_size > 0 and cfg.batch_size % jax.device_count() == 0,
       f'--batch_size={cfg.batch_size} must be a positive multiple of the {jax.device_count()} devices'),
      (len(cfg.teacher_checkpoints) in (1, cfg.num_teachers),
       f'--teacher_checkpoints needs 1 or --num_teachers={cfg.num_teachers} values'),
      (len(cfg.teacher_learning_rates) in (1, cfg.num_teachers),
       f'--teacher_learning_rates needs 1 or --num_teachers={cfg.num_teachers} values'),
      (len(cfg.teacher_seeds) in (0, cfg.num_teachers),
       f'--teacher_seeds needs 0 or --num_teachers={cfg.num_teachers} values'),
      (all(__import__('re').fullmatch(factory.STUDENT_PATTERN, s) for s in cfg.students),
       f'--students: {cfg.students}; each must be bert<k> (e.g. bert3) or bilstm'),
      (len(cfg.random_bert) == 4, '--random_bert needs 4 values: layers, hidden, heads, intermediate'),
      (cfg.accumulate >= 1, '--accumulate must be >= 1'),
      (len(cfg.profile_steps) in (0, 2), '--profile_steps needs two steps: FIRST,LAST'),
      (cfg.fsdp >= 1 and jax.device_count() % cfg.fsdp == 0,
       f'--fsdp={cfg.fsdp} must divide the {jax.device_count()} devices'),
      (cfg.speed_repeats >= 1, f'--speed_repeats={cfg.speed_repeats} must be >= 1'),
      # Teacher weighting: only where several teachers meet.
      (cfg.teacher_weighting == 'fixed' or not cfg.teacher_weights,
       '--teacher_weights is given but --teacher_weighting is not fixed: the weights would be ignored; add '
       '--teacher_weighting=fixed or drop --teacher_weights'),
      (cfg.teacher_weighting != 'fixed' or len(cfg.teacher_weights) == cfg.num_teachers,
       '--teacher_weighting=fixed needs --teacher_weights with one value per teacher'),
      (cfg.teacher_weighting != 'fixed' or (all(w >= 0 for w in cfg.teacher_weights)
                                           and sum(cfg.teacher_weights) > 0),
       '--teacher_weights must be >= 0 and not all 0'),
      (cfg.teacher_weighting == 'uniform' or cfg.num_teachers > 1,
       f'--teacher_weighting={cfg.teacher_weighting} with --num_teachers=1: one teacher has nothing to weight'),
      (cfg.teacher_weighting == 'uniform' or weighted,
       f'--teacher_weighting={cfg.teacher_weighting} applies to methods with several teachers (kd_ensemble, mkdm, '
       f'tmkd); --methods={",".join(cfg.methods)} has none'),
      # kd_ensemble's target.
      (cfg.ensemble_target == 'probs' or 'kd_ensemble' in methods,
       f'--ensemble_target={cfg.ensemble_target} applies to kd_ensemble only, which --methods does not include'),
      (not (cfg.soft_loss == 'mse' and 'kd_ensemble' in methods and cfg.ensemble_target == 'probs'),
       '--soft_loss=mse compares raw logits, and a mean of probabilities has none: use '
       '--ensemble_target=logits for kd_ensemble with --soft_loss=mse'),
      # Head combination.
      (cfg.head_combine == 'mean' or (multi_head and cfg.num_teachers > 1),
       '--head_combine=learned needs a student with several heads: --methods with mkdm or tmkd and '
       '--num_teachers > 1'),
      (cfg.head_combine == 'mean' or cfg.dev_split != 'none',
       '--head_combine=learned fits the head weights on the dev split: it needs a --dev_split'),
      # Intermediate-layer terms.
      (not aux or cfg.online_teachers,
       f'{"/".join(aux)} need --online_teachers (teacher hidden states are not stored)'),
      (not aux or 'bilstm' not in cfg.students, f'{"/".join(aux)} apply to bert<k> students only, not bilstm'),
      (not aux or kd_methods, f'{"/".join(aux)} need a method with teachers in --methods'),
      (not cfg.online_teachers or kd_methods, '--online_teachers needs a method with teachers in --methods'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  if aux:
    _check_intermediate_shapes(cfg)


def _check_intermediate_shapes(cfg):
  """Hidden-state terms need teachers of one width; attention terms equal head counts everywhere."""
  options = model_options(cfg)
  teachers = [factory.encoder_config(distill.per_teacher(cfg.teacher_checkpoints, i), options)
              for i in range(cfg.num_teachers)]
  student = factory.encoder_config(cfg.student_checkpoint, options)
  if cfg.hidden_weight > 0 and len({t.hidden_size for t in teachers}) > 1:
    raise UserError(f'--hidden_weight: the teachers differ in width ({[t.hidden_size for t in teachers]}); '
                    'the hidden-state term shares one projection, so it needs teachers of one width')
  heads = {t.num_attention_heads for t in teachers}
  if cfg.attention_weight > 0 and heads != {student.num_attention_heads}:
    raise UserError(f'--attention_weight: teachers have {sorted(heads)} attention heads and the students '
                    f'{student.num_attention_heads}; attention maps are compared head by head, so the counts '
                    'must be equal')


def model_options(cfg: Config) -> factory.ModelOptions:
  return factory.ModelOptions(dtype='bfloat16' if cfg.precision == 'bf16' else 'float32',
                              random_shape=tuple(cfg.random_bert), max_length=cfg.max_length,
                              bilstm_hidden=cfg.bilstm_hidden, allow_pickle=cfg.allow_pickle)


def buckets_of(cfg: Config) -> tuple[int, ...]:
  """Sorted buckets, capped at and ending with max_length."""
  buckets = tuple(sorted(cfg.buckets))
  if not buckets or buckets[-1] > cfg.max_length or cfg.max_length not in buckets:
    buckets = tuple(b for b in buckets if b < cfg.max_length) + (cfg.max_length,)
  return buckets


# ---------------------------------------------------------------------------------------------
# Data.

@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage reads: the config, folders, task, data and device mesh."""
  cfg: Config
  workdir: pathlib.Path
  shared: pathlib.Path
  task: data_lib.TaskSpec
  buckets: tuple[int, ...]
  examples: dict
  encoded: dict
  tokenizer_dir: pathlib.Path
  mesh: Any
  metrics: list
  primary: str

  def teacher_dirs(self):
    return [self.shared / 'teachers' / f'teacher_{i}' for i in range(self.cfg.num_teachers)]

  def student_dir(self, arch, method):
    return self.workdir / 'students' / f'{arch}_{method}'


def subsample_negatives(examples, per_positive, seed):
  """All positives plus `per_positive` times as many negatives, sampled with `seed`, in file order."""
  positives = np.flatnonzero(examples.labels == 1)
  negatives = np.flatnonzero(examples.labels == 0)
  rng = np.random.default_rng(seed)
  keep = rng.choice(negatives, min(len(negatives), per_positive * len(positives)), replace=False)
  return examples.select(np.sort(np.concatenate([positives, keep])))


def load_data(cfg: Config, task, cache_dir):
  """Examples and encodings of the train, unlabelled, dev and eval sets, and the tokenizer folder."""
  tokenizer_dir = resolve_checkpoint(cfg.tokenizer)
  tokenizer = load_tokenizer(tokenizer_dir)
  columns = dict(text_a_col=cfg.text_a_col, text_b_col=cfg.text_b_col, label_col=cfg.label_col,
                 group_col=cfg.group_col)
  is_file = cfg.task in ('tsv', 'jsonl')

  def load(split, max_rows):
    return data_lib.load_split(task, None if is_file else split, cfg.data_dir, path=split if is_file else None,
                               skip_bad_rows=cfg.skip_bad_rows, max_rows=max_rows or None, **columns)

  examples = {'train': load(cfg.train_split, cfg.max_train_rows), 'eval': load(cfg.eval_split, cfg.max_eval_rows)}
  if cfg.dev_split != 'none':
    examples['dev'] = load(cfg.dev_split, cfg.max_eval_rows)
  for name, flag in (('eval', 'eval_split'), ('dev', 'dev_split')):
    if name in examples and not (examples[name].labels >= 0).any():
      raise UserError(f'--{flag}={getattr(cfg, flag)}: {examples[name].source} has no labels, so nothing can be '
                      f'{"evaluated" if name == "eval" else "selected"} on it; choose a labelled split (score '
                      'unlabelled pairs with experiments/evaluate.py --predictions on a trained model)')
  if cfg.negatives_per_positive:
    examples['train'] = subsample_negatives(examples['train'], cfg.negatives_per_positive, cfg.data_seed)
  if 'tmkd' in cfg.methods:
    examples['unlabelled'] = data_lib.make_unlabelled_pairs(examples['train'], cfg.unlabelled_extra,
                                                            cfg.data_seed)
  encoded = {k: data_lib.encode(tokenizer, v, cfg.max_length, cache_dir=cache_dir) for k, v in examples.items()}
  for name, e in examples.items():
    log.info('%s: %d rows (%d labelled) from %s', name, len(e), int((e.labels >= 0).sum()), e.source)
  return examples, encoded, tokenizer_dir


# ---------------------------------------------------------------------------------------------
# Saved runs and their settings.

def _recorded_settings(directory):
  path = pathlib.Path(directory) / SETTINGS_FILE
  return json.loads(path.read_text()) if path.exists() else None


def _stale(directory, settings):
  """The changed settings of a saved run (empty when it matches or was never started)."""
  recorded = _recorded_settings(directory)
  if recorded is None:
    return []
  if 'teachers' not in settings:  # up-front check: the teachers' fingerprints are compared at fit time
    recorded = {k: v for k, v in recorded.items() if k != 'teachers'}
  return distill.changed_settings(recorded, settings)


def _stale_message(stale):
  lines = [f'  {directory}: ' + '; '.join(changes) for directory, changes in stale]
  return ('saved runs were trained with other settings, so their results would be stale:\n' + '\n'.join(lines)
          + '\nUse a new --workdir (and --shared_dir), put the old values back, or pass --overwrite to delete '
          'and retrain exactly these runs.')


def check_saved_runs(ctx: Context):
  """Before any work: every saved run this config would reuse must have been trained with its settings."""
  cfg = ctx.cfg
  planned = [(d, distill.teacher_settings(cfg, i)) for i, d in enumerate(ctx.teacher_dirs())]
  for arch in cfg.students:
    runs = list(cfg.methods) + ([distill.STAGE1] if 'tmkd' in cfg.methods else [])
    planned += [(ctx.student_dir(arch, m), distill.student_settings(cfg, arch, m)) for m in runs]
  stale = [(d, changes) for d, s in planned for changes in [_stale(d, s)] if changes]
  if stale and not cfg.overwrite:
    raise UserError(_stale_message(stale))
  for directory, changes in stale:
    log.warning('--overwrite: deleting %s (changed: %s)', directory, '; '.join(changes))
    shutil.rmtree(directory)


def claim_run(directory, settings, overwrite):
  """Records a run's settings before it trains; a run saved under other settings is stale."""
  changes = _stale(directory, settings)
  if changes:
    if not overwrite:
      raise UserError(_stale_message([(directory, changes)]))
    log.warning('--overwrite: deleting %s (changed: %s)', directory, '; '.join(changes))
    shutil.rmtree(directory)
  directory.mkdir(parents=True, exist_ok=True)
  if _recorded_settings(directory) is None:
    (directory / SETTINGS_FILE).write_text(json.dumps(settings, indent=1))


# ---------------------------------------------------------------------------------------------
# Training.

def train_config(cfg: Config, buckets, *, epochs, learning_rate, seed):
  return train.TrainConfig(
      batch_size=cfg.batch_size, epochs=epochs, learning_rate=learning_rate, warmup_ratio=cfg.warmup_ratio,
      lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay, layer_decay=cfg.layer_decay,
      accumulate=cfg.accumulate, seed=seed, buckets=buckets, checkpoint_every=cfg.checkpoint_every,
      eval_every=cfg.eval_every, progress=cfg.progress, profile_steps=tuple(cfg.profile_steps))


def fit_model(ctx: Context, directory, build, data, settings, train_cfg, loss_config, *, select_on_dev=True,
              teachers=None):
  """Trains (or resumes, or skips when finished) one run and saves its model folder.

  build: () -> (model, initial params); teachers: () -> fit()'s teacher arguments, or None.
  """
  claim_run(directory, settings, ctx.cfg.overwrite)
  if train.is_complete(directory):
    log.info('%s: already trained, skipping', directory)
    return
  model, params = build()
  saved_model.write_spec(directory, model, tokenizer_dir=ctx.tokenizer_dir, max_length=ctx.cfg.max_length,
                         task=ctx.cfg.task, label_names=ctx.task.label_names)
  t0 = time.perf_counter()
  params = train.fit(directory, model, data, train_cfg, loss_config, mesh=ctx.mesh, init_params=params,
                     **(teachers() if teachers else {}),
                     eval_data=ctx.encoded.get('dev') if select_on_dev else None,
                     eval_metrics=ctx.metrics, primary_metric=ctx.primary)
  if model.combine == 'learned' and select_on_dev and 'dev' in ctx.encoded:
    params = _fit_head_weights(ctx, directory, model, params)
  saved_model.update_spec(directory, combine_weights=np.asarray(combination_weights(model, params)).tolist())
  log.info('%s: trained in %.0f s', directory, time.perf_counter() - t0)


def _fit_head_weights(ctx, directory, model, params):
  """Fits the learned head combination on dev and saves it into the final params."""
  head_logits = predict(ctx, model, params, 'dev')['head_logits']
  weights = distill.fit_combination_weights(head_logits, ctx.examples['dev'].labels)
  params = {**jax.tree.map(np.asarray, params), 'combine_weights': weights}
  train.save_params(pathlib.Path(directory) / 'final', params)
  log.info('%s: head weights fitted on dev: %s', directory, np.round(np.exp(weights) / np.exp(weights).sum(), 3))
  return params


def stage_teachers(ctx: Context):
  cfg = ctx.cfg
  options = model_options(cfg)
  for i, directory in enumerate(ctx.teacher_dirs()):
    checkpoint = distill.per_teacher(cfg.teacher_checkpoints, i)
    seed = distill.per_teacher(cfg.teacher_seeds, i, default=i)
    lr = distill.per_teacher(cfg.teacher_learning_rates, i)
    fit_model(ctx, directory, lambda: factory.teacher(checkpoint, ctx.task.num_classes, seed, options),
              ctx.encoded['train'], distill.teacher_settings(cfg, i),
              train_config(cfg, ctx.buckets, epochs=cfg.teacher_epochs, learning_rate=lr, seed=seed),
              train.LossConfig())


def params_fingerprint(params):
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def teacher_fingerprint(directory):
  """Identity of a trained teacher: a hash of its final parameters."""
  path = pathlib.Path(directory) / 'fingerprint'
  if not path.exists():
    _, params, _ = saved_model.load(directory)
    path.write_text(params_fingerprint(params))
  return path.read_text()


def _trained_teachers(ctx):
  dirs = ctx.teacher_dirs()
  missing = [str(d) for d in dirs if not train.is_complete(d)]
  if missing:
    raise UserError(f'teachers not trained yet ({", ".join(missing)}): run the teachers stage first')
  return dirs


def store_manifest(ctx, directory, dataset):
  return {'teacher': teacher_fingerprint(directory), 'data': ctx.examples[dataset].fingerprint,
          'max_length': ctx.cfg.max_length}


def stage_logits(ctx: Context):
  """Teacher logits on every dataset, computed once per teacher and row (rows are keyed by row id,
  so a row shared by several sets, e.g. TMKD's unlabelled set and train, is predicted once)."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  for directory in _trained_teachers(ctx):
    model, params = None, None
    known = {}  # row id -> this teacher's logits, over the datasets seen so far
    for dataset, encoded in ctx.encoded.items():
      name, manifest = f'{directory.name}.{dataset}', store_manifest(ctx, directory, dataset)
      ids = ctx.examples[dataset].ids
      if store.has(name, manifest):
        logits, stored_ids = store.read(name, manifest)
        known.update(zip(stored_ids.tolist(), logits))
        continue
      if model is None:
        model, params, _ = saved_model.load(directory)
      todo = np.array([i for i, key in enumerate(ids.tolist()) if key not in known], np.int64)
      log.info('%s: predicting %d rows, %d reused from earlier sets', name, len(todo), len(ids) - len(todo))
      if len(todo):
        out = train.predict(model, params, encoded.select(todo), mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size,
                            buckets=ctx.buckets, desc=f'{name} logits' if ctx.cfg.progress else None)
        known.update(zip(ids[todo].tolist(), out['logits']))
      if jax.process_index() == 0:
        store.write(name, np.stack([known[key] for key in ids.tolist()]), ids, manifest)


def teacher_logits(ctx: Context, dataset, teachers=None):
  """[N, T, C] logits of the chosen teachers (default all) on `dataset`, read from the store by row id."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  dirs = ctx.teacher_dirs()
  chosen = [dirs[i] for i in (range(len(dirs)) if teachers is None else teachers)]
  stacked = []
  for directory in chosen:
    name = f'{directory.name}.{dataset}'
    manifest = store_manifest(ctx, directory, dataset)
    if not store.has(name, manifest):
      raise UserError(f'teacher logits {name} are missing or stale: run the logits stage')
    stacked.append(store.read_rows(name, manifest, ctx.examples[dataset].ids))
  return np.stack(stacked, axis=1)


def teacher_inputs(ctx: Context, dataset, teachers):
  """A callable giving fit()'s teacher arguments: the chosen teachers' stored logits, or with
  --online_teachers the frozen models run inside the train step. Deferred: finished runs load nothing."""
  def load():
    if not ctx.cfg.online_teachers:
      return {'teacher_logits': teacher_logits(ctx, dataset, teachers)}
    dirs = ctx.teacher_dirs()
    loaded = [saved_model.load(dirs[i])[:2] for i in teachers]
    return {'teacher_models': tuple(m for m, _ in loaded), 'teacher_params': tuple(p for _, p in loaded)}
  return load


def best_teacher(ctx: Context):
  """Index of the teacher with the best dev score (the kd_single teacher; teacher_0 without dev)."""
  scores = [train.read_summary(d)['best_score'] for d in _trained_teachers(ctx)]
  return 0 if None in scores else int(np.argmax(scores))


def student_learning_rate(cfg, arch):
  return cfg.bilstm_learning_rate if arch == 'bilstm' else cfg.student_learning_rate


def _student_run(ctx, arch, method, *, stage1=False):
  """Trains one student run: a method, or TMKD stage 1 of `arch`."""
  cfg = ctx.cfg
  run = distill.STAGE1 if stage1 else method
  indices = distill.teacher_indices(method, cfg.num_teachers, best_teacher(ctx) if method == 'kd_single' else 0)
  settings = {**distill.student_settings(cfg, arch, run),
              'teachers': [teacher_fingerprint(ctx.teacher_dirs()[i]) for i in indices]}
  heads = distill.num_heads(method, cfg.num_teachers)
  init_from = ctx.student_dir(arch, distill.STAGE1) if distill.METHODS[method].pretrain and not stage1 else None
  if init_from is not None and not train.is_complete(init_from):
    raise UserError(f'{method} needs TMKD stage 1 ({init_from}): run the pretrain stage first')

  def build():
    model, params = factory.student(arch, cfg.student_checkpoint, ctx.task.num_classes, heads, cfg.student_seed,
                                    model_options(cfg), combine=cfg.head_combine)
    if init_from is not None:
      params = train.load_final(init_from)[0]
    return model, params

  dataset = 'unlabelled' if stage1 else 'train'
  epochs = cfg.pretrain_epochs if stage1 else cfg.student_epochs
  fit_model(ctx, ctx.student_dir(arch, run), build, ctx.encoded[dataset], settings,
            train_config(cfg, ctx.buckets, epochs=epochs, learning_rate=student_learning_rate(cfg, arch),
                         seed=cfg.student_seed),
            distill.loss_config(method, cfg), select_on_dev=not stage1,
            teachers=teacher_inputs(ctx, dataset, indices) if indices else None)


def stage_pretrain(ctx: Context):
  """TMKD stage 1: every teacher's soft labels on unlabelled pairs, one head per teacher."""
  for method in ctx.cfg.methods:
    if distill.METHODS[method].pretrain:
      for arch in ctx.cfg.students:
        _student_run(ctx, arch, method, stage1=True)


def stage_distill(ctx: Context):
  """Stage 2: every method x student architecture, the same budget and seed."""
  for arch in ctx.cfg.students:
    for method in ctx.cfg.methods:
      _student_run(ctx, arch, method)


# ---------------------------------------------------------------------------------------------
# Evaluation and report.

def predict(ctx, model, params, dataset):
  return train.predict(model, params, ctx.encoded[dataset], mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size,
                       buckets=ctx.buckets)


def examples_per_sec(ctx, runs):
  """Inference examples/s of running every (model, params) of `runs` on the first --speed_rows eval rows:
  one warm-up pass, then the median of --speed_repeats timed passes."""
  rows = ctx.encoded['eval'].select(np.arange(min(ctx.cfg.speed_rows, len(ctx.encoded['eval']))))

  def one_pass():
    for model, params in runs:
      train.predict(model, params, rows, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size, buckets=ctx.buckets)

  one_pass()
  times = []
  for _ in range(ctx.cfg.speed_repeats):
    t0 = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - t0)
  return len(rows) / statistics.median(times)


def threshold_of(ctx, dev_probs):
  """The F1-best threshold on dev (binary tasks with a dev split), else None."""
  labels = ctx.examples['dev'].labels if 'dev' in ctx.examples else None
  if dev_probs is None or ctx.task.num_classes != 2 or not (labels == 1).any():
    return None
  return metrics_lib.best_f1_threshold(labels, dev_probs[:, 1])


def scores(ctx, probs, threshold):
  eval_examples = ctx.examples['eval']
  return metrics_lib.compute(ctx.metrics, eval_examples.labels, probs, eval_examples.groups, threshold=threshold)


def stage_evaluate(ctx: Context):
  """Metrics on the eval split (and at a dev-tuned threshold) and the measured speed of every model."""
  cfg = ctx.cfg
  out_dir = ctx.workdir / 'eval'
  out_dir.mkdir(parents=True, exist_ok=True)
  dirs = _trained_teachers(ctx)
  eval_logits = teacher_logits(ctx, 'eval')
  dev_logits = teacher_logits(ctx, 'dev') if 'dev' in ctx.encoded else None
  loaded = [saved_model.load(d)[:2] for d in dirs]
  rows = []
  for i, (directory, (model, params)) in enumerate(zip(dirs, loaded)):
    threshold = threshold_of(ctx, None if dev_logits is None else train.softmax(dev_logits[:, i]))
    saved_model.update_spec(directory, threshold=threshold)
    rows.append({'name': directory.name, 'method': 'teacher', 'student': None,
                 'checkpoint': distill.per_teacher(cfg.teacher_checkpoints, i), 'params': count_params(params),
                 'examples_per_sec': examples_per_sec(ctx, [(model, params)]), 'threshold': threshold,
                 'metrics': scores(ctx, train.softmax(eval_logits[:, i]), threshold)})
  ensemble = lambda logits: np.mean([train.softmax(logits[:, i]) for i in range(len(dirs))], 0)
  threshold = threshold_of(ctx, None if dev_logits is None else ensemble(dev_logits))
  rows.append({'name': 'teacher_ensemble', 'method': 'teacher_ensemble', 'student': None,
               'params': sum(r['params'] for r in rows), 'examples_per_sec': examples_per_sec(ctx, loaded),
               'threshold': threshold, 'metrics': scores(ctx, ensemble(eval_logits), threshold)})
  for arch in cfg.students:
    for method in cfg.methods:
      directory = ctx.student_dir(arch, method)
      model, params, _ = saved_model.load(directory)
      dev = predict(ctx, model, params, 'dev') if 'dev' in ctx.encoded else None
      threshold = threshold_of(ctx, None if dev is None else train.softmax(dev['logits']))
      saved_model.update_spec(directory, threshold=threshold)
      result = train.evaluate(model, params, ctx.encoded['eval'], ctx.metrics, mesh=ctx.mesh,
                              batch_size=cfg.eval_batch_size, buckets=ctx.buckets, threshold=threshold)
      rows.append({'name': f'{arch}_{method}', 'method': method, 'student': arch, 'params': count_params(params),
                   'examples_per_sec': examples_per_sec(ctx, [(model, params)]), 'threshold': threshold,
                   'combine_weights': np.asarray(combination_weights(model, params)).tolist(),
                   'metrics': {k: v for k, v in result.items() if '/' not in k},
                   'head_metrics': {k: v for k, v in result.items() if '/' in k}})
  (out_dir / 'rows.json').write_text(json.dumps({'provenance': provenance.record(), 'rows': rows}, indent=1))


def stage_report(ctx: Context):
  path = ctx.workdir / 'eval' / 'rows.json'
  if not path.exists():
    raise UserError(f'{path} is missing: run the evaluate stage first')
  evaluated = json.loads(path.read_text())
  results = {'task': ctx.cfg.task, 'split': ctx.cfg.eval_split, 'primary_metric': ctx.primary,
             'provenance': evaluated['provenance'], 'config': dataclasses.asdict(ctx.cfg),
             'speed': {'rows': min(ctx.cfg.speed_rows, len(ctx.encoded['eval'])),
                       'batch_size': ctx.cfg.eval_batch_size, 'buckets': list(ctx.buckets),
                       'timing': f'median of {ctx.cfg.speed_repeats} passes after a warm-up pass'},
             'rows': evaluated['rows']}
  (ctx.workdir / 'results.json').write_text(json.dumps(results, indent=1))
  (ctx.workdir / 'results.md').write_text(results_markdown(results))
  return results


def results_markdown(results):
  rows = results['rows']
  names = list(rows[0]['metrics'])
  teacher_speed = max(r['examples_per_sec'] for r in rows if r['method'] == 'teacher')
  p, s = results['provenance'], results['speed']
  lines = [f"Task `{results['task']}`, split `{results['split']}`. {p['date']}, {p['cpu_model']} "
           f"({p['backend']}), commit {p['commit'][:12]}. ex/s: inference on {s['rows']} eval rows, batch "
           f"{s['batch_size']}, {s['timing']}; speedup against the fastest teacher.", '',
           '| model | method | student | params | ex/s | speedup vs teacher | ' + ' | '.join(names) + ' |',
           '|' + '---|' * (6 + len(names))]
  for r in rows:
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | {r['params'] / 1e6:.2f}M | "
                 f"{r['examples_per_sec']:.0f} | {r['examples_per_sec'] / teacher_speed:.1f}x | "
                 + ' | '.join(f"{r['metrics'][n]:.4f}" for n in names) + ' |')
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------

STAGE_FUNCTIONS = dict(teachers=stage_teachers, logits=stage_logits, pretrain=stage_pretrain,
                       distill=stage_distill, evaluate=stage_evaluate, report=stage_report)


def run(cfg: Config):
  """Runs the configured stages in order; returns results.json's content when the report stage ran.

  The caller holds the work-directory lock (see `mkdm_jax.workdir.WorkdirLock`).
  """
  validate(cfg)
  workdir = pathlib.Path(cfg.workdir).absolute()
  shared = pathlib.Path(cfg.shared_dir).absolute() if cfg.shared_dir else workdir
  workdir.mkdir(parents=True, exist_ok=True)
  train.enable_compilation_cache(cfg.compilation_cache_dir or shared / 'cache' / 'xla')
  task = data_lib.get_task(cfg.task)
  examples, encoded, tokenizer_dir = load_data(cfg, task, shared / 'cache' / 'tokens')
  metric_names, primary = task.metrics_for(examples['eval'])
  ctx = Context(cfg=cfg, workdir=workdir, shared=shared, task=task, buckets=buckets_of(cfg), examples=examples,
                encoded=encoded, tokenizer_dir=tokenizer_dir, mesh=train.make_mesh(cfg.fsdp),
                metrics=metric_names, primary=primary)
  check_saved_runs(ctx)
  history = workdir / 'history'
  history.mkdir(exist_ok=True)
  stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime())
  (history / f'{stamp}-config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
  results = None
  for stage in STAGES:
    if stage in cfg.stages:
      log.info('stage %s', stage)
      results = STAGE_FUNCTIONS[stage](ctx)
  return results
