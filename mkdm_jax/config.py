"""Every setting of a run: the typed `Config`, the one flagfile parser and validation (each setting checked here).

  cfg = config.config_from_flagfile('experiments/configs/quickstart.flags', workdir='runs/demo')
  config.validate(cfg)

`experiments/run.py` turns each field into an absl flag; notebooks, scripts and the study library read the same
flagfiles with `config_from_flagfile` (no absl).
"""
import dataclasses
import pathlib
import re
import typing
from typing import Any

import jax

from mkdm_jax import data as data_lib
from mkdm_jax import distill, losses
from mkdm_jax import teachers as teachers_lib
from mkdm_jax.errors import UserError
from mkdm_jax.models import factory, resolve_checkpoint

STAGES = ('teachers', 'logits', 'pretrain', 'distill', 'evaluate', 'report')


def _setting(default, help, choices=None):
  return dataclasses.field(default=default, metadata={'help': help, 'choices': choices})


@dataclasses.dataclass(frozen=True)
class Config:
  """Every setting of a pipeline run (experiments/run.py turns each field into a flag)."""
  workdir: str | None = _setting(None, 'Work directory (created; reruns resume in it).')
  shared_dir: str | None = _setting(None, 'Where teachers and the logit store live (default: workdir).')
  stage1_cache: str | None = _setting(None, 'Where finished first stages of two-stage methods are kept, keyed by '
                                      'everything they depend on, and copied from instead of trained again '
                                      '(default: <shared_dir>/stage1).')
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
  train_order_seed: int = _setting(-1, 'Shuffle the training questions (each kept whole) with this seed before '
                                   '--max_train_rows cuts them: the order of a corpus prepared with the same '
                                   '--order_seed (experiments/prepare.py), so N rows are that corpus\'s first '
                                   'questions; -1 = file order.')
  max_eval_rows: int = _setting(0, 'Use only the first N dev/eval rows (0 = all).')
  train_questions: str = _setting('all', "Training questions: 'all', or 'with_both' (only questions with at least "
                                  'one positive and one negative answer: the ones MAP/MRR evaluate; WikiQA: 8,651 of '
                                  '20,360 pairs).', ('all', 'with_both'))
  negatives_per_positive: int = _setting(0, 'Subsample training negatives to k per positive (0 = keep all).')
  unlabelled_extra: int = _setting(0, 'Extra synthetic question-passage pairs for TMKD stage 1.')
  extra_eval: tuple[str, ...] = _setting(
      (), 'Also evaluate every student on TASK:SPLIT[:MAX_ROWS] of a registered task (e.g. squad:dev:6000, an '
      "out-of-domain check; whole questions kept): metrics in each student row's extra_metrics.")
  unlabelled_splits: tuple[str, ...] = _setting((), "More TMKD stage-1 pairs: TASK:SPLIT of a registered task "
                                                "(e.g. qnli:dev, wikiqa:train), labels dropped, each pair once.")
  unlabelled_corpus: str = _setting('', 'A prepared corpus folder (experiments/prepare.py) streamed from disk as '
                                    'the TMKD stage-1 pairs, instead of the in-memory set of --unlabelled_extra / '
                                    '--unlabelled_splits: memory does not grow with the corpus.')
  data_seed: int = _setting(0, 'Seed of the negative subsample and the synthetic unlabelled pairs.')
  skip_bad_rows: bool = _setting(False, 'Skip malformed rows (counted) instead of failing.')
  max_length: int = _setting(128, 'Maximum tokens per pair (longest-first truncation).')
  buckets: tuple[int, ...] = _setting((32, 64, 128), 'Padded lengths for length bucketing.')
  tokenizer: str = _setting('minilm-l6', "Tokenizer (checkpoint name or folder) of 'random' models; every other "
                            "model reads its own checkpoint's tokenizer.")
  # Models.
  num_teachers: int = _setting(3, 'Number of teachers.')
  teacher_checkpoints: tuple[str, ...] = _setting(
      ('minilm-l6',), "Teacher per teacher (one value = all): a checkpoint name/folder (or 'random') to fine-tune; "
      "'biencoder:CHECKPOINT', the zero-shot cosine of its mean-pooled embeddings; or 'scores:FILE', imported "
      'per-row scores (see mkdm_jax/teachers/). Bi-encoder and scalar scores are calibrated on dev.')
  teacher_seeds: tuple[int, ...] = _setting((), 'Seed per teacher (default: 0, 1, 2, ...).')
  teacher_learning_rates: tuple[float, ...] = _setting((5e-5,), 'Learning rate per teacher (one value = all).')
  teacher_batch_sizes: tuple[int, ...] = _setting((), 'Batch size per teacher (one value = all; default '
                                                  '--batch_size), e.g. smaller for a large family.')
  students: tuple[str, ...] = _setting(('bert3', 'bilstm'), 'Student architectures: bert<k>, mpnet<k>, '
                                       'roberta<k> (k layers of --student_checkpoint, of that family) and/or bilstm.')
  student_checkpoint: tuple[str, ...] = _setting(
      ('minilm-l6',), "Checkpoint whose layers (bert<k>, mpnet<k>) or word embeddings (bilstm) initialise students, "
      "or 'random'; per family: DEFAULT,FAMILY=CHECKPOINT (e.g. minilm-l6,mpnet=mpnet-base).")
  random_bert: tuple[int, ...] = _setting((2, 64, 2, 128), "Shape of 'random' models: layers, hidden, heads, "
                                          'intermediate.')
  student_layers: tuple[int, ...] = _setting((), "Which --student_checkpoint layers (0-based) initialise a "
                                             "bert<k>/mpnet<k> student, k values (e.g. 0,4,8 for k=3: every fourth, "
                                             "as DistilBERT takes every other); default the bottom k.")
  bilstm_hidden: int = _setting(256, 'BiLSTM hidden size per direction.')
  head_combine: str = _setting('mean', "How a multi-head student combines its heads: 'mean', or 'learned' "
                               '(softmax weights fitted on dev after training; see distill.fit_combination_weights).',
                               ('mean', 'learned'))
  precision: str = _setting('fp32', 'Compute dtype (params stay fp32).', ('fp32', 'bf16'))
  allow_pickle: bool = _setting(False, 'Allow pickle checkpoints (they can execute code).')
  # Methods and losses.
  methods: tuple[str, ...] = _setting(distill.DEFAULT_METHODS, f'Student methods, a subset of {tuple(distill.METHODS)} '
                                      '(see mkdm_jax.distill.METHODS).')
  alpha: float = _setting(0.5, 'Weight of the soft-label term (1 - alpha on gold labels).')
  alpha_end: float | None = _setting(None, 'If set, alpha moves linearly to this value over each run.')
  temperature: float = _setting(2.0, 'Distillation temperature T.')
  temperature_end: float | None = _setting(None, 'If set, T moves linearly to this value over each run.')
  soft_loss: str = _setting('kl', 'Soft-label loss: T^2 KL, T^2 soft cross-entropy, or MSE of logits.',
                            losses.SOFT_LOSSES)
  teacher_weighting: str = _setting(
      'uniform', 'Per-teacher weights w_t (methods with several teachers: per head in mkdm/tmkd, inside the '
      'target in kd_ensemble): uniform, fixed (--teacher_weights), or confidence (per example, the '
      "teacher's max probability), or sample (CA-MKD: per labelled example, by each teacher's cross-entropy with the "
      'gold label; not with two-stage methods, whose first stage has no labels).', losses.TEACHER_WEIGHTINGS)
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
  pretrain_steps: int = _setting(0, 'TMKD stage-1 length in steps (batches) instead of --pretrain_epochs (0: use '
                                 'the epochs); the natural budget for a large streamed --unlabelled_corpus.')
  student_learning_rate: float = _setting(1e-4, 'BERT student learning rate.')
  bilstm_learning_rate: float = _setting(2e-3, 'BiLSTM student learning rate.')
  head_layers: int = _setting(
      0, "Per-teacher heads (mkdm, tmkd) of the transformer students' top k layers each, on a shared body of the "
      'rest (0: linear heads on one pooled vector).')
  freeze_word_embeddings: bool = _setting(
      False, "Students' word-embedding tables stay as loaded: no gradient, optimiser state or weight decay (most "
      "of a small student's parameters: bert3's stage-1 step is faster; its accuracy cost is in BENCHMARKS.md).")
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
    raise UserError(f'unknown setting(s) {unknown}; see the fields of mkdm_jax.config.Config')
  return Config(**{name: _convert(name, types[name], value) for name, value in values.items()})


