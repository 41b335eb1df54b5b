"""Distillation and gold-label losses.

Shapes: student head logits `s` [B, H, C]; teacher logits `z` [B, H, C] (teacher t feeds head t:
MKDM has H = T heads; single-teacher and averaged-ensemble KD have H = 1); labels [B] int (-1 = none);
`weight` [B] (0 for padding rows).

The MKDM objective is  L = sum_t w_t [alpha * soft(s_t, z_t; T) + (1 - alpha) * CE(s_t, y)],
averaged over real rows. Rows without a gold label use the soft term only (TMKD stage 1).
Averaged-ensemble KD gives its one head the target `ensemble_target(z, w, T)`.

Auxiliary (intermediate-layer) terms are registered in `AUX_TERMS`: adding one is a function here, an
entry there and a `<name>_weight` setting in `mkdm_jax.config.Config`. `LossConfig` says which terms the one
train step (`mkdm_jax.train.step`) combines; `mkdm_jax.distill.loss_config` builds it for a method.
"""
import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import optax

SOFT_LOSSES = ('kl', 'ce', 'mse')
TEACHER_WEIGHTINGS = ('uniform', 'fixed', 'confidence', 'sample')
ENSEMBLE_TARGETS = ('probs', 'logits')
TEACHER_MODES = ('none', 'per_head', 'ensemble')


def soft_loss(student_logits, teacher_logits, temperature, kind='kl'):
  """Per-example, per-head soft-label loss [..., C] -> [...].

  'kl': T^2 * KL(softmax(z/T) || softmax(s/T)) (Hinton et al.; T^2 keeps gradient scale T-free);
  'ce': T^2 * cross-entropy with the teacher's softened distribution as target;
  'mse': mean squared error between raw logits (temperature unused).
  """
  if kind == 'mse':
    return jnp.mean(jnp.square(student_logits - teacher_logits), axis=-1)
  log_p_student = jax.nn.log_softmax(student_logits / temperature, axis=-1)
  p_teacher = jax.nn.softmax(teacher_logits / temperature, axis=-1)
  cross_entropy = -jnp.sum(p_teacher * log_p_student, axis=-1)
  if kind == 'ce':
    return temperature**2 * cross_entropy
  if kind == 'kl':
    teacher_entropy = -jnp.sum(p_teacher * jax.nn.log_softmax(teacher_logits / temperature, axis=-1), axis=-1)
    return temperature**2 * (cross_entropy - teacher_entropy)
  raise ValueError(f'soft loss must be one of {SOFT_LOSSES}, got {kind!r}')


