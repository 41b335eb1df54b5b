"""Distillation methods as data, their loss settings, and which settings invalidate which saved run.

A method is a row of `METHODS`; the pipeline interprets the rows, and every list of methods (which runs a
setting applies to, which checks a flag needs) derives from the rows' fields. The loss terms live in
`mkdm_jax.losses` (the soft and gold terms, and the registry `AUX_TERMS`); this module maps a
method and the run's settings to the `LossConfig` of the one train step.

`SETTINGS` declares, for every setting of `mkdm_jax.config.Config`, what it changes:
  'data'       the rows and their encoding: every teacher and student
  'training'   optimisation shared by teachers and students
  'teachers'   teacher fine-tuning (and so, through the teachers, every distilled student)
  'students'   students only (restricted to the methods / architectures it applies to)
  'evaluation' only the evaluate and report stages, which rerun every time
  'run'        nothing that is saved (bookkeeping, which stages or variants to run)
A saved run records the settings it depends on; a rerun with other values stops before any work
(or, with --overwrite, deletes and retrains exactly the stale runs). `experiments/ablate.py`
derives which swept settings can share teachers from the same table.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkdm_jax import losses
from mkdm_jax.errors import UserError
from mkdm_jax.losses import LossConfig


@dataclasses.dataclass(frozen=True)
class Method:
  """One distillation method, interpreted by the pipeline; every list and check of methods derives from these fields.

  teachers: 'none', 'best_dev' (the teacher with the best dev score) or 'all';
  target: 'none' (gold only), 'per_head' (teacher t -> head t) or 'ensemble' (one averaged target);
  heads: 'one' or 'per_teacher'; pretrain: a first stage on unlabelled pairs with the same teachers, target and
  heads (soft labels only; run `<method>_stage1`), then the method on the labelled rows from its weights;
  default: run when --methods is not given."""
  teachers: str
  target: str
  heads: str
  pretrain: bool = False
  default: bool = True
  doc: str = ''

  @property
  def distils(self) -> bool:
    return self.teachers != 'none'

  @property
  def weighs_teachers(self) -> bool:
    """Several teachers meet (one per head, or inside the ensemble target): --teacher_weighting applies."""
    return self.teachers == 'all'


METHODS = {
    'student_scratch': Method('none', 'none', 'one', doc='gold labels only, no teacher'),
    'kd_single': Method('best_dev', 'per_head', 'one', doc='the teacher with the best dev score'),
    'kd_ensemble': Method('all', 'ensemble', 'one', doc='one head learns the averaged ensemble target'),
    'mkdm': Method('all', 'per_head', 'per_teacher', doc='head t learns teacher t'),
    'tmkd': Method('all', 'per_head', 'per_teacher', pretrain=True, doc='stage 1 on unlabelled pairs, then mkdm'),
    'tkd': Method('best_dev', 'per_head', 'one', pretrain=True, default=False,
                  doc="TMKD's single-teacher control: stage 1 and kd_single with the best dev teacher"),
    'tkd_ensemble': Method('all', 'ensemble', 'one', pretrain=True, default=False,
                           doc='both stages on the averaged ensemble target'),
}
DEFAULT_METHODS = tuple(name for name, m in METHODS.items() if m.default)
STAGE1_SUFFIX = '_stage1'


def stage1_run(method: str) -> str:
  """The run name of a two-stage method's first stage (one per student architecture)."""
  return method + STAGE1_SUFFIX


def method_of(run: str) -> Method:
  """The Method of a run name: a method, or a method's first stage."""
  return METHODS[run.removesuffix(STAGE1_SUFFIX)]


def runs_of(methods) -> list[str]:
  """Every training run of `methods` in order: each two-stage method's first stage, then the method."""
  return [run for m in methods for run in ([stage1_run(m)] if METHODS[m].pretrain else []) + [m]]


def where(methods, predicate) -> list[str]:
  """The names among `methods` whose Method satisfies `predicate`."""
  return [m for m in methods if m in METHODS and predicate(METHODS[m])]


def num_heads(method: str, num_teachers: int) -> int:
  return num_teachers if method_of(method).heads == 'per_teacher' else 1


def teacher_indices(method: str, num_teachers: int, best: int) -> list[int]:
  """The teachers a method (or its first stage) learns from (`best`: the teacher with the best dev score): the
  target function of the method table."""
  kind = method_of(method).teachers
  return {'none': [], 'best_dev': [best], 'all': list(range(num_teachers))}[kind]