def flag_values(lines, source) -> dict[str, str]:
  """{name: value string} of flag lines (`--name=value`, `--name` / `--noname` for booleans, blank lines and `#`
  comments skipped): the one reader of the flag language besides absl. UserError names `source`:line."""
  values = {}
  bools = {name for name, kind in config_types().items() if kind is bool}
  for lineno, line in enumerate(lines, 1):
    line = line.strip()
    if not line or line.startswith('#'):
      continue
    if not line.startswith('--'):
      raise UserError(f'{source}:{lineno}: expected --name=value, got {line!r}')
    name, eq, value = line[2:].partition('=')
    if not eq and name in bools:
      value = 'true'
    elif not eq and name.startswith('no') and name[2:] in bools:
      name, value = name[2:], 'false'
    values[name] = value
  return values


def config_from_flagfile(path, **overrides) -> Config:
  """A Config from an experiments/configs flagfile (see `flag_values`) with keyword overrides: what run.py would
  build, without absl (for notebooks and scripts)."""
  path = pathlib.Path(path)
  try:
    lines = path.read_text().splitlines()
  except OSError as e:
    raise UserError(f'{path}: cannot read flagfile: {e.strerror}') from None
  return config_from_strings({**flag_values(lines, path), **overrides})


# ---------------------------------------------------------------------------------------------
# Checks before any work.

