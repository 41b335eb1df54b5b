"""The MKDM / TMKD pipeline: teachers -> logits -> pretrain -> distill -> evaluate -> report.

  from mkdm_jax import pipeline
  results = pipeline.run(config.Config(workdir='runs/demo', task='wikiqa', ...))

Every stage writes under `workdir` and is skipped on rerun once complete; an interrupted training run
resumes from its last checkpoint. Each training run records the settings it depends on
(`settings.json`, see `mkdm_jax.distill.SETTINGS`); a rerun whose settings differ stops before any work
and names the changed settings, unless `overwrite` is set. Teachers and the teacher-logit store live
in `shared_dir` (default: the work directory) so that ablations and studies can reuse them.
"""
import dataclasses
import gzip
import hashlib
import json
import logging
import os
import pathlib
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

from mkdm_jax import data as data_lib
from mkdm_jax import config, context, distill, losses, predictions, provenance, saved_model, saved_runs, train
from mkdm_jax import teachers as teachers_lib
from mkdm_jax import metrics as metrics_lib
from mkdm_jax.errors import UserError
from mkdm_jax.models import count_params, factory, load_tokenizer
from mkdm_jax.models.classifier import combination_weights

log = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------------------
# Training.

def planned_runs(ctx: context.Context):
  """(directory, settings) of every saved run this config trains or reuses."""
  cfg = ctx.cfg
  planned = [(t.directory, distill.teacher_settings(cfg, t.index)) for t in ctx.teachers]
  for arch in cfg.students:
    runs = list(cfg.methods) + ([distill.STAGE1] if 'tmkd' in cfg.methods else [])
    planned += [(ctx.student_dir(arch, m), distill.student_settings(cfg, arch, m)) for m in runs]
  return planned


