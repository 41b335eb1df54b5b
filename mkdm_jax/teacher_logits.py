"""The logits stage and the logit store's readers: every teacher's logits on every set of the run, written once by
row key (`<shared_dir>/logits`), and read back as [N, T, C] arrays for the train step, best-teacher selection and
evaluation."""
import gzip
import logging
import pathlib

import jax
import numpy as np

from mkdm_jax import context, paths, train
from mkdm_jax import data as data_lib
from mkdm_jax import metrics as metrics_lib
from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)


def store_manifest(ctx, teacher, dataset):
  return {'teacher': teacher.fingerprint(), 'data': ctx.examples[dataset].fingerprint,
          'max_length': ctx.cfg.max_length}


def corpus_manifest(ctx, teacher, rows):
  return {'teacher': teacher.fingerprint(), 'data': rows.fingerprint, 'max_length': ctx.cfg.max_length}


def stage_logits(ctx: context.Context):
  """Every teacher's logits on every dataset, stored by row key (a row shared by several sets, e.g. TMKD's
  unlabelled set and train, is computed once); a prepared --unlabelled_corpus is scored shard by shard."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  for teacher in ctx.teachers:
    todo = [d for d in ctx.examples if not store.has(f'{teacher.name}.{d}', store_manifest(ctx, teacher, d))]
    # Process 0 writes what it computes: every process must have read the store (and found the same todo) first.
    context.sync_processes(f'{teacher.name} logits checked')
    if todo:
      logits = _new_logits(ctx, store, teacher, todo)
      if jax.process_index() == 0:
        for dataset in todo:
          store.write(f'{teacher.name}.{dataset}', logits[dataset], ctx.examples[dataset].ids,
                      store_manifest(ctx, teacher, dataset))
    if ctx.cfg.unlabelled_corpus:
      _score_corpus(ctx, store, teacher)


def _new_logits(ctx, store, teacher, todo):
  """The teacher's logits on the `todo` datasets, reusing rows it already gave for other sets."""
  known = {}  # row key -> logits
  for dataset in ctx.examples:
    if dataset not in todo:
      stored, ids = store.read(f'{teacher.name}.{dataset}', store_manifest(ctx, teacher, dataset))
      known.update(zip(ids.tolist(), stored))
  out = {}
  for dataset in todo:
    ids = ctx.examples[dataset].ids.tolist()
    new = np.array([i for i, key in enumerate(ids) if key not in known], np.int64)
    log.info('%s.%s: %d new rows, %d reused from earlier sets', teacher.name, dataset, len(new), len(ids) - len(new))
    if len(new):
      known.update(zip((ids[i] for i in new), teacher.logits(ctx, dataset, new)))
    out[dataset] = np.stack([known[key] for key in ids])
  return out


def _score_corpus(ctx, store, teacher):
  """The teacher's logits on the prepared corpus, shard by shard: each process scores its own shards (s = its
  index mod the process count) on its own devices and writes them to the store; finished shards are kept."""
  rows = ctx.teacher_corpus(teacher)
  name, manifest, count = f'{teacher.name}.corpus', corpus_manifest(ctx, teacher, rows), len(rows.shard_rows)
  # Every process sees the same missing shards (the store is on a shared file system), so all of them load
  # the teacher together (a multi-process load synchronises) or none does.
  missing = [s for s in range(count) if not store.has_shard(name, manifest, s, count)]
  todo = [s for s in missing if s % jax.process_count() == jax.process_index()]
  if missing:
    for shard, logits in teacher.corpus_logits(ctx, rows, todo):
      store.write(name, logits, rows.shard_ids(shard), manifest, shard=shard, num_shards=count)
    log.info('%s: scored %d of %d corpus shards in this process', teacher.name, len(todo), count)
  context.sync_processes(f'{name} scored')