def validate(cfg: Config):
  """Raises UserError naming the flag(s) of the first setting or combination without meaning."""
  known = [m for m in cfg.methods if m in distill.METHODS]
  distilling = distill.where(known, lambda m: m.distils)
  weighted = distill.where(known, lambda m: m.weighs_teachers)
  multi_head = distill.where(known, lambda m: m.heads == 'per_teacher')
  two_stage = distill.where(known, lambda m: m.pretrain)
  ensemble = distill.where(known, lambda m: m.target == 'ensemble')
  names = lambda predicate: ', '.join(name for name, m in distill.METHODS.items() if predicate(m))
  no_two_stage = f'and --methods has no two-stage method ({names(lambda m: m.pretrain)})'
  aux = [f'--{name}_weight' for name in losses.AUX_TERMS if getattr(cfg, f'{name}_weight') > 0]
  for spec in cfg.extra_eval:
    parse_extra_eval(spec)  # a UserError naming a malformed entry
  checks = [
      (cfg.workdir is not None, '--workdir is required'),
      *((getattr(cfg, f.name) in f.metadata['choices'],
         f'--{f.name}={getattr(cfg, f.name)}: choose from {f.metadata["choices"]}')
        for f in dataclasses.fields(Config) if f.metadata['choices']),
      (set(cfg.stages) <= set(STAGES), f'--stages: unknown stage in {cfg.stages}; choose from {STAGES}'),
      (len(known) == len(cfg.methods),
       f'--methods: unknown method in {cfg.methods}; choose from {tuple(distill.METHODS)}'),
      (cfg.num_teachers >= 1, f'--num_teachers={cfg.num_teachers} must be >= 1'),
      (cfg.max_train_rows >= 0 and cfg.max_eval_rows >= 0,
       f'--max_train_rows={cfg.max_train_rows}, --max_eval_rows={cfg.max_eval_rows}: must be >= 0 (0 = all rows)'),
      (cfg.train_order_seed >= -1, f'--train_order_seed={cfg.train_order_seed}: a seed >= 0, or -1 for file order'),
      (cfg.batch_size > 0 and cfg.batch_size % jax.device_count() == 0,
       f'--batch_size={cfg.batch_size} must be a positive multiple of the {jax.device_count()} devices'),
      (len(cfg.teacher_checkpoints) in (1, cfg.num_teachers),
       f'--teacher_checkpoints needs 1 or --num_teachers={cfg.num_teachers} values'),
      (len(cfg.teacher_learning_rates) in (1, cfg.num_teachers),
       f'--teacher_learning_rates needs 1 or --num_teachers={cfg.num_teachers} values'),
      (len(cfg.teacher_seeds) in (0, cfg.num_teachers),
       f'--teacher_seeds needs 0 or --num_teachers={cfg.num_teachers} values'),
      (all(re.fullmatch(factory.STUDENT_PATTERN, s) for s in cfg.students),
       f'--students: {cfg.students}; each must be bert<k>, mpnet<k>, roberta<k> (e.g. bert3) or bilstm'),
      (len(cfg.teacher_batch_sizes) in (0, 1, cfg.num_teachers) and all(b > 0 for b in cfg.teacher_batch_sizes),
       f'--teacher_batch_sizes needs 0, 1 or --num_teachers={cfg.num_teachers} positive values'),
      (len(cfg.random_bert) == 4, '--random_bert needs 4 values: layers, hidden, heads, intermediate'),
      (cfg.accumulate >= 1, '--accumulate must be >= 1'),
      (len(cfg.profile_steps) in (0, 2), '--profile_steps needs two steps: FIRST,LAST'),
      (cfg.fsdp >= 1 and jax.device_count() % cfg.fsdp == 0,
       f'--fsdp={cfg.fsdp} must divide the {jax.device_count()} devices'),
      (cfg.speed_repeats >= 1, f'--speed_repeats={cfg.speed_repeats} must be >= 1'),
      (cfg.pretrain_steps >= 0, f'--pretrain_steps={cfg.pretrain_steps} must be >= 0'),
      (not cfg.pretrain_steps or two_stage, f'--pretrain_steps={cfg.pretrain_steps} sets a first stage, {no_two_stage}'),
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
       f'--teacher_weighting={cfg.teacher_weighting} applies to methods with several teachers '
       f'({names(lambda m: m.weighs_teachers)}); --methods={",".join(cfg.methods)} has none'),
      (cfg.head_layers >= 0, f'--head_layers={cfg.head_layers} must be >= 0'),
      (not cfg.head_layers or distill.where(known, lambda m: m.heads == 'per_teacher'),
       f'--head_layers={cfg.head_layers} gives per-teacher heads layers, and --methods has no method with them '
       f"({names(lambda m: m.heads == 'per_teacher')})"),
      (not cfg.head_layers or 'bilstm' not in cfg.students,
       f'--head_layers={cfg.head_layers} applies to transformer students; drop bilstm from --students'),
      (not cfg.head_layers or not aux,
       f'--head_layers with {", ".join(aux)}: the intermediate-layer terms match whole layer stacks, and layer '
       'heads split the top ones'),
      (cfg.teacher_weighting != 'sample' or not two_stage,
       f'--teacher_weighting=sample weighs teachers by the gold label, which first-stage pairs lack: drop '
       f'{", ".join(two_stage)} from --methods or choose another weighting'),
      # The averaged ensemble target.
      (cfg.ensemble_target == 'probs' or ensemble,
       f'--ensemble_target={cfg.ensemble_target} applies to ensemble-target methods '
       f'({names(lambda m: m.target == "ensemble")}), which --methods does not include'),
      (not (cfg.soft_loss == 'mse' and ensemble and cfg.ensemble_target == 'probs'),
       '--soft_loss=mse compares raw logits, and a mean of probabilities has none: use '
       f'--ensemble_target=logits for {", ".join(ensemble)} with --soft_loss=mse'),
      (not cfg.unlabelled_splits or two_stage,
       f'--unlabelled_splits={",".join(cfg.unlabelled_splits)} adds first-stage pairs, {no_two_stage}'),
      (not cfg.unlabelled_corpus or two_stage,
       f'--unlabelled_corpus={cfg.unlabelled_corpus} holds first-stage pairs, {no_two_stage}'),
      (not cfg.unlabelled_corpus or not (cfg.unlabelled_extra or cfg.unlabelled_splits),
       '--unlabelled_corpus replaces the in-memory stage-1 set: drop --unlabelled_extra and --unlabelled_splits '
       '(prepare those pairs into the corpus instead)'),
      # Head combination.
      (cfg.head_combine == 'mean' or (multi_head and cfg.num_teachers > 1),
       '--head_combine=learned needs a student with several heads: --methods with '
       f'{" or ".join(name for name, m in distill.METHODS.items() if m.heads == "per_teacher")} and --num_teachers > 1'),
      (cfg.head_combine == 'mean' or cfg.dev_split != 'none',
       '--head_combine=learned fits the head weights on the dev split: it needs a --dev_split'),
      # Intermediate-layer terms.
      (not aux or cfg.online_teachers,
       f'{"/".join(aux)} need --online_teachers (teacher hidden states are not stored)'),
      (not aux or 'bilstm' not in cfg.students,
       f'{"/".join(aux)} apply to transformer students only, not bilstm'),
      (not aux or distilling, f'{"/".join(aux)} need a method with teachers in --methods'),
      (not cfg.online_teachers or distilling, '--online_teachers needs a method with teachers in --methods'),
  ]
  for ok, message in checks:
    if not ok:
      raise UserError(message)
  for method in distilling or known[:1]:
    try:  # alpha, T and the loss settings are checked where they are defined: the LossConfig
      distill.loss_config(method, cfg)
    except ValueError as e:
      raise UserError(f'--{e}') from None
  teachers = teachers_lib.build(cfg, pathlib.Path(cfg.shared_dir or cfg.workdir), model_options(cfg),
                                lambda source: tokenizer_dir_of(cfg, source))
  _check_teachers(cfg, teachers)
  options = model_options(cfg)
  for arch in cfg.students:
    factory.check_student(arch, distill.student_checkpoint(cfg.student_checkpoint, arch), options,
                          None if arch == 'bilstm' else tuple(cfg.student_layers) or None)
  if aux:
    _check_intermediate_shapes(cfg, teachers)


