"""Training engine: one jitted train step for every variant, the loop, sharding, Orbax checkpoints, and
inference beside them."""
from mkdm_jax.train.checkpoint import is_complete, load_final, load_params, read_summary, save_params
from mkdm_jax.train.compiled import compile_train_step
from mkdm_jax.train.inference import evaluate, predict, scores, softmax
from mkdm_jax.train.loop import NonFiniteLoss, TrainConfig, enable_compilation_cache, fit
from mkdm_jax.train.preemption import Preempted
from mkdm_jax.train.sharding import make_mesh
from mkdm_jax.train.step import TrainState, make_eval_step, make_train_step