def train_config(cfg: config.Config, buckets, *, epochs, learning_rate, seed, batch_size=None, max_steps=0):
  return train.TrainConfig(
      batch_size=batch_size or cfg.batch_size, epochs=epochs, max_steps=max_steps, learning_rate=learning_rate,
      warmup_ratio=cfg.warmup_ratio, lr_decay=cfg.lr_decay, weight_decay=cfg.weight_decay,
      layer_decay=cfg.layer_decay, accumulate=cfg.accumulate, seed=seed, buckets=buckets,
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
  saved_model.update_spec(directory, combine_weights=np.asarray(combination_weights(model, params)).tolist(),
                          train_seconds=round(seconds, 1))
  log.info('%s: trained in %.0f s', directory, seconds)


def _fit_head_weights(ctx, directory, model, params, dev):
  """Fits the learned head combination on dev and saves it into the final params."""
  head_logits = predict(ctx, model, params, dev)['head_logits']
  weights = distill.fit_combination_weights(head_logits, ctx.examples['dev'].labels)
  params = {**jax.tree.map(np.asarray, params), 'combine_weights': weights}
  train.save_params(pathlib.Path(directory) / 'final', params)
  log.info('%s: head weights fitted on dev: %s', directory, np.round(np.exp(weights) / np.exp(weights).sum(), 3))
  return params


def stage_teachers(ctx: context.Context):
  """Fine-tunes the checkpoint teachers (bi-encoder, word-overlap and imported-score teachers need no training)."""
  cfg = ctx.cfg
  options = config.model_options(cfg)
  for t in ctx.teachers:
    if t.kind != 'checkpoint':
      continue
    seed = distill.per_teacher(cfg.teacher_seeds, t.index, default=t.index)
    fit_model(ctx, t.directory,
              lambda t=t, seed=seed: factory.teacher(t.source, ctx.task.num_classes, seed, options),
              t.tokenizer_dir, 'train', distill.teacher_settings(cfg, t.index),
              train_config(cfg, ctx.buckets, epochs=cfg.teacher_epochs, seed=seed,
                           learning_rate=distill.per_teacher(cfg.teacher_learning_rates, t.index),
                           batch_size=distill.per_teacher(cfg.teacher_batch_sizes, t.index)),
              losses.LossConfig())


def params_fingerprint(params):
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def teacher_fingerprint(ctx: context.Context, teacher: context.Teacher):
  """Identity of a teacher for the logit store: a hash of its final (or encoder) parameters, or of the
  scores file."""
  if teacher.kind == 'scores':
    return teachers_lib.scores_fingerprint(teacher.source)
  if teacher.kind == 'overlap':
    return f'overlap:{teacher.source}'
  path = teacher.directory / 'fingerprint'
  if not path.exists():
    if teacher.kind == 'checkpoint':
      if not train.is_complete(teacher.directory):
        raise UserError(f'teacher {teacher.directory} is not trained yet: run the teachers stage first')
      params = saved_model.load(teacher.directory)[1]
    else:
      params = factory.load_encoder(teacher.source, config.model_options(ctx.cfg))[1]
    teacher.directory.mkdir(parents=True, exist_ok=True)
    path.write_text(params_fingerprint(params))
  return path.read_text()


def store_manifest(ctx, teacher, dataset):
  return {'teacher': teacher_fingerprint(ctx, teacher), 'data': ctx.examples[dataset].fingerprint,
          'max_length': ctx.cfg.max_length}


def stage_logits(ctx: context.Context):
  """Every teacher's logits on every dataset, stored by row key (a row shared by several sets, e.g. TMKD's
  unlabelled set and train, is predicted once); a prepared --unlabelled_corpus is scored shard by shard."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  for teacher in ctx.teachers:
    todo = [d for d in ctx.examples if not store.has(f'{teacher.name}.{d}', store_manifest(ctx, teacher, d))]
    if todo and teacher.kind == 'checkpoint':
      logits = _predicted_logits(ctx, store, teacher, todo)
    elif todo:
      logits = _calibrated_logits(ctx, teacher)
    if todo and jax.process_index() == 0:
      for dataset in todo:
        store.write(f'{teacher.name}.{dataset}', logits[dataset], ctx.examples[dataset].ids,
                    store_manifest(ctx, teacher, dataset))
    if ctx.cfg.unlabelled_corpus:
      _score_corpus(ctx, store, teacher)


def corpus_manifest(ctx, teacher, rows):
  return {'teacher': teacher_fingerprint(ctx, teacher), 'data': rows.fingerprint, 'max_length': ctx.cfg.max_length}


def _score_corpus(ctx, store, teacher):
  """The teacher's logits on the prepared corpus, shard by shard: each process scores its own shards (s = its
  index mod the process count) on its own devices and writes them to the store; finished shards are kept."""
  rows = ctx.encoded(teacher.tokenizer_dir, 'unlabelled')
  name, manifest, count = f'{teacher.name}.corpus', corpus_manifest(ctx, teacher, rows), len(rows.shard_rows)
  # Every process sees the same missing shards (the store is on a shared file system), so all of them load
  # the teacher together (a multi-process load synchronises) or none does.
  missing = [s for s in range(count) if not store.has_shard(name, manifest, s, count)]
  todo = [s for s in missing if s % jax.process_count() == jax.process_index()]
  if missing:
    model, params, _ = saved_model.load(teacher.directory)
    predictions.score_corpus(model, params, rows, store, name, manifest, todo, batch_size=ctx.cfg.eval_batch_size,
                             buckets=ctx.buckets, progress=ctx.cfg.progress)
    log.info('%s: scored %d of %d corpus shards in this process', teacher.name, len(todo), count)
  context.sync_processes(f'{name} scored')


def _predicted_logits(ctx, store, teacher, todo):
  """A fine-tuned teacher's logits on the `todo` datasets, reusing rows it already predicted."""
  known = {}  # row key -> logits
  for dataset in ctx.examples:
    if dataset not in todo:
      stored, ids = store.read(f'{teacher.name}.{dataset}', store_manifest(ctx, teacher, dataset))
      known.update(zip(ids.tolist(), stored))
  model, params, _ = saved_model.load(teacher.directory)
  out = {}
  for dataset in todo:
    ids = ctx.examples[dataset].ids.tolist()
    new = np.array([i for i, key in enumerate(ids) if key not in known], np.int64)
    log.info('%s.%s: predicting %d rows, %d reused from earlier sets', teacher.name, dataset, len(new),
             len(ids) - len(new))
    if len(new):
      encoded = ctx.encoded(teacher.tokenizer_dir, dataset).select(new)
      predicted = train.predict(model, params, encoded, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size,
                                buckets=ctx.buckets, desc=f'{teacher.name}.{dataset}' if ctx.cfg.progress else None)
      known.update(zip((ids[i] for i in new), predicted['logits']))
    out[dataset] = np.stack([known[key] for key in ids])
  return out


