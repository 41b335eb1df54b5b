"""The one recipe that makes a model's train step runnable: the optimiser, the train state's shardings, the
jitted step with the state donated, and the jitted initial state (used by `fit` and the benchmarks alike)."""
import dataclasses
from typing import Any, Callable

import jax

from mkdm_jax.losses import LossConfig
from mkdm_jax.train import sharding
from mkdm_jax.train.optim import make_optimizer
from mkdm_jax.train.step import TrainState, init_state, make_train_step


@dataclasses.dataclass(frozen=True)
class CompiledStep:
  """`step(state, batch, teacher_params=()) -> (state, measurements)` (the state is donated); `init()` -> the
  initial state, placed by `shardings`; `abstract`: the state's shapes and dtypes (a restore target)."""
  step: Callable[..., tuple[TrainState, dict]]
  init: Callable[[], TrainState]
  abstract: TrainState
  shardings: Any  # a TrainState of NamedShardings


def compile_train_step(model, params, loss_config: LossConfig, *, mesh, rng, teacher_models=(), accumulate=1,
                       frozen=(), **optimizer_settings) -> CompiledStep:
  """The train step of `model` from `params` on `mesh`; `rng` seeds the state's dropout stream.

  optimizer_settings: `optim.make_optimizer`'s (learning_rate, total_steps, warmup_steps, decay, ...).
  With `accumulate` = k > 1 every k micro-batch steps make one optimiser update. `frozen`: names of parameters
  left as they are (`optim.frozen_mask`).
  """
  optimizer, schedule = make_optimizer(params, accumulate=accumulate, frozen=frozen, **optimizer_settings)
  make_state = lambda r, p: init_state(model, optimizer, r, params=p)
  abstract = jax.eval_shape(make_state, rng, params)
  shardings = sharding.state_shardings(mesh, abstract)
  step = jax.jit(make_train_step(model, optimizer, schedule, loss_config, teacher_models, accumulate, frozen),
                 donate_argnums=(0,), out_shardings=(shardings, sharding.replicated(mesh)))
  init = jax.jit(make_state, out_shardings=shardings)
  return CompiledStep(step=step, init=lambda: init(rng, params), abstract=abstract, shardings=shardings)
