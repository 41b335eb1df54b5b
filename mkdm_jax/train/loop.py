"""The training loop: one linear `fit` (big_vision style); inference is `mkdm_jax.train.inference`.

`fit` resumes automatically from the newest readable checkpoint in its work directory. The data
position is derived from the step (the same seed and epoch give the same batches), so a resumed run
sees exactly the batches an uninterrupted one would. Batches are built on a background thread
(`prefetch`), and the host waits for the device only where it needs a step's results: at logged,
evaluated and saved steps, which is also where the loss is checked.
"""
import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

import jax
import numpy as np
from tensorboardX import SummaryWriter
from tqdm import tqdm

from mkdm_jax.data.batching import BUCKETS, batches, num_batches, prefetch
from mkdm_jax.errors import UserError
from mkdm_jax.losses import LossConfig
from mkdm_jax.models import factory
from mkdm_jax.train import checkpoint, sharding
from mkdm_jax.train.compiled import compile_train_step
from mkdm_jax.train.inference import HOST_ONLY_KEYS, evaluate
from mkdm_jax.train.preemption import Preempted, preempted, sigterm_guard

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class TrainConfig:
  """Optimisation and bookkeeping settings of one training run."""
  batch_size: int = 32
  epochs: float = 1.0
  max_steps: int = 0  # > 0 overrides epochs; counts micro-batches
  learning_rate: float = 5e-5
  warmup_ratio: float = 0.1
  lr_decay: str = 'linear'
  weight_decay: float = 0.01
  clip_norm: float = 1.0
  layer_decay: float = 1.0
  accumulate: int = 1
  frozen: tuple[str, ...] = ()  # names of parameters left as they are (train.optim.frozen_mask)
  seed: int = 0
  buckets: tuple[int, ...] = BUCKETS
  checkpoint_every: int = 500
  keep_checkpoints: int = 2
  eval_every: int = 0  # 0: at the end of every epoch
  log_every: int = 20
  select_best: bool = True  # return the params of the best dev evaluation
  profile_steps: tuple[int, ...] = ()  # (first, last) step of a jax.profiler trace
  async_checkpoint: bool = True
  progress: bool = True


class NonFiniteLoss(UserError):
  """The loss became NaN or infinite; the last good checkpoint is kept."""


def enable_compilation_cache(path):
  """Persistent XLA compilation cache (measured: cuts a tiny model's first step from ~3 s to ~1 s)."""
  jax.config.update('jax_compilation_cache_dir', str(path))
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.5)


def with_hidden_projection(params, model, teacher, rng):
  """Adds the learned [Ds, Dt] projection of the hidden-state term when the widths differ."""
  student_width, teacher_width = model.encoder.hidden_size, teacher.encoder.hidden_size
  if student_width == teacher_width or 'hidden_projection' in params:
    return params
  scale = 1.0 / np.sqrt(student_width)
  projection = scale * jax.random.normal(rng, (student_width, teacher_width), np.float32)
  return {**params, 'hidden_projection': np.asarray(projection)}


def train_batches(train, cfg: TrainConfig, step, steps_per_epoch, extra=None):
  """This process's batches for every step from `step` on, epoch after epoch, without the host-only fields.

  The data position follows the step alone: a resumed run gets the batches an uninterrupted one would.
  """
  while True:
    epoch, start = divmod(step, steps_per_epoch)
    for batch in batches(train, cfg.batch_size, seed=cfg.seed, epoch=epoch, buckets=cfg.buckets, start_batch=start,
                         process_index=jax.process_index(), process_count=jax.process_count(), extra=extra):
      for key in HOST_ONLY_KEYS:
        batch.pop(key, None)
      yield batch
    step = (epoch + 1) * steps_per_epoch


def logged_speed(metrics_path):
  """Median training examples/s of the logged windows in a metrics.jsonl (every part of a resumed run; a window
  holding an evaluation or the first compilation is one of many), or None without any."""
  speeds = [row['examples_per_sec'] for row in map(json.loads, Path(metrics_path).read_text().splitlines())
            if row.get('kind') == 'train' and 'examples_per_sec' in row]
  return float(np.median(speeds)) if speeds else None


