"""The MKDM / TMKD pipeline: the stage list, teachers -> logits -> pretrain -> distill -> evaluate -> report.

  from mkdm_jax import config, pipeline
  results = pipeline.run(config.config_from_flagfile('experiments/configs/quickstart.flags', workdir='runs/demo'))

Every stage writes under `workdir` and is skipped on rerun once complete; an interrupted training run resumes from
its last checkpoint. Each training run records the settings it depends on (`mkdm_jax.saved_runs`); a rerun whose
settings differ stops before any work and names the changed settings, unless `overwrite` is set. Teachers and the
teacher-logit store live in `shared_dir` (default: the work directory) so that ablations and studies can reuse them.
The parts: `config` (settings), `context` (rows, teachers, mesh), `teachers` (one class per kind), `teacher_logits`
(the logits stage and store reads), `distill` (methods as rows), `report` (evaluate and report stages).
"""
import dataclasses
import hashlib
import json
import logging
import os
import pathlib
import shutil
import time

import jax
import numpy as np

from mkdm_jax import config, context, distill, losses, paths, report, saved_model, saved_runs, teacher_logits, train
from mkdm_jax.errors import UserError
from mkdm_jax.models import factory
from mkdm_jax.models.classifier import combination_weights

log = logging.getLogger(__name__)


def planned_runs(ctx: context.Context):
  """(directory, settings) of every saved run this config trains or reuses."""
  cfg = ctx.cfg
  planned = [(t.directory, distill.teacher_settings(cfg, t.index)) for t in ctx.teachers if t.trains]
  for arch in cfg.students:
    planned += [(ctx.student_dir(arch, run), distill.student_settings(cfg, arch, run))
                for run in distill.runs_of(cfg.methods)]
  return planned


def train_config(cfg: config.Config, buckets, *, epochs, learning_rate, seed, batch_size=None, max_steps=0,
                 frozen=()):
  return train.TrainConfig(
      batch_size=batch_size or cfg.batch_size, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
      warmup_ratio=cfg.warmup_ratio, lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
      layer_decay=cfg.layer_decay, accumulate=cfg.accumulate, frozen=frozen, seed=seed, buckets=buckets,
      checkpoint_every=cfg.checkpoint_every, eval_every=cfg.eval_every, progress=cfg.progress,
      profile_steps=tuple(cfg.profile_steps))


def fit_model(ctx: context.Context, directory, build, tokenizer_dir, dataset, settings, train_cfg, loss_config, *,
              select_on_dev=True, teachers=None):
  """Trains (or resumes, or skips when finished) one run on `dataset` and saves its model folder.

  build: () -> (model, initial params); teachers: () -> fit()'s teacher arguments, or None.
  """
  saved_runs.claim_run(directory, settings, ctx.cfg.overwrite)
  if train.is_complete(directory):
    log.info('%s: already trained, skipping', directory)
    return
  model, params = build()
  saved_model.write_spec(directory, model, tokenizer_dir=tokenizer_dir, max_length=ctx.cfg.max_length,
                         task=ctx.cfg.task, label_names=ctx.task.label_names)
  dev = ctx.encoded(tokenizer_dir, 'dev') if select_on_dev and 'dev' in ctx.examples else None
  t0 = time.perf_counter()
  params = train.fit(directory, model, ctx.encoded(tokenizer_dir, dataset), train_cfg, loss_config, mesh=ctx.mesh,
                     init_params=params, **(teachers() if teachers else {}), eval_data=dev,
                     eval_metrics=ctx.metrics, primary_metric=ctx.primary)
  if model.combine == 'learned' and dev is not None:
    params = _fit_head_weights(ctx, directory, model, params, dev)
  seconds = time.perf_counter() - t0  # of this process: a resumed run counts its last part only
  context.sync_processes(f'{directory.name} trained')  # process 0 has written DONE.json, read below
  saved_model.update_spec(directory, combine_weights=np.asarray(combination_weights(model, params)).tolist(),
                          train_seconds=round(seconds, 1),
                          train_examples_per_sec=train.read_summary(directory).get('examples_per_sec'))
  log.info('%s: trained in %.0f s', directory, seconds)


def _fit_head_weights(ctx, directory, model, params, dev):
  """Fits the learned head combination on dev and saves it into the final params."""
  head_logits = report.predict(ctx, model, params, dev)['head_logits']
  weights = distill.fit_combination_weights(head_logits, ctx.examples['dev'].labels)
  params = {**jax.tree.map(np.asarray, params), 'combine_weights': weights}
  train.save_params(pathlib.Path(directory) / 'final', params)
  log.info('%s: head weights fitted on dev: %s', directory, np.round(np.exp(weights) / np.exp(weights).sum(), 3))
  return params


def stage_teachers(ctx: context.Context):
  """Fine-tunes the teachers that train (bi-encoder, word-overlap and imported-score teachers do not)."""
  cfg = ctx.cfg
  for t in ctx.teachers:
    if t.trains:
      fit_model(ctx, t.directory, lambda t=t: t.init_model(ctx.task.num_classes, config.model_options(cfg)),
                t.tokenizer_dir, 'train', distill.teacher_settings(cfg, t.index),
                train_config(cfg, ctx.buckets, epochs=cfg.teacher_epochs, seed=t.seed,
                             learning_rate=t.learning_rate, batch_size=t.batch_size),
                losses.LossConfig())


def student_learning_rate(cfg, arch):
  return cfg.bilstm_learning_rate if arch == 'bilstm' else cfg.student_learning_rate


