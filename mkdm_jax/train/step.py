"""The one train step and the eval step, shared by teacher fine-tuning and every distillation variant.

Variants differ only in data and `losses.LossConfig`:
  teacher fine-tuning / student_scratch  teacher_mode='none' (gold labels only)
  kd_single                              teacher_mode='per_head', one teacher's logits, one head
  kd_ensemble                            teacher_mode='ensemble', one head learns the (weighted)
                                         ensemble target of all teachers (losses.ensemble_target)
  mkdm                                   teacher_mode='per_head', teacher t -> head t
  tmkd stage 1                           as mkdm, on unlabelled rows (labels -1: soft term only)
Teacher logits come from the batch (`teacher_logits` [B, T, C], read from the logit store) or from
frozen teacher parameters run inside the step (online teachers).
"""
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax

from mkdm_jax import losses
from mkdm_jax.models.factory import init_params
from mkdm_jax.train import optim


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # micro-batches seen (== optimiser updates unless gradients are accumulated)
  params: Any
  opt_state: Any
  rng: jax.Array


def make_loss_fn(model, config: losses.LossConfig, teacher_models=()):
  """loss_fn(params, batch, rng, step, teacher_params) -> (loss, measurements)."""
  alpha_at = losses.linear_schedule(config.alpha, config.alpha if config.alpha_end is None
                                    else config.alpha_end, config.schedule_steps)
  temperature_at = losses.linear_schedule(
      config.temperature, config.temperature if config.temperature_end is None
      else config.temperature_end, config.schedule_steps)
  aux = [(name, weight) for name, weight in config.aux_weights if weight > 0]

  def loss_fn(params, batch, rng, step, teacher_params):
    inputs = (batch['input_ids'], batch['token_type_ids'], batch['attention_mask'])
    out = model.apply({'params': params}, *inputs, deterministic=False,
                      output_hidden_states=bool(aux), rngs={'dropout': rng})
    student_logits = out['head_logits']
    teacher_logits, teacher_outs = batch.get('teacher_logits'), ()
    if teacher_models:
      teacher_outs = [m.apply({'params': p}, *inputs, deterministic=True, output_hidden_states=bool(aux))
                      for m, p in zip(teacher_models, teacher_params)]
      teacher_logits = jnp.stack([o['logits'] for o in teacher_outs], axis=1)
    alpha, temperature = alpha_at(step), temperature_at(step)
    weighting = config.weighting
    if config.teacher_mode == 'none':
      teacher_logits = None
    else:
      teacher_logits = jax.lax.stop_gradient(teacher_logits.astype(jnp.float32))
      if config.teacher_mode == 'ensemble':
        weights = losses.teacher_weights(teacher_logits, config.weighting, config.fixed_weights, batch['labels'])
        teacher_logits = losses.ensemble_target(teacher_logits, weights, temperature, config.ensemble_target)
        weighting = 'uniform'  # the teachers' weights are inside the one target
    loss, measurements = losses.mkdm_loss(
        student_logits, teacher_logits, batch['labels'], batch['weight'], alpha=alpha,
        temperature=temperature, soft=config.soft, weighting=weighting,
        fixed_weights=config.fixed_weights)
    mask = batch['attention_mask'].astype(jnp.float32)
    for name, weight in aux:
      term = losses.AUX_TERMS[name]
      value = term.fn(out, teacher_outs, mask, params)
      measurements[term.measurement] = value
      loss = loss + weight * value
    labelled = batch['weight'] * (batch['labels'] >= 0)
    correct = jnp.argmax(out['logits'], axis=-1) == batch['labels']
    measurements['accuracy'] = jnp.sum(correct * labelled) / jnp.maximum(jnp.sum(labelled), 1.0)
    measurements.update(alpha=alpha, temperature=temperature)
    return loss, measurements

  return loss_fn


def make_train_step(model, optimizer, lr_schedule, config: losses.LossConfig, teacher_models=(),
                    accumulate=1, frozen=()):
  """A pure `train_step(state, batch, teacher_params) -> (state, measurements)`; jit it with donation.

  frozen: names of parameters that get no gradient (`optim.frozen_mask`; the optimiser must freeze them too).
  """
  loss_fn = make_loss_fn(model, config, teacher_models)

  def train_step(state, batch, teacher_params=()):
    rng = jax.random.fold_in(state.rng, state.step)
    mask = optim.frozen_mask(state.params, frozen)
    # stop_gradient: a frozen table's (dense) gradient is never built; its zeros are dropped by the optimiser.
    loss_of = lambda p, *args: loss_fn(jax.tree.map(lambda x, f: jax.lax.stop_gradient(x) if f else x, p, mask),
                                       *args)
    (loss, measurements), grads = jax.value_and_grad(loss_of, has_aux=True)(
        state.params, batch, rng, state.step // accumulate, teacher_params)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    measurements.update(loss=loss, grad_norm=optax.tree.norm(optim.without_frozen(grads, mask)),
                        learning_rate=lr_schedule(state.step // accumulate))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state), measurements

  return train_step


def make_eval_step(model):
  """`eval_step(params, batch) -> {'logits': [B, C], 'head_logits': [B, H, C]}` (no dropout)."""

  def eval_step(params, batch):
    out = model.apply({'params': params}, batch['input_ids'], batch['token_type_ids'],
                      batch['attention_mask'], deterministic=True)
    return {'logits': out['logits'], 'head_logits': out['head_logits']}

  return eval_step


def init_state(model, optimizer, rng, params=None):
  """Fresh TrainState from given (e.g. pretrained) params, else a random init."""
  init_rng, state_rng = jax.random.split(rng)
  if params is None:
    params = init_params(model, init_rng)
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=optimizer.init(params),
                    rng=state_rng)