def _calibrated_logits(ctx, teacher):
  """Logits of an imported-scores or bi-encoder teacher on every dataset (scalar scores calibrated on dev)."""
  if teacher.kind == 'scores':
    keys, values = teachers_lib.read_scores(teacher.source, ctx.task.num_classes)
    values = teachers_lib.align(teacher.source, keys, values, {d: e.ids for d, e in ctx.examples.items()})
    used = len(set().union(*(e.ids.tolist() for e in ctx.examples.values())))
    log.info('%s: %d rows of %s from %s, %d of them in this run\'s sets', teacher.name, len(keys),
             'logits' if values['train'].ndim == 2 else 'scores', teacher.source, used)
    if values['train'].ndim == 2:
      return values  # per-class logits, used as they are
  else:
    score = biencoder(ctx, teacher) if teacher.kind == 'biencoder' else word_overlap(ctx, teacher)
    values = {d: score(e.text_a, e.text_b) for d, e in ctx.examples.items()}
  if 'dev' not in values:
    raise UserError(f'{teacher.name} ({teacher.kind}:{teacher.source}) gives scalar scores, which are '
                    'calibrated on the dev split: give a --dev_split')
  a, b = teachers_lib.fit_calibration(values['dev'], ctx.examples['dev'].labels)
  log.info('%s: calibrated on dev: logit = %.4g * score + %.4g', teacher.name, a, b)
  return {d: teachers_lib.calibrated_logits(v, a, b) for d, v in values.items()}


def word_overlap(ctx, teacher):
  """(text_a, text_b) -> word-overlap scores, IDF over the distinct passages of every set of the run."""
  return teachers_lib.word_overlap_scorer(teacher.source, [text for e in ctx.examples.values() for text in e.text_b])


def biencoder(ctx, teacher):
  """(text_a, text_b) -> cosines of a checkpoint's mean-pooled embeddings (its own tokenizer)."""
  encoder_config, params = factory.load_encoder(teacher.source, config.model_options(ctx.cfg))
  encoder = factory.encoder_module(encoder_config)
  embed = jax.jit(lambda ids, mask: encoder.apply({'params': params}, ids, jnp.zeros_like(ids), mask)['sequence'])
  tokenizer = load_tokenizer(teacher.tokenizer_dir)
  return lambda text_a, text_b: teachers_lib.mean_pooled_cosines(embed, tokenizer, text_a, text_b,
                                                                 ctx.cfg.max_length, ctx.cfg.eval_batch_size)