def _check_teachers(cfg, teachers):
  """What the run asks of its teachers: two-class calibrated scores need a two-class task and a dev split; a
  prepared corpus needs teachers that score it; online teachers run in the step and read the student's token ids."""
  calibrated = [t.spec for t in teachers if t.calibrated]
  if calibrated and data_lib.get_task(cfg.task).num_classes != 2:
    raise UserError(f'--teacher_checkpoints: {calibrated[0]} gives two-class scores; task {cfg.task} has more '
                    'classes')
  if calibrated and cfg.dev_split == 'none':
    raise UserError(f'--teacher_checkpoints: {calibrated[0]} is calibrated on the dev split: give a --dev_split')
  if cfg.unlabelled_corpus and not all(t.scores_corpus for t in teachers):
    raise UserError(f'--unlabelled_corpus is scored by the teachers, and {", ".join(t.spec for t in teachers if not t.scores_corpus)} '
                    'cannot label a prepared corpus (fine-tuned checkpoint teachers and scores files that hold the '
                    "corpus's rows can)")
  if cfg.online_teachers:
    offline = [t.spec for t in teachers if not t.runs_online]
    if offline:
      raise UserError(f'--online_teachers runs teacher models inside the train step; {", ".join(offline)} '
                      'cannot run there: drop --online_teachers (their logits come from the store)')
    tokenizers = {str(t.tokenizer_dir) for t in teachers}
    tokenizers |= {str(tokenizer_dir_of(cfg, distill.student_checkpoint(cfg.student_checkpoint, arch)))
                   for arch in cfg.students}
    if len(tokenizers) > 1:
      raise UserError('--online_teachers: teachers and students read different tokenizers '
                      f'({", ".join(sorted(tokenizers))}) but the step feeds every model the student\'s token ids; '
                      'use stored logits (drop --online_teachers) for mixed families')
  for t in teachers:
    t.check()