def read(ctx: context.Context, dataset, indices=None):
  """[N, T, C] logits of the chosen teachers (default all) on `dataset`, read from the store by row key."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  chosen = [ctx.teachers[i] for i in (range(len(ctx.teachers)) if indices is None else indices)]
  if dataset == 'unlabelled' and ctx.cfg.unlabelled_corpus:
    return read_corpus(ctx, store, chosen)
  stacked = []
  for teacher in chosen:
    name, manifest = f'{teacher.name}.{dataset}', store_manifest(ctx, teacher, dataset)
    if not store.has(name, manifest):
      raise UserError(f'teacher logits {name} are missing or stale: run the logits stage')
    stacked.append(store.read_rows(name, manifest, ctx.examples[dataset].ids))
  return np.stack(stacked, axis=1)


def read_corpus(ctx: context.Context, store, chosen):
  """[N, T, C] logits of the chosen teachers on the prepared corpus, memory-mapped from the store's shards
  (each shard's row keys checked against the corpus's)."""
  per_teacher = []
  for teacher in chosen:
    rows = ctx.teacher_corpus(teacher)
    name, manifest = f'{teacher.name}.corpus', corpus_manifest(ctx, teacher, rows)
    shards = store.read_shards(name, manifest)
    starts = np.cumsum([0] + rows.shard_rows)
    for s, (_, ids) in enumerate(shards):
      if len(ids) != rows.shard_rows[s] or not np.array_equal(ids, rows.ids[starts[s]:starts[s + 1]]):
        raise data_lib.StaleStoreError(f'{store.root / name}: shard {s} holds other rows than the corpus; '
                                       'rerun the logits stage')
    per_teacher.append([logits for logits, _ in shards])
  return data_lib.corpus.CorpusLogits(per_teacher, rows.shard_rows)


def teacher_inputs(ctx: context.Context, dataset, indices):
  """A callable giving fit()'s teacher arguments: the chosen teachers' stored logits, or with
  --online_teachers the frozen models run inside the train step. Deferred: finished runs load nothing."""
  def load():
    if not ctx.cfg.online_teachers:
      return {'teacher_logits': read(ctx, dataset, indices)}
    loaded = [ctx.teachers[i].saved() for i in indices]  # teachers that run online (validated)
    return {'teacher_models': tuple(m for m, _ in loaded), 'teacher_params': tuple(p for _, p in loaded)}
  return load


def best_teacher(ctx: context.Context):
  """Index of the teacher with the best dev score (the kd_single teacher; teacher_0 without dev)."""
  if 'dev' not in ctx.examples:
    return 0
  dev = ctx.examples['dev']
  logits = read(ctx, 'dev')
  scores = [metrics_lib.compute([ctx.primary], dev.labels, train.softmax(logits[:, i]), dev.groups)[ctx.primary]
            for i in range(len(ctx.teachers))]
  return int(np.argmax(scores))


def export(ctx: context.Context, out_dir) -> list[pathlib.Path]:
  """Writes each teacher's stored logits on every row of every set (each row key once), and of the
  --unlabelled_corpus when there is one, to <out_dir>/teacher_<i>.tsv.gz (columns row, logit_0 .. logit_{C-1}): a
  `scores:` teacher file, so students can be trained later or elsewhere without the teacher's weights (a corpus
  that is never scored again). Returns the files."""
  store = data_lib.LogitStore(ctx.shared / 'logits')
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  header = '\t'.join(['row'] + [f'logit_{c}' for c in range(ctx.task.num_classes)])
  written = []
  for i, teacher in enumerate(ctx.teachers):
    rows = {}  # row key -> logits, sets in a fixed order
    for dataset in ctx.examples:
      logits = read(ctx, dataset, [i])[:, 0]
      rows.update(zip(ctx.examples[dataset].ids.tolist(), logits))
    if ctx.cfg.unlabelled_corpus:
      corpus = ctx.teacher_corpus(teacher)
      rows.update(zip(corpus.ids.tolist(), read_corpus(ctx, store, [teacher])[np.arange(len(corpus))][:, 0]))
    path = out_dir / f'{teacher.name}.tsv.gz'

    def write(tmp, rows=rows):
      # mtime=0: the same logits give the same bytes; 9 digits round-trip float32 (exact ties and ranks).
      with open(tmp, 'wb') as raw, gzip.GzipFile(fileobj=raw, mode='wb', mtime=0) as f:
        f.write((header + '\n').encode())
        f.write(''.join(f'{key}\t' + '\t'.join(f'{v:.9g}' for v in values) + '\n'
                        for key, values in rows.items()).encode())
    paths.write_atomic(path, write)
    log.info('%s: %d rows of logits exported to %s', teacher.name, len(rows), path)
    written.append(path)
  return written