def teacher_logits(ctx: context.Context, dataset, indices=None):
  """[N, T, C] logits of the chosen teachers (default all) on `dataset`, read from the store by row key."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  chosen = [ctx.teachers[i] for i in (range(len(ctx.teachers)) if indices is None else indices)]
  if dataset == 'unlabelled' and ctx.cfg.unlabelled_corpus:
    return corpus_teacher_logits(ctx, store, chosen)
  stacked = []
  for teacher in chosen:
    name, manifest = f'{teacher.name}.{dataset}', store_manifest(ctx, teacher, dataset)
    if not store.has(name, manifest):
      raise UserError(f'teacher logits {name} are missing or stale: run the logits stage')
    stacked.append(store.read_rows(name, manifest, ctx.examples[dataset].ids))
  return np.stack(stacked, axis=1)


def corpus_teacher_logits(ctx: context.Context, store, chosen):
  """[N, T, C] logits of the chosen teachers on the prepared corpus, memory-mapped from the store's shards
  (each shard's row keys checked against the corpus's)."""
  per_teacher = []
  for teacher in chosen:
    rows = ctx.encoded(teacher.tokenizer_dir, 'unlabelled')
    name, manifest = f'{teacher.name}.corpus', corpus_manifest(ctx, teacher, rows)
    shards = store.read_shards(name, manifest)
    starts = np.cumsum([0] + rows.shard_rows)
    for s, (_, ids) in enumerate(shards):
      if len(ids) != rows.shard_rows[s] or not np.array_equal(ids, rows.ids[starts[s]:starts[s + 1]]):
        raise data_lib.StaleStoreError(f'{store.root / name}: shard {s} holds other rows than the corpus; '
                                       'rerun the logits stage')
    per_teacher.append([logits for logits, _ in shards])
  return data_lib.corpus.CorpusLogits(per_teacher, rows.shard_rows)


def export_teacher_logits(ctx: context.Context, out_dir) -> list[pathlib.Path]:
  """Writes each teacher's stored logits on every row of every set (each row key once) to
  <out_dir>/teacher_<i>.tsv.gz (columns row, logit_0 .. logit_{C-1}): a `scores:` teacher file, so students can
  be trained later or elsewhere without the teacher's weights. Returns the files."""
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  header = '\t'.join(['row'] + [f'logit_{c}' for c in range(ctx.task.num_classes)])
  written = []
  for i, teacher in enumerate(ctx.teachers):
    rows = {}  # row key -> logits, sets in a fixed order
    for dataset in ctx.examples:
      logits = teacher_logits(ctx, dataset, [i])[:, 0]
      rows.update(zip(ctx.examples[dataset].ids.tolist(), logits))
    path = out_dir / f'{teacher.name}.tsv.gz'
    tmp = path.with_name(path.name + '.tmp')
    # mtime=0: the same logits give the same bytes; 9 digits round-trip float32 (exact ties and ranks).
    with open(tmp, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', mtime=0) as f:
      f.write((header + '\n').encode())
      f.write(''.join(f'{key}\t' + '\t'.join(f'{v:.9g}' for v in values) + '\n'
                      for key, values in rows.items()).encode())
    os.replace(tmp, path)
    log.info('%s: %d rows of logits exported to %s', teacher.name, len(rows), path)
    written.append(path)
  return written


def teacher_inputs(ctx: context.Context, dataset, indices):
  """A callable giving fit()'s teacher arguments: the chosen teachers' stored logits, or with
  --online_teachers the frozen models run inside the train step. Deferred: finished runs load nothing."""
  def load():
    if not ctx.cfg.online_teachers:
      return {'teacher_logits': teacher_logits(ctx, dataset, indices)}
    loaded = [saved_model.load(ctx.teachers[i].directory)[:2] for i in indices]
    return {'teacher_models': tuple(m for m, _ in loaded), 'teacher_params': tuple(p for _, p in loaded)}
  return load


def best_teacher(ctx: context.Context):
  """Index of the teacher with the best dev score (the kd_single teacher; teacher_0 without dev)."""
  if 'dev' not in ctx.examples:
    return 0
  dev = ctx.examples['dev']
  logits = teacher_logits(ctx, 'dev')
  scores = [metrics_lib.compute([ctx.primary], dev.labels, train.softmax(logits[:, i]), dev.groups)[ctx.primary]
            for i in range(len(ctx.teachers))]
  return int(np.argmax(scores))


def student_learning_rate(cfg, arch):
  return cfg.bilstm_learning_rate if arch == 'bilstm' else cfg.student_learning_rate


def _student_run(ctx, arch, method, *, stage1=False):
  """Trains one student run: a method, or TMKD stage 1 of `arch`."""
  cfg = ctx.cfg
  run = distill.STAGE1 if stage1 else method
  indices = distill.teacher_indices(method, cfg.num_teachers, best_teacher(ctx) if method == 'kd_single' else 0)
  settings = {**distill.student_settings(cfg, arch, run),
              'teachers': [teacher_fingerprint(ctx, ctx.teachers[i]) for i in indices]}
  heads = distill.num_heads(method, cfg.num_teachers)
  init_from = ctx.student_dir(arch, distill.STAGE1) if distill.METHODS[method].pretrain and not stage1 else None
  if init_from is not None and not train.is_complete(init_from):
    raise UserError(f'{method} needs TMKD stage 1 ({init_from}): run the pretrain stage first')

  def build():
    model, params = factory.student(arch, distill.student_checkpoint(cfg.student_checkpoint, arch),
                                    ctx.task.num_classes, heads, cfg.student_seed,
                                    config.model_options(cfg), combine=cfg.head_combine,
                                    layers=None if arch == 'bilstm' else tuple(cfg.student_layers) or None)
    if init_from is not None:
      params = train.load_final(init_from)[0]
    return model, params

  dataset = 'unlabelled' if stage1 else 'train'
  epochs = cfg.pretrain_epochs if stage1 else cfg.student_epochs
  fit_model(ctx, ctx.student_dir(arch, run), build, ctx.student_tokenizer_dir(arch), dataset, settings,
            train_config(cfg, ctx.buckets, epochs=epochs, learning_rate=student_learning_rate(cfg, arch),
                         seed=cfg.student_seed, max_steps=cfg.pretrain_steps if stage1 else 0),
            distill.loss_config(method, cfg), select_on_dev=not stage1,
            teachers=teacher_inputs(ctx, dataset, indices) if indices else None)


def stage_pretrain(ctx: context.Context):
  """TMKD stage 1: every teacher's soft labels on unlabelled pairs, one head per teacher."""
  for method in ctx.cfg.methods:
    if distill.METHODS[method].pretrain:
      for arch in ctx.cfg.students:
        _student_run(ctx, arch, method, stage1=True)


def stage_distill(ctx: context.Context):
  """Stage 2: every method x student architecture, the same budget and seed."""
  for arch in ctx.cfg.students:
    for method in ctx.cfg.methods:
      _student_run(ctx, arch, method)


# ---------------------------------------------------------------------------------------------
# Evaluation and report.

def predict(ctx, model, params, encoded):
  return train.predict(model, params, encoded, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size,
                       buckets=ctx.buckets)


def speed_rows(ctx, tokenizer_dir):
  return ctx.encoded(tokenizer_dir, 'eval').select(np.arange(min(ctx.cfg.speed_rows, len(ctx.examples['eval']))))


def examples_per_sec(ctx, runs):
  """Inference examples/s of running every `run()` of `runs` (each scoring the first --speed_rows eval rows):
  one warm-up pass, then the median of --speed_repeats timed passes."""
  def one_pass():
    for run in runs:
      run()

  one_pass()
  times = []
  for _ in range(ctx.cfg.speed_repeats):
    t0 = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - t0)
  return min(ctx.cfg.speed_rows, len(ctx.examples['eval'])) / statistics.median(times)


