"""Imported per-row scores as a teacher (`scores:FILE`): nothing runs here.

FILE is a TSV with a header or a JSONL file (either may be gzipped: FILE.gz), one row per pair, with the row key
in `row` (`mkdm_jax.data.row_key` of the pair) and either a scalar relevance score in `score` (any scale: a
reranker's logit, a probability, BM25; calibrated on dev) or per-class logits in `logit_0 .. logit_{C-1}`
(JSONL: `"logits": [...]`; used as they are). `experiments/evaluate.py --predictions` files and the files of
`experiments/run.py --export_teacher_logits` qualify; with an --unlabelled_corpus, the file also serves the corpus's
rows (an export of a run with that corpus holds them), so a stage-1 corpus is scored once, anywhere.
"""
import functools
import gzip
import hashlib
import json
import logging
import os
from pathlib import Path

import numpy as np
from scipy import stats

from mkdm_jax.errors import UserError
from mkdm_jax.teachers.base import Calibrated

log = logging.getLogger(__name__)


class ImportedScores(Calibrated):
  kind = 'scores'
  calibrated = False  # a file of per-class logits is used as it is (a scalar-score file is calibrated)
  scores_corpus = True  # a prepared corpus's rows are looked up by key, like every other set's

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._file_values = None  # (row keys, values) of the file
    self._by_set = None  # dataset -> the file's values of its rows

  def check(self):
    if not Path(self.source).is_file():
      raise UserError(f'--teacher_checkpoints: scores:{self.source}: no such file')

  def fingerprint(self):
    return scores_fingerprint(self.source)

  def scorer(self, ctx, count):
    return None  # the scores were computed elsewhere: nothing runs here to time

  def _file(self, ctx):
    """(row keys, values) of the file, read once."""
    if self._file_values is None:
      self._file_values = read_scores(self.source, ctx.task.num_classes)
    return self._file_values

  def _aligned(self, ctx):
    """The file's values of every set of the run (read once): [N] scores or [N, C] logits per set."""
    if self._by_set is None:
      keys, values = self._file(ctx)
      self._by_set = align(self.source, keys, values, {d: e.ids for d, e in ctx.examples.items()})
      used = len(set().union(*(e.ids.tolist() for e in ctx.examples.values())))
      log.info('%s: %d rows of %s from %s, %d of them in this run\'s sets', self.name, len(keys),
               'logits' if values.ndim == 2 else 'scores', self.source, used)
    return self._by_set

  def scores(self, ctx, dataset):
    return self._aligned(ctx)[dataset]

  def logits(self, ctx, dataset, rows):
    values = self._aligned(ctx)[dataset]
    return values[rows] if values.ndim == 2 else super().logits(ctx, dataset, rows)

  def corpus_logits(self, ctx, rows, shards):
    keys, values = self._file(ctx)
    by_shard = align(self.source, keys, values, {f'corpus shard {s}': rows.shard_ids(s) for s in shards})
    for shard, shard_values in zip(shards, by_shard.values()):
      yield shard, shard_values if shard_values.ndim == 2 else self.calibrate(ctx, shard_values)


def scores_fingerprint(path) -> str:
  """Identity of a scores file: its sha256, hashed once per file version (size and mtime) in a process;
  the pipeline asks for it for every stored set and stage."""
  stat = os.stat(path)
  return 'sha256:' + _file_sha256(os.path.abspath(path), stat.st_size, stat.st_mtime_ns)[:16]


@functools.lru_cache(maxsize=16)
def _file_sha256(path, size, mtime_ns) -> str:
  del size, mtime_ns  # cache key only
  digest = hashlib.sha256()
  with open(path, 'rb') as f:
    for block in iter(lambda: f.read(1 << 20), b''):
      digest.update(block)
  return digest.hexdigest()