def loss_config(method: str, cfg) -> LossConfig:
  """The LossConfig of one method (or its first stage) under the run's settings `cfg`."""
  m = method_of(method)
  return LossConfig(
      teacher_mode=m.target, soft=cfg.soft_loss, alpha=cfg.alpha, alpha_end=cfg.alpha_end,
      temperature=cfg.temperature, temperature_end=cfg.temperature_end,
      weighting=cfg.teacher_weighting if m.weighs_teachers else 'uniform',
      fixed_weights=tuple(cfg.teacher_weights) if m.weighs_teachers and cfg.teacher_weighting == 'fixed' else None,
      ensemble_target=cfg.ensemble_target,
      aux_weights=() if not m.distils else tuple(
          (name, getattr(cfg, f'{name}_weight')) for name in losses.AUX_TERMS
          if getattr(cfg, f'{name}_weight') > 0))


def fit_combination_weights(head_logits, labels, steps=300, learning_rate=0.1):
  """Head-combination weights fitted on labelled (dev) rows: softmax(c) minimising the cross-entropy
  of the combined logits sum_h softmax(c)_h * s_h. Returns the logits c [H] (the Classifier's
  'combine_weights' parameter). Adam from uniform (c = 0); H parameters, so a few hundred full-batch
  steps converge (hand-written: a 1-parameter-vector fit needs no training loop)."""
  keep = np.asarray(labels) >= 0
  s = jnp.asarray(np.asarray(head_logits)[keep], jnp.float32)
  y = jnp.asarray(np.asarray(labels)[keep])

  def loss(c):
    combined = jnp.einsum('h,bhc->bc', jax.nn.softmax(c), s)
    return optax.softmax_cross_entropy_with_integer_labels(combined, y).mean()

  optimizer = optax.adam(learning_rate)

  @jax.jit
  def fit(c):
    def step(carry, _):
      c, state = carry
      grads = jax.grad(loss)(c)
      updates, state = optimizer.update(grads, state)
      return (optax.apply_updates(c, updates), state), None
    (c, _), _ = jax.lax.scan(step, (c, optimizer.init(c)), None, length=steps)
    return c

  return np.asarray(fit(jnp.zeros(s.shape[1], jnp.float32)))


# ---------------------------------------------------------------------------------------------
# What each setting changes.

@dataclasses.dataclass(frozen=True)
class Setting:
  scope: str
  runs: Callable[[Method, bool], bool] | None = None  # students: (method, is_stage1) -> applies (None: all runs)
  archs: str | None = None  # students: 'bert' or 'bilstm' only
  per_teacher: bool = False  # teachers: a list with one value per teacher (or one for all)
  per_student: bool = False  # students: DEFAULT,FAMILY=VALUE entries resolved per architecture


SCOPES = ('data', 'training', 'teachers', 'students', 'evaluation', 'run')
_DATA, _TRAINING, _RUN, _EVAL = Setting('data'), Setting('training'), Setting('run'), Setting('evaluation')
_DISTILS = Setting('students', runs=lambda m, stage1: m.distils)
_WEIGHTED = Setting('students', runs=lambda m, stage1: m.weighs_teachers)
_TWO_STAGE = Setting('students', runs=lambda m, stage1: m.pretrain)