def timed_model(ctx, model, params, tokenizer_dir):
  rows = speed_rows(ctx, tokenizer_dir)
  return lambda: predict(ctx, model, params, rows)


def threshold_of(ctx, dev_probs):
  """The F1-best threshold on dev (binary tasks with a dev split), else None."""
  labels = ctx.examples['dev'].labels if 'dev' in ctx.examples else None
  if dev_probs is None or ctx.task.num_classes != 2 or not (labels == 1).any():
    return None
  return metrics_lib.best_f1_threshold(labels, dev_probs[:, 1])


def scores(ctx, probs, threshold, dataset='eval'):
  examples = ctx.examples[dataset]
  return metrics_lib.compute(ctx.metrics, examples.labels, probs, examples.groups, threshold=threshold)


def _row(ctx, name, eval_probs, dev_probs, saved, **fields):
  """A results row: metrics on eval (at the dev-tuned threshold too) and dev; `saved` collects the
  probabilities for eval/probabilities.npz."""
  threshold = threshold_of(ctx, dev_probs)
  saved[f'eval/{name}'] = eval_probs
  row = {'name': name, **fields, 'threshold': threshold, 'metrics': scores(ctx, eval_probs, threshold)}
  if dev_probs is not None:
    saved[f'dev/{name}'] = dev_probs
    row['dev_metrics'] = scores(ctx, dev_probs, threshold, 'dev')
  return row


