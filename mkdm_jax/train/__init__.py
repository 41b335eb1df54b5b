"""Training engine: one jitted train step for every variant, sharding, Orbax checkpoints, loops."""
from mkdm_jax.train.loop import (NonFiniteLoss, Preempted, TrainConfig, enable_compilation_cache,
                                 evaluate, fit, is_complete, load_final, load_params, predict,
                                 read_summary, save_params, scores, softmax)
from mkdm_jax.train.sharding import make_mesh
from mkdm_jax.train.step import TrainState, make_eval_step, make_train_step