def read_scores(path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
  """(row keys [N], values [N] scalar scores or [N, C] logits) of a scores file; UserError names file:line."""
  path = Path(path)
  try:
    with (gzip.open if path.suffix == '.gz' else open)(path, 'rt', encoding='utf-8') as f:
      lines = f.read().splitlines()
  except (OSError, EOFError, UnicodeDecodeError) as e:
    raise UserError(f'{path}: cannot read teacher scores: {e}') from None
  lines = [(n, line) for n, line in enumerate(lines, 1) if line.strip()]
  if not lines:
    raise UserError(f'{path}: no teacher scores (empty file)')
  logit_columns = [f'logit_{c}' for c in range(num_classes)]
  keys, values = [], []

  def add(lineno, key, value):
    try:
      keys.append(int(key))
      value = np.asarray(value, np.float64)
    except (TypeError, ValueError):
      raise UserError(f'{path}:{lineno}: row key {key!r} and scores {value!r} must be numbers') from None
    if value.shape not in ((), (num_classes,)) or not np.all(np.isfinite(value)):
      raise UserError(f'{path}:{lineno}: expected one finite score or {num_classes} logits, got {value.tolist()}')
    values.append(value)

  if path.name.removesuffix('.gz').endswith('.jsonl'):
    for lineno, line in lines:
      try:
        obj = json.loads(line)
      except json.JSONDecodeError as e:
        raise UserError(f'{path}:{lineno}: not valid JSON ({e.msg})') from None
      if not isinstance(obj, dict) or 'row' not in obj or ('score' in obj) == ('logits' in obj):
        raise UserError(f'{path}:{lineno}: expected an object with "row" and one of "score" or "logits"')
      add(lineno, obj['row'], obj.get('score', obj.get('logits')))
  else:
    header = lines[0][1].split('\t')
    if 'row' not in header or not ('score' in header or set(logit_columns) <= set(header)):
      raise UserError(f'{path}:1: the header needs a "row" column and a "score" column or '
                      f'{", ".join(logit_columns)}; found {header}')
    columns = ['score'] if 'score' in header else logit_columns
    row_at, at = header.index('row'), [header.index(c) for c in columns]
    for lineno, line in lines[1:]:
      fields = line.split('\t')
      if len(fields) != len(header):
        raise UserError(f'{path}:{lineno}: expected {len(header)} tab-separated fields, found {len(fields)}')
      add(lineno, fields[row_at], fields[at[0]] if len(at) == 1 else [fields[i] for i in at])
  shapes = {v.shape for v in values}
  if len(shapes) > 1:
    raise UserError(f'{path}: mixes scalar scores and per-class logits')
  keys = np.asarray(keys, np.int64)
  unique, counts = np.unique(keys, return_counts=True)
  if (counts > 1).any():
    raise UserError(f'{path}: row key {int(unique[counts > 1][0])} appears {int(counts.max())} times')
  return keys, np.stack(values).astype(np.float32)


def align(path, keys, values, wanted: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """The values of each named set of row keys; UserError for rows missing from the file. Other rows of the
  file are ignored: one file may serve several runs (e.g. exported logits of every stage-1 set a study uses),
  and a file made for other data or other row keys misses this run's rows."""
  index = {int(k): i for i, k in enumerate(keys)}
  missing = {name: [int(k) for k in ids if int(k) not in index] for name, ids in wanted.items()}
  missing = {name: ks for name, ks in missing.items() if ks}
  if missing:
    detail = '; '.join(f'{name}: {len(ks)} rows (first keys {ks[:3]})' for name, ks in missing.items())
    raise UserError(f'{path}: teacher scores are missing for {detail}. Score every train, dev, eval (and '
                    'unlabelled) row; row keys are mkdm_jax.data.row_key of each pair')
  return {name: values[[index[int(k)] for k in ids]] for name, ids in wanted.items()}


def compare_logits(path_a, path_b, num_classes: int = 2) -> dict:
  """How far two per-class logit files (e.g. a retrained teacher's export against a committed one) differ on
  the rows both hold: row counts, max |logit difference|, and for two classes the mean |margin difference|,
  the Spearman correlation of the margins (logit_1 - logit_0, what the probability and the ranking depend on)
  and the share of rows with the same predicted class."""
  keys_a, a = read_scores(path_a, num_classes)
  keys_b, b = read_scores(path_b, num_classes)
  if a.ndim != 2 or b.ndim != 2:
    raise UserError(f'{path_a if a.ndim != 2 else path_b}: holds scalar scores; comparing needs per-class logits')
  common, at_a, at_b = np.intersect1d(keys_a, keys_b, return_indices=True)
  if not len(common):
    raise UserError(f'{path_a} and {path_b} share no row key: nothing to compare')
  a, b = a[at_a], b[at_b]
  result = {'rows_a': len(keys_a), 'rows_b': len(keys_b), 'common_rows': len(common),
            'max_abs_logit_diff': float(np.abs(a - b).max())}
  if num_classes == 2:
    margin_a, margin_b = a[:, 1] - a[:, 0], b[:, 1] - b[:, 0]
    result.update(mean_abs_margin_diff=float(np.abs(margin_a - margin_b).mean()),
                  spearman_margin=float(stats.spearmanr(margin_a, margin_b).statistic),
                  argmax_agreement=float((a.argmax(1) == b.argmax(1)).mean()))
  return result