def _teacher_row(ctx, teacher, eval_logits, dev_logits, saved):
  """A teacher's results row and its timed inference (None for imported scores)."""
  row = _row(ctx, teacher.name, train.softmax(eval_logits), None if dev_logits is None else train.softmax(dev_logits),
             saved, method='teacher', student=None, kind=teacher.kind, checkpoint=teacher.source, params=None)
  timed = None
  if teacher.kind == 'checkpoint':
    model, params, spec = saved_model.load(teacher.directory)
    saved_model.update_spec(teacher.directory, threshold=row['threshold'])
    row['params'], row['train_seconds'] = count_params(params), spec.get('train_seconds')
    timed = timed_model(ctx, model, params, teacher.tokenizer_dir)
  elif teacher.kind in ('biencoder', 'overlap'):
    score = biencoder(ctx, teacher) if teacher.kind == 'biencoder' else word_overlap(ctx, teacher)
    rows = ctx.examples['eval'].select(np.arange(min(ctx.cfg.speed_rows, len(ctx.examples['eval']))))
    row['params'] = (count_params(factory.load_encoder(teacher.source, config.model_options(ctx.cfg))[1])
                     if teacher.kind == 'biencoder' else 0)
    timed = lambda: score(rows.text_a, rows.text_b)
  return row, timed


def stage_evaluate(ctx: context.Context):
  """Metrics on the eval split (and at a dev-tuned threshold) and on dev, the measured speed of every model,
  every model's positive-class probabilities by row (eval/probabilities.npz, for paired tests), and how much
  the teachers differ (metrics.teacher_diversity) on dev and eval."""
  cfg = ctx.cfg
  out_dir = ctx.workdir / 'eval'
  out_dir.mkdir(parents=True, exist_ok=True)
  eval_logits = teacher_logits(ctx, 'eval')
  dev_logits = teacher_logits(ctx, 'dev') if 'dev' in ctx.examples else None
  rows, timed, saved = [], [], {}
  for i, teacher in enumerate(ctx.teachers):
    row, run = _teacher_row(ctx, teacher, eval_logits[:, i], None if dev_logits is None else dev_logits[:, i], saved)
    row['examples_per_sec'] = examples_per_sec(ctx, [run]) if run else None
    rows.append(row)
    timed.append(run)
  ensemble = lambda logits: np.mean([train.softmax(logits[:, i]) for i in range(len(ctx.teachers))], 0)
  runnable = all(timed)
  rows.append(_row(ctx, 'teacher_ensemble', ensemble(eval_logits), None if dev_logits is None else ensemble(dev_logits),
                   saved, method='teacher_ensemble', student=None,
                   params=sum(r['params'] for r in rows) if runnable else None,
                   examples_per_sec=examples_per_sec(ctx, timed) if runnable else None))
  for arch in cfg.students:
    for method in cfg.methods:
      directory = ctx.student_dir(arch, method)
      model, params, spec = saved_model.load(directory)
      tokenizer_dir = ctx.student_tokenizer_dir(arch)
      dev = predict(ctx, model, params, ctx.encoded(tokenizer_dir, 'dev')) if 'dev' in ctx.examples else None
      out = predict(ctx, model, params, ctx.encoded(tokenizer_dir, 'eval'))
      row = _row(ctx, f'{arch}_{method}', train.softmax(out['logits']),
                 None if dev is None else train.softmax(dev['logits']), saved, method=method, student=arch,
                 params=count_params(params),
                 examples_per_sec=examples_per_sec(ctx, [timed_model(ctx, model, params, tokenizer_dir)]),
                 combine_weights=np.asarray(combination_weights(model, params)).tolist(),
                 train_seconds=spec.get('train_seconds'))
      if distill.METHODS[method].pretrain:
        row['pretrain_seconds'] = saved_model.read_spec(ctx.student_dir(arch, distill.STAGE1)).get('train_seconds')
      saved_model.update_spec(directory, threshold=row['threshold'])
      heads = train.scores(out, ctx.examples['eval'], ctx.metrics, threshold=row['threshold'])
      row['head_metrics'] = {k: v for k, v in heads.items() if '/' in k}
      rows.append(row)
  np.savez(out_dir / 'probabilities.npz', **{f'{d}/ids': ctx.examples[d].ids for d in ('eval', 'dev')
                                            if d in ctx.examples}, **saved)
  diversity = {name: metrics_lib.teacher_diversity(logits)
               for name, logits in (('dev', dev_logits), ('eval', eval_logits))
               if logits is not None and len(ctx.teachers) > 1}
  (out_dir / 'rows.json').write_text(json.dumps({'provenance': provenance.record(), 'rows': rows,
                                                 'teacher_diversity': diversity}, indent=1))