SETTINGS = {
    # Data and encoding.
    **dict.fromkeys(('task', 'data_dir', 'train_split', 'dev_split', 'text_a_col', 'text_b_col', 'label_col',
                     'group_col', 'max_train_rows', 'train_order_seed', 'max_eval_rows', 'train_questions', 'negatives_per_positive', 'data_seed',
                     'skip_bad_rows', 'max_length', 'buckets', 'tokenizer'), _DATA),
    # Optimisation of every training run.
    **dict.fromkeys(('batch_size', 'warmup_ratio', 'lr_decay', 'weight_decay', 'layer_decay', 'accumulate',
                     'eval_every', 'precision', 'random_bert'), _TRAINING),
    # Teachers.
    'teacher_checkpoints': Setting('teachers', per_teacher=True),
    'teacher_seeds': Setting('teachers', per_teacher=True),
    'teacher_learning_rates': Setting('teachers', per_teacher=True),
    'teacher_batch_sizes': Setting('teachers', per_teacher=True),
    'teacher_epochs': Setting('teachers'),
    # Students.
    'student_checkpoint': Setting('students', per_student=True),
    'student_layers': Setting('students', archs='bert'),
    'student_seed': Setting('students'),
    'student_epochs': Setting('students', runs=lambda m, stage1: not stage1),
    'student_learning_rate': Setting('students', archs='bert'),
    'bilstm_learning_rate': Setting('students', archs='bilstm'),
    'bilstm_hidden': Setting('students', archs='bilstm'),
    'freeze_word_embeddings': Setting('students'),
    'head_layers': Setting('students', runs=lambda m, stage1: m.heads == 'per_teacher'),
    'num_teachers': _DISTILS,
    # A first stage saves the combination parameter too.
    'head_combine': Setting('students', runs=lambda m, stage1: m.heads == 'per_teacher'),
    **dict.fromkeys(('alpha', 'alpha_end', 'temperature', 'temperature_end', 'soft_loss', 'online_teachers',
                     *(f'{name}_weight' for name in losses.AUX_TERMS)), _DISTILS),
    'teacher_weighting': _WEIGHTED,
    'teacher_weights': _WEIGHTED,
    'ensemble_target': Setting('students', runs=lambda m, stage1: m.target == 'ensemble'),
    **dict.fromkeys(('unlabelled_extra', 'unlabelled_splits', 'unlabelled_corpus', 'pretrain_epochs',
                     'pretrain_steps'), _TWO_STAGE),
    # Evaluation only.
    **dict.fromkeys(('eval_split', 'eval_batch_size', 'speed_rows', 'speed_repeats', 'extra_eval'), _EVAL),
    # Bookkeeping.
    **dict.fromkeys(('workdir', 'shared_dir', 'stage1_cache', 'stages', 'methods', 'students', 'checkpoint_every', 'progress',
                     'profile_steps', 'compilation_cache_dir', 'fsdp', 'distributed', 'overwrite',
                     'allow_pickle'), _RUN),
}


def changes_teachers(name: str) -> bool:
  """Whether a setting changes trained teachers (and so cannot share them across variants); flags that
  are not pipeline settings (e.g. run.py's --malloc) change nothing saved."""
  return name in SETTINGS and SETTINGS[name].scope in ('data', 'training', 'teachers')


def teacher_settings(cfg, index: int) -> dict:
  """The settings teacher `index` depends on (per-teacher lists resolved to its own value)."""
  out = {}
  for name, setting in SETTINGS.items():
    if setting.scope not in ('data', 'training', 'teachers'):
      continue
    value = getattr(cfg, name)
    if setting.per_teacher:
      value = per_teacher(value, index, default=index if name == 'teacher_seeds' else None)
    out[name] = value
  return _plain(out)


def student_settings(cfg, arch: str, run: str) -> dict:
  """The settings a student run (a method, or a method's first stage) depends on, teachers aside."""
  family = 'bilstm' if arch == 'bilstm' else 'bert'
  method, stage1 = method_of(run), run.endswith(STAGE1_SUFFIX)
  out = {'arch': arch, 'method': run}
  for name, setting in SETTINGS.items():
    if setting.scope in ('data', 'training') or (
        setting.scope == 'students' and (setting.runs is None or setting.runs(method, stage1))
        and setting.archs in (None, family)):
      value = getattr(cfg, name)
      out[name] = student_checkpoint(value, arch) if setting.per_student else value
  return _plain(out)


def per_teacher(values, index, default=None):
  """Teacher `index`'s value of a per-teacher list: one value for all, one per teacher, or none."""
  if not values:
    return default
  return values[index % len(values)] if len(values) == 1 else values[index]


def student_checkpoint(values, arch: str) -> str:
  """The checkpoint of a student architecture from 'DEFAULT,FAMILY=CHECKPOINT' entries (family: the
  architecture without its layer count, e.g. 'mpnet' for mpnet3)."""
  family = arch.rstrip('0123456789')
  defaults = [v for v in values if '=' not in v]
  by_family = dict(v.split('=', 1) for v in values if '=' in v)
  if family in by_family:
    return by_family[family]
  if not defaults:
    raise UserError(f'--student_checkpoint={",".join(values)} names no checkpoint for {arch}: add a default '
                    f'or {family}=CHECKPOINT')
  return defaults[0]


def changed_settings(recorded: dict, current: dict) -> list[str]:
  """'name: old -> new' for every setting that differs."""
  names = sorted(set(recorded) | set(current))
  return [f'{n}: {recorded.get(n, "(unset)")!r} -> {current.get(n, "(unset)")!r}'
          for n in names if recorded.get(n) != current.get(n)]


def _plain(settings: dict) -> dict:
  """JSON-shaped values (tuples as lists), so recorded and current settings compare equal."""
  return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}
