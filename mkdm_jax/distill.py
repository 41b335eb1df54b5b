"""Distillation methods as data, their loss settings, and which settings invalidate which saved run.

A method is a row of `METHODS`; the pipeline interprets the rows. The loss terms live in
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

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkdm_jax import losses
from mkdm_jax.errors import UserError
from mkdm_jax.losses import LossConfig


@dataclasses.dataclass(frozen=True)
class Method:
  """teachers: 'none', 'best_dev' (the teacher with the best dev score) or 'all';
  target: 'none' (gold only), 'per_head' (teacher t -> head t) or 'ensemble' (one averaged target);
  heads: 'one' or 'per_teacher'; pretrain: TMKD stage 1 (soft labels on unlabelled pairs) first."""
  teachers: str
  target: str
  heads: str
  pretrain: bool = False
  doc: str = ''


METHODS = {
    'student_scratch': Method('none', 'none', 'one', doc='gold labels only, no teacher'),
    'kd_single': Method('best_dev', 'per_head', 'one', doc='the teacher with the best dev score'),
    'kd_ensemble': Method('all', 'ensemble', 'one', doc='one head learns the averaged ensemble target'),
    'mkdm': Method('all', 'per_head', 'per_teacher', doc='head t learns teacher t'),
    'tmkd': Method('all', 'per_head', 'per_teacher', pretrain=True,
                   doc='TMKD stage 1 on unlabelled pairs, then mkdm'),
}
STAGE1 = 'tmkd_stage1'  # the run name of TMKD stage 1 (one per student architecture)


def num_heads(method: str, num_teachers: int) -> int:
  return num_teachers if METHODS[method].heads == 'per_teacher' else 1


def teacher_indices(method: str, num_teachers: int, best: int) -> list[int]:
  """The teachers a method learns from (`best`: the teacher with the best dev score)."""
  kind = METHODS[method].teachers
  return {'none': [], 'best_dev': [best], 'all': list(range(num_teachers))}[kind]


def uses_teacher_weights(method: str) -> bool:
  """Whether --teacher_weighting means something for a method: several teachers, one per head or
  inside the ensemble target."""
  return METHODS[method].teachers == 'all'


def loss_config(method: str, cfg, *, stage1=False) -> LossConfig:
  """The LossConfig of one method (or of TMKD stage 1) under the run's settings `cfg`."""
  m = METHODS[method]
  mode = 'none' if m.target == 'none' else m.target
  weighted = uses_teacher_weights(method)
  return LossConfig(
      teacher_mode=mode, soft=cfg.soft_loss, alpha=cfg.alpha, alpha_end=cfg.alpha_end,
      temperature=cfg.temperature, temperature_end=cfg.temperature_end,
      weighting=cfg.teacher_weighting if weighted else 'uniform',
      fixed_weights=tuple(cfg.teacher_weights) if weighted and cfg.teacher_weighting == 'fixed' else None,
      ensemble_target=cfg.ensemble_target,
      aux_weights=() if mode == 'none' else tuple(
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
  methods: tuple[str, ...] | None = None  # students: the runs it applies to (None: all)
  archs: str | None = None  # students: 'bert' or 'bilstm' only
  per_teacher: bool = False  # teachers: a list with one value per teacher (or one for all)
  per_student: bool = False  # students: DEFAULT,FAMILY=VALUE entries resolved per architecture


SCOPES = ('data', 'training', 'teachers', 'students', 'evaluation', 'run')
_KD = ('kd_single', 'kd_ensemble', 'mkdm', 'tmkd', STAGE1)
_WEIGHTED = ('kd_ensemble', 'mkdm', 'tmkd', STAGE1)
_TMKD = ('tmkd', STAGE1)
_DATA, _TRAINING, _RUN, _EVAL = Setting('data'), Setting('training'), Setting('run'), Setting('evaluation')

SETTINGS = {
    # Data and encoding.
    **dict.fromkeys(('task', 'data_dir', 'train_split', 'dev_split', 'text_a_col', 'text_b_col', 'label_col',
                     'group_col', 'max_train_rows', 'max_eval_rows', 'train_questions', 'negatives_per_positive', 'data_seed',
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
    'student_epochs': Setting('students', methods=tuple(METHODS)),
    'student_learning_rate': Setting('students', archs='bert'),
    'bilstm_learning_rate': Setting('students', archs='bilstm'),
    'bilstm_hidden': Setting('students', archs='bilstm'),
    'num_teachers': Setting('students', methods=_KD),
    'head_combine': Setting('students', methods=('mkdm', 'tmkd', STAGE1)),  # stage 1 saves the combine param
    **dict.fromkeys(('alpha', 'alpha_end', 'temperature', 'temperature_end', 'soft_loss', 'online_teachers',
                     *(f'{name}_weight' for name in losses.AUX_TERMS)), Setting('students', methods=_KD)),
    'teacher_weighting': Setting('students', methods=_WEIGHTED),
    'teacher_weights': Setting('students', methods=_WEIGHTED),
    'ensemble_target': Setting('students', methods=('kd_ensemble',)),
    'unlabelled_extra': Setting('students', methods=_TMKD),
    'unlabelled_splits': Setting('students', methods=_TMKD),
    'unlabelled_corpus': Setting('students', methods=_TMKD),
    'pretrain_epochs': Setting('students', methods=_TMKD),
    'pretrain_steps': Setting('students', methods=_TMKD),
    # Evaluation only.
    **dict.fromkeys(('eval_split', 'eval_batch_size', 'speed_rows', 'speed_repeats'), _EVAL),
    # Bookkeeping.
    **dict.fromkeys(('workdir', 'shared_dir', 'stages', 'methods', 'students', 'checkpoint_every', 'progress',
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


def student_settings(cfg, arch: str, method: str) -> dict:
  """The settings a student run (a method, or TMKD stage 1) depends on, teachers aside."""
  family = 'bilstm' if arch == 'bilstm' else 'bert'
  out = {'arch': arch, 'method': method}
  for name, setting in SETTINGS.items():
    if setting.scope in ('data', 'training') or (
        setting.scope == 'students' and (setting.methods is None or method in setting.methods)
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