def stage_report(ctx: context.Context):
  path = ctx.workdir / 'eval' / 'rows.json'
  if not path.exists():
    raise UserError(f'{path} is missing: run the evaluate stage first')
  evaluated = json.loads(path.read_text())
  results = {'task': ctx.cfg.task, 'split': ctx.cfg.eval_split, 'primary_metric': ctx.primary,
             'provenance': evaluated['provenance'], 'config': dataclasses.asdict(ctx.cfg),
             'speed': {'rows': min(ctx.cfg.speed_rows, len(ctx.examples['eval'])),
                       'batch_size': ctx.cfg.eval_batch_size, 'buckets': list(ctx.buckets),
                       'timing': f'median of {ctx.cfg.speed_repeats} passes after a warm-up pass'},
             'teacher_diversity': evaluated.get('teacher_diversity', {}), 'rows': evaluated['rows']}
  (ctx.workdir / 'results.json').write_text(json.dumps(results, indent=1))
  (ctx.workdir / 'results.md').write_text(results_markdown(results))
  return results


def results_markdown(results):
  rows = results['rows']
  names = list(rows[0]['metrics'])
  speeds = [r['examples_per_sec'] for r in rows if r['method'] == 'teacher' and r['examples_per_sec']]
  teacher_speed = max(speeds) if speeds else None
  p, s = results['provenance'], results['speed']
  number = lambda x, fmt: '-' if x is None else format(x, fmt)
  lines = [f"Task `{results['task']}`, split `{results['split']}`. {p['date']}, {p['cpu_model']} "
           f"({p['backend']}), commit {p['commit'][:12]}. ex/s: inference on {s['rows']} eval rows, batch "
           f"{s['batch_size']}, {s['timing']}; speedup against the fastest teacher.", '',
           '| model | method | student | params | ex/s | speedup vs teacher | ' + ' | '.join(names) + ' |',
           '|' + '---|' * (6 + len(names))]
  for r in rows:
    speed = r['examples_per_sec']
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | "
                 f"{number(r['params'] and r['params'] / 1e6, '.2f')}M | {number(speed, '.0f')} | "
                 f"{number(speed and teacher_speed and speed / teacher_speed, '.1f')}x | "
                 + ' | '.join(f"{r['metrics'][n]:.4f}" for n in names) + ' |')
  return '\n'.join(lines) + '\n'


# ---------------------------------------------------------------------------------------------

STAGE_FUNCTIONS = dict(teachers=stage_teachers, logits=stage_logits, pretrain=stage_pretrain,
                       distill=stage_distill, evaluate=stage_evaluate, report=stage_report)


def run(cfg: config.Config, *, export_teacher_logits_to=None):
  """Runs the configured stages in order; returns results.json's content when the report stage ran.

  `export_teacher_logits_to`: then (process 0) writes every teacher's stored logits there
  (`export_teacher_logits`). The caller holds the work-directory lock (see `mkdm_jax.workdir.WorkdirLock`).
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
    export_teacher_logits(ctx, export_teacher_logits_to)
  return results