def fit(workdir, model, train, cfg: TrainConfig, loss_config: LossConfig, *, mesh, init_params=None,
        teacher_logits=None, teacher_models=(), teacher_params=(), eval_data=None,
        eval_metrics=(), primary_metric=None):
  """Trains `model` on encoded `train` rows; returns the final (or best-on-dev) params.

  train: an `Encoded`, or a prepared corpus's `CorpusRows` (streamed; the same batches).
  teacher_logits: [N, T, C] float32 aligned with `train` rows (from the logit store), or None.
  teacher_models/teacher_params: frozen teachers run inside the step (online distillation).
  Writes under `workdir`: ckpt/ (resume), best/, final/, metrics.jsonl, tb/ and DONE.json.
  """
  workdir = Path(workdir).absolute()
  workdir.mkdir(parents=True, exist_ok=True)
  is_main = jax.process_index() == 0
  steps_per_epoch = num_batches(train, cfg.batch_size)
  total_steps = cfg.max_steps or max(math.ceil(cfg.epochs * steps_per_epoch), 1)
  updates = max(total_steps // cfg.accumulate, 1)
  if not loss_config.schedule_steps:
    loss_config = dataclasses.replace(loss_config, schedule_steps=updates)
  rng = jax.random.PRNGKey(cfg.seed)
  if init_params is None:
    init_params = factory.init_params(model, rng)
  # A private host copy: the state's buffers are donated each step and must not alias the caller's.
  init_params = jax.tree.map(np.array, init_params)
  if dict(loss_config.aux_weights).get('hidden', 0) > 0 and teacher_models:
    # One projection for all teachers: the pipeline requires them to share one width.
    init_params = with_hidden_projection(init_params, model, teacher_models[0], rng)
  compiled = compile_train_step(
      model, init_params, loss_config, mesh=mesh, rng=rng, teacher_models=teacher_models,
      accumulate=cfg.accumulate, learning_rate=cfg.learning_rate, total_steps=updates,
      warmup_steps=int(cfg.warmup_ratio * updates), decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
      clip_norm=cfg.clip_norm, layer_decay=cfg.layer_decay, frozen=cfg.frozen)
  teacher_params = jax.device_put(teacher_params, sharding.replicated(mesh))

  ckpt = checkpoint.Checkpointer(workdir, keep=cfg.keep_checkpoints, async_save=cfg.async_checkpoint)
  restored = ckpt.restore_latest(checkpoint.abstract_like(compiled.abstract, compiled.shardings))
  if restored is not None:
    state, meta = restored
    best_score = meta.get('best_score')
    log.info('resuming %s from step %d', workdir, int(state.step))
  else:
    state = compiled.init()
    best_score = None
  step = int(state.step)

  writer = SummaryWriter(str(workdir / 'tb')) if is_main else None
  metrics_file = open(workdir / 'metrics.jsonl', 'a') if is_main else None

  def record(values, kind):
    if not is_main:
      return
    metrics_file.write(json.dumps({'step': step, 'kind': kind, **values}) + '\n')
    metrics_file.flush()
    for name, value in values.items():
      writer.add_scalar(f'{kind}/{name}', value, step)

  def save(force=False):
    ckpt.save(step, state, {'step': step, 'epoch': step // steps_per_epoch,
                            'batch_in_epoch': step % steps_per_epoch, 'best_score': best_score},
              force=force)

  def checked(measurements):
    """The step's measurements on the host, once its loss is finite."""
    values = jax.device_get(measurements)
    if not np.isfinite(values['loss']):
      raise NonFiniteLoss(
          f'non-finite loss ({values["loss"]}) at step {step} in {workdir} (checked at every logged, evaluated '
          f'or saved step); training stopped and the last good checkpoint (step {ckpt.states.latest_step()}) is '
          'kept. Lower the learning rate or check the inputs and teacher logits.')
    return values

  # An array, or any [N, T, C] row-indexable source (a corpus's memory-mapped CorpusLogits).
  extra = {'teacher_logits': teacher_logits} if teacher_logits is not None else None
  bar = tqdm(total=total_steps, initial=step, desc=workdir.name, unit='step',
             disable=not cfg.progress or not is_main, dynamic_ncols=True)
  last_eval, window_start, window_examples = {}, time.perf_counter(), 0
  try:
    stream = prefetch(train_batches(train, cfg, step, steps_per_epoch, extra))
    with sigterm_guard(), contextlib.closing(stream):
      for batch in stream:
        if step >= total_steps:
          break
        if cfg.profile_steps and step == cfg.profile_steps[0]:
          jax.profiler.start_trace(str(workdir / 'profile'))
        state, measurements = compiled.step(state, sharding.put_batch(mesh, batch), teacher_params)
        step += 1
        if cfg.profile_steps and step == cfg.profile_steps[-1]:
          jax.profiler.stop_trace()
        window_examples += cfg.batch_size
        bar.update(1)
        log_now = step % cfg.log_every == 0 or step in (1, total_steps)  # first and last steps always
        at_eval = step % cfg.eval_every == 0 if cfg.eval_every else step % steps_per_epoch == 0
        eval_now = eval_data is not None and (at_eval or step == total_steps)
        save_now = step % cfg.checkpoint_every == 0 or step == total_steps
        stop = preempted()
        if log_now or eval_now or save_now or stop:
          # The host waits for the device only at these steps (the others are dispatched without waiting), and
          # checks the loss before anything of the step is logged or saved: a NaN never reaches a checkpoint.
          measurements = checked(measurements)
        if log_now:
          elapsed = time.perf_counter() - window_start
          values = {k: float(v) for k, v in measurements.items()}
          values['examples_per_sec'] = window_examples / max(elapsed, 1e-9)
          record(values, 'train')
          bar.set_postfix(loss=f'{values["loss"]:.4f}', ex_s=f'{values["examples_per_sec"]:.1f}')
          window_start, window_examples = time.perf_counter(), 0
        if eval_now:
          last_eval = evaluate(model, state.params, eval_data, eval_metrics, mesh=mesh)
          record(last_eval, 'eval')
          score = last_eval[primary_metric]
          if best_score is None or score > best_score:
            best_score = score
            ckpt.save_best(step, state.params, score)
        if save_now:
          save()
        if stop:
          if ckpt.states.latest_step() != step:
            save(force=True)
          ckpt.wait()
          raise Preempted(step)
      ckpt.wait()
      params = state.params
      if cfg.select_best and eval_data is not None:
        params = ckpt.restore_best(checkpoint.abstract_like(compiled.abstract.params, compiled.shardings.params))
      checkpoint.save_params(workdir / 'final', params)
      if is_main:
        metrics_file.flush()
        checkpoint.write_summary(workdir, {'steps': step, 'best_score': best_score, 'last_eval': last_eval,
                                           'examples_per_sec': logged_speed(workdir / 'metrics.jsonl')})
      return params
  finally:
    bar.close()
    ckpt.close()
    if is_main:
      writer.close()
      metrics_file.close()