def gold_loss(student_logits, labels):
  """Cross-entropy with gold labels [B, H, C], [B] -> [B, H]; 0 where the label is missing (-1)."""
  safe_labels = jnp.maximum(labels, 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(
      student_logits, jnp.broadcast_to(safe_labels[:, None], student_logits.shape[:2]))
  return jnp.where(labels[:, None] >= 0, ce, 0.0)


def teacher_weights(teacher_logits, kind='uniform', fixed=None, labels=None):
  """Weights w_t, [B, H], summing to 1 over heads for every row.

  'uniform': 1/H; 'fixed': the given per-teacher weights, normalised; 'confidence': per example,
  proportional to each teacher's max softmax probability (more confident teachers count more);
  'sample' (CA-MKD's confidence weights, Zhang et al. 2022): per labelled example
  w_t = (1 - exp(CE_t) / sum_k exp(CE_k)) / (H - 1), CE_t the cross-entropy of teacher t's T = 1 prediction with
  the gold label: the better a teacher predicts the label, the more it counts. Rows without a label get 1/H.
  """
  batch, heads = teacher_logits.shape[:2]
  if kind == 'uniform':
    return jnp.full((batch, heads), 1.0 / heads)
  if kind == 'fixed':
    w = jnp.asarray(fixed, jnp.float32)
    return jnp.broadcast_to(w / jnp.sum(w), (batch, heads))
  if kind == 'confidence':
    confidence = jnp.max(jax.nn.softmax(teacher_logits, axis=-1), axis=-1)
    return confidence / jnp.sum(confidence, axis=-1, keepdims=True)
  if kind == 'sample':
    if labels is None or heads < 2:
      raise ValueError("teacher weighting 'sample' needs the gold labels and at least two teachers")
    log_probs = jax.nn.log_softmax(teacher_logits, axis=-1)  # [B, H, C]
    cross_entropy = -jnp.take_along_axis(log_probs, jnp.maximum(labels, 0)[:, None, None], axis=-1)[..., 0]
    w = (1.0 - jax.nn.softmax(cross_entropy, axis=-1)) / (heads - 1)
    return jnp.where((labels >= 0)[:, None], w, 1.0 / heads)
  raise ValueError(f'teacher weighting must be one of {TEACHER_WEIGHTINGS}, got {kind!r}')


def ensemble_target(teacher_logits, weights, temperature, kind='probs'):
  """The averaged-ensemble target [B, T, C] -> [B, 1, C], as logits for `soft_loss`.

  'probs' (default; Hinton et al.'s ensemble): the weighted mean of the teachers' distributions
  softened at T, p = sum_t w_t softmax(z_t / T), returned as T * log p so that softmax(target / T) = p.
  'logits' (TextBrewer's choice): the weighted mean of the teachers' logits, sum_t w_t z_t.
  `weights` [B, T] sum to 1 over teachers (see `teacher_weights`).
  """
  if kind == 'probs':
    probs = jnp.einsum('bt,btc->bc', weights, jax.nn.softmax(teacher_logits / temperature, axis=-1))
    return (temperature * jnp.log(jnp.maximum(probs, 1e-30)))[:, None]
  if kind == 'logits':
    return jnp.einsum('bt,btc->bc', weights, teacher_logits)[:, None]
  raise ValueError(f'ensemble target must be one of {ENSEMBLE_TARGETS}, got {kind!r}')


def mkdm_loss(student_logits, teacher_logits, labels, weight, *, alpha, temperature,
              soft='kl', weighting='uniform', fixed_weights=None):
  """The MKDM objective and its parts, each averaged over real rows.

  `teacher_logits` may be None (gold loss only: teacher fine-tuning, no-distillation student).
  Returns (loss, measurements) with 'soft_t{i}' per head, 'soft', 'gold' and 'accuracy'.
  """
  denom = jnp.maximum(jnp.sum(weight), 1.0)
  mean = lambda per_example: jnp.sum(per_example * weight) / denom
  gold = gold_loss(student_logits, labels)  # [B, H]
  has_label = (labels >= 0).astype(jnp.float32)[:, None]
  heads = student_logits.shape[1]
  if teacher_logits is None:
    w = jnp.full(gold.shape, 1.0 / heads)
    per_head = gold
    measurements = {}
  else:
    w = teacher_weights(teacher_logits, weighting, fixed_weights, labels)
    soft_terms = soft_loss(student_logits, teacher_logits, temperature, soft)  # [B, H]
    # Unlabelled rows: the soft term alone carries the full weight.
    soft_coef = jnp.where(has_label > 0, alpha, 1.0)
    per_head = soft_coef * soft_terms + (1.0 - soft_coef) * gold
    measurements = {f'soft_t{i}': mean(soft_terms[:, i]) for i in range(heads)}
    measurements['soft'] = mean(jnp.sum(w * soft_terms, axis=1))
  loss = mean(jnp.sum(w * per_head, axis=1))
  measurements['gold'] = mean(jnp.sum(w * gold, axis=1))
  return loss, measurements


def hidden_state_mse(student_hidden, teacher_hidden, projection, mask):
  """Intermediate-layer term: MSE between projected student and teacher hidden states [B, L, D].

  `projection` [Ds, Dt] is learned when the widths differ (identity otherwise); padding is masked.
  """
  diff = student_hidden @ projection - teacher_hidden
  per_token = jnp.mean(jnp.square(diff), axis=-1)
  return jnp.sum(per_token * mask) / jnp.maximum(jnp.sum(mask), 1.0)


def attention_kl(student_attn, teacher_attn, mask):
  """Intermediate-layer term: KL(teacher || student) of attention maps [B, heads, L, L], masked rows."""
  eps = 1e-9
  kl = jnp.sum(teacher_attn * (jnp.log(teacher_attn + eps) - jnp.log(student_attn + eps)), axis=-1)
  row_mask = mask[:, None, :]
  return jnp.sum(kl * row_mask) / jnp.maximum(jnp.sum(row_mask) * kl.shape[1], 1.0)


def layer_map(num_student, num_teacher):
  """Student layer i (1-based) learns from teacher layer round(i * Lt / Ls) (uniform mapping)."""
  return [(i, round(i * num_teacher / num_student)) for i in range(1, num_student + 1)]


def hidden_term(student, teachers, mask, params):
  """Hidden-state MSE over the mapped layer pairs, averaged over layers and then over teachers.

  `student`/`teachers[t]`: model outputs with 'hidden_states' (embeddings first). A learned
  'hidden_projection' [Ds, Dt] in `params` maps a narrower student to the (common) teacher width.
  """
  total = 0.0
  for teacher in teachers:
    pairs = layer_map(len(student['hidden_states']) - 1, len(teacher['hidden_states']) - 1)
    width = student['hidden_states'][0].shape[-1]
    projection = params.get('hidden_projection', jnp.eye(width))
    total += sum(hidden_state_mse(student['hidden_states'][s], jax.lax.stop_gradient(teacher['hidden_states'][t]),
                                  projection, mask) for s, t in pairs) / len(pairs)
  return total / len(teachers)


def attention_term(student, teachers, mask, params):
  """Attention-map KL over the mapped layer pairs, averaged over layers and then over teachers
  (teacher and student need the same number of attention heads)."""
  del params
  total = 0.0
  for teacher in teachers:
    pairs = layer_map(len(student['attentions']), len(teacher['attentions']))
    total += sum(attention_kl(student['attentions'][s - 1], jax.lax.stop_gradient(teacher['attentions'][t - 1]),
                              mask) for s, t in pairs) / len(pairs)
  return total / len(teachers)


@dataclasses.dataclass(frozen=True)
class AuxTerm:
  """An intermediate-layer loss term: `fn(student_out, teacher_outs, mask, params) -> scalar`."""
  fn: Callable
  measurement: str
  doc: str


AUX_TERMS = {
    'hidden': AuxTerm(hidden_term, 'hidden_mse', 'hidden-state MSE (a learned projection when widths differ)'),
    'attention': AuxTerm(attention_term, 'attention_kl', 'attention-map KL (equal head counts)'),
}


def linear_schedule(start, end, steps):
  """A constant (start == end) or linear schedule for temperature / alpha, as an optax schedule."""
  if start == end or steps <= 0:
    return optax.constant_schedule(start)
  return optax.linear_schedule(start, end, steps)


@dataclasses.dataclass(frozen=True)
class LossConfig:
  """What the loss function does; hashable, so it is static for jit."""
  teacher_mode: str = 'none'
  soft: str = 'kl'
  alpha: float = 0.5
  alpha_end: float | None = None  # linear schedule from alpha to alpha_end over schedule_steps
  temperature: float = 1.0
  temperature_end: float | None = None
  schedule_steps: int = 0  # optimiser updates of the schedules; 0: the whole run (set by fit)
  weighting: str = 'uniform'  # per head ('per_head'), or inside the ensemble target ('ensemble')
  fixed_weights: tuple[float, ...] | None = None
  ensemble_target: str = 'probs'
  # Intermediate-layer terms of AUX_TERMS as (name, weight) pairs; they need online teachers
  # and average over all the teachers the step runs.
  aux_weights: tuple[tuple[str, float], ...] = ()

  def __post_init__(self):
    if self.teacher_mode not in TEACHER_MODES:
      raise ValueError(f'teacher_mode must be one of {TEACHER_MODES}, got {self.teacher_mode!r}')
    if self.soft not in SOFT_LOSSES:
      raise ValueError(f'soft loss must be one of {SOFT_LOSSES}, got {self.soft!r}')
    if self.weighting not in TEACHER_WEIGHTINGS:
      raise ValueError(f'weighting must be one of {TEACHER_WEIGHTINGS}, got {self.weighting!r}')
    if self.ensemble_target not in ENSEMBLE_TARGETS:
      raise ValueError(f'ensemble_target must be one of {ENSEMBLE_TARGETS}, '
                       f'got {self.ensemble_target!r}')
    unknown = [name for name, _ in self.aux_weights if name not in AUX_TERMS]
    if unknown:
      raise ValueError(f'unknown auxiliary loss terms {unknown}; known: {sorted(AUX_TERMS)}')
    for name in ('alpha', 'alpha_end'):
      value = getattr(self, name)
      if value is not None and not 0.0 <= value <= 1.0:
        raise ValueError(f'{name}={value} must lie in [0, 1]')
    for name in ('temperature', 'temperature_end'):
      value = getattr(self, name)
      if value is not None and value <= 0:
        raise ValueError(f'{name}={value} must be > 0')