def _check_intermediate_shapes(cfg, teacher_objects):
  """Hidden-state terms need teachers of one width; attention terms equal head counts everywhere."""
  options = model_options(cfg)
  teachers = [factory.encoder_config(t.source, options) for t in teacher_objects]
  students = {factory.encoder_config(distill.student_checkpoint(cfg.student_checkpoint, arch), options)
              .num_attention_heads for arch in cfg.students}
  if cfg.hidden_weight > 0 and len({t.hidden_size for t in teachers}) > 1:
    raise UserError(f'--hidden_weight: the teachers differ in width ({[t.hidden_size for t in teachers]}); '
                    'the hidden-state term shares one projection, so it needs teachers of one width')
  heads = {t.num_attention_heads for t in teachers}
  if cfg.attention_weight > 0 and len(heads | students) > 1:
    raise UserError(f'--attention_weight: teachers have {sorted(heads)} attention heads and the students '
                    f'{sorted(students)}; attention maps are compared head by head, so the counts must be equal')


def model_options(cfg: Config) -> factory.ModelOptions:
  return factory.ModelOptions(dtype='bfloat16' if cfg.precision == 'bf16' else 'float32',
                              random_shape=tuple(cfg.random_bert), max_length=cfg.max_length,
                              bilstm_hidden=cfg.bilstm_hidden, allow_pickle=cfg.allow_pickle)