def _student_run(ctx, arch, run):
  """Trains one student run of `arch`: a method (from its first stage's weights if it has one), or a first stage
  (`distill.stage1_run`) on the unlabelled pairs."""
  cfg = ctx.cfg
  method, stage1 = distill.method_of(run), run.endswith(distill.STAGE1_SUFFIX)
  best = teacher_logits.best_teacher(ctx) if method.teachers == 'best_dev' else 0
  indices = distill.teacher_indices(run, cfg.num_teachers, best)
  settings = {**distill.student_settings(cfg, arch, run),
              'teachers': [ctx.teachers[i].fingerprint() for i in indices]}
  init_from = ctx.student_dir(arch, distill.stage1_run(run)) if method.pretrain and not stage1 else None
  if init_from is not None and not train.is_complete(init_from):
    raise UserError(f'{run} needs its first stage ({init_from}): run the pretrain stage first')

  def build():
    model, params = factory.student(arch, distill.student_checkpoint(cfg.student_checkpoint, arch),
                                    ctx.task.num_classes, distill.num_heads(run, cfg.num_teachers), cfg.student_seed,
                                    config.model_options(cfg), combine=cfg.head_combine,
                                    layers=None if arch == 'bilstm' else tuple(cfg.student_layers) or None,
                                    head_layers=cfg.head_layers if method.heads == 'per_teacher' else 0)
    if init_from is not None:
      params = train.load_final(init_from)[0]
    return model, params

  dataset = 'unlabelled' if stage1 else 'train'
  directory = ctx.student_dir(arch, run)
  cached = stage1_cache_dir(ctx, arch, run, settings) if stage1 else None
  if cached is not None and not train.is_complete(directory) and train.is_complete(cached):
    saved_runs.check([(directory, settings)], cfg.overwrite)  # a stale partial run: an error, or deleted first
    _copy_run(cached, directory, settings)
    log.info('%s: first stage copied from %s (trained before with the same settings and teachers)', directory, cached)
  fit_model(ctx, directory, build, ctx.student_tokenizer_dir(arch), dataset, settings,
            train_config(cfg, ctx.buckets, epochs=cfg.pretrain_epochs if stage1 else cfg.student_epochs,
                         learning_rate=student_learning_rate(cfg, arch), seed=cfg.student_seed,
                         max_steps=cfg.pretrain_steps if stage1 else 0,
                         frozen=('word_embeddings',) if cfg.freeze_word_embeddings else ()),
            distill.loss_config(run, cfg), select_on_dev=not stage1,
            teachers=teacher_logits.teacher_inputs(ctx, dataset, indices) if indices else None)
  if cached is not None and not train.is_complete(cached):
    _copy_run(directory, cached, settings)


def stage1_cache_dir(ctx, arch, run, settings) -> pathlib.Path:
  """Where a finished first stage is kept for reuse (--stage1_cache, default <shared_dir>/stage1/): <arch>_<key>,
  the key a hash of all it depends on (`settings`, the teachers' fingerprints included) with the method's target
  in place of its name, so another work directory, variant or method with the same first stage (e.g. a sweep of
  a stage-2 setting) copies it instead of training it again."""
  m = distill.method_of(run)
  key = json.dumps({**settings, 'method': [m.teachers, m.target, m.heads]}, sort_keys=True)
  root = pathlib.Path(ctx.cfg.stage1_cache) if ctx.cfg.stage1_cache else ctx.shared / 'stage1'
  return root / f'{arch}_{hashlib.sha256(key.encode()).hexdigest()[:16]}'


def _copy_run(source, target, settings):
  """A finished run's folder copied to `target` (what was there is replaced), without its resumable checkpoints,
  recording `settings` (the run it now belongs to); process 0 copies, the others wait."""
  if jax.process_index() == 0:
    tmp = target.with_name(f'.{target.name}.tmp-{os.getpid()}')
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.copytree(source, tmp, ignore=shutil.ignore_patterns('ckpt', 'best'))
    paths.write_text_atomic(tmp / saved_runs.SETTINGS_FILE, json.dumps(settings, indent=1))
    if target.exists():
      shutil.rmtree(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, target)
  context.sync_processes(f'{target.name} copied')


def stage_pretrain(ctx: context.Context):
  """The first stage of every two-stage method: its teachers' soft labels on the unlabelled pairs."""
  for method in distill.where(ctx.cfg.methods, lambda m: m.pretrain):
    for arch in ctx.cfg.students:
      _student_run(ctx, arch, distill.stage1_run(method))


def stage_distill(ctx: context.Context):
  """Every method x student architecture on the labelled rows, the same budget and seed."""
  for arch in ctx.cfg.students:
    for method in ctx.cfg.methods:
      _student_run(ctx, arch, method)


STAGE_FUNCTIONS = dict(teachers=stage_teachers, logits=teacher_logits.stage_logits, pretrain=stage_pretrain,
                       distill=stage_distill, evaluate=report.stage_evaluate, report=report.stage_report)


def run(cfg: config.Config, *, export_teacher_logits_to=None):
  """Runs the configured stages in order; returns results.json's content when the report stage ran.

  `export_teacher_logits_to`: then (process 0) writes every teacher's stored logits there
  (`teacher_logits.export`). The caller holds the work-directory lock (see `mkdm_jax.workdir.WorkdirLock`).
  """
  ctx = context.make_context(cfg)
  saved_runs.check(planned_runs(ctx), cfg.overwrite)
  history = ctx.workdir / 'history'
  history.mkdir(exist_ok=True)
  stamp = time.strftime('%Y%m%dT%H%M%S', time.gmtime())
  (history / f'{stamp}-config.json').write_text(json.dumps(dataclasses.asdict(cfg), indent=1))
  results = None
  for stage in config.STAGES:
    if stage in cfg.stages:
      log.info('stage %s', stage)
      results = STAGE_FUNCTIONS[stage](ctx)
  if export_teacher_logits_to and jax.process_index() == 0:
    teacher_logits.export(ctx, export_teacher_logits_to)
  return results