def parse_extra_eval(spec: str) -> tuple[str, str, int]:
  """(task, split, max rows; 0 = all) of an --extra_eval entry TASK:SPLIT[:MAX_ROWS]; UserError naming it."""
  parts = spec.split(':')
  named = sorted(t for t in data_lib.TASKS if t not in ('tsv', 'jsonl'))
  if len(parts) not in (2, 3) or parts[0] not in named or (len(parts) == 3 and not parts[2].isdigit()):
    raise UserError(f'--extra_eval: {spec!r}: expected TASK:SPLIT[:MAX_ROWS] with a registered task '
                    f'({", ".join(named)}), e.g. squad:dev:6000')
  return parts[0], parts[1], int(parts[2]) if len(parts) == 3 else 0


def buckets_of(cfg: Config) -> tuple[int, ...]:
  """Sorted buckets, capped at and ending with max_length."""
  return data_lib.batching.bucket_sizes(cfg.max_length, cfg.buckets)


def tokenizer_dir_of(cfg: Config, checkpoint: str) -> pathlib.Path:
  """Every model reads its own checkpoint's tokenizer; 'random' models read --tokenizer's."""
  return resolve_checkpoint(cfg.tokenizer if checkpoint == 'random' else checkpoint)


def flag_lines(cfg: Config) -> list[str]:
  """`cfg` as flagfile lines (`--name=value`, one per setting that differs from its default) that
  `config_from_flagfile` and run.py read back into an equal Config."""
  lines = []
  for field in dataclasses.fields(Config):
    value = getattr(cfg, field.name)
    if value == field.default:
      continue
    if isinstance(value, tuple):
      value = ','.join(map(str, value))
    lines.append(f'--{field.name}={"" if value is None else value}')
  return lines
