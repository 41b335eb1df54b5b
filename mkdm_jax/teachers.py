"""Teachers that are not fine-tuned cross-encoders: imported scores and zero-shot bi-encoders.

Each gives per-row two-class logits for the logit store, keyed by row key (`mkdm_jax.data.row_key`), and
enter the same per-head soft loss as a trained teacher.

* Imported scores (`scores:FILE`): a TSV with a header or a JSONL file (either may be gzipped: FILE.gz), one
  row per pair, with the row key in `row` and either a scalar relevance score in `score` (any scale: a
  reranker's logit, a probability, BM25) or per-class logits in `logit_0 .. logit_{C-1}` (JSONL: `"logits":
  [...]`). `experiments/evaluate.py --predictions` files and `experiments/export_logits.py` files qualify.
  Scalar scores are calibrated on the dev split; logits are used as they are.
* Word overlap (`overlap:count` or `overlap:idf`): the number of the question's distinct non-stop words that
  occur in the passage, or their summed IDF over the run's distinct passages (the WikiQA paper's "Word Cnt" and
  "Wgt Word Cnt" baselines), calibrated on the dev split.
* Bi-encoders (`biencoder:CHECKPOINT`): the cosine of the checkpoint's mean-pooled embeddings of the
  question and of the passage (the sentence-transformers recipe these checkpoints were trained for),
  calibrated on the dev split.

Calibration: logits [0, a * s + b] with (a, b) fitted by logistic regression of the dev labels on the
scores s, so that softmax gives calibrated probabilities (the soft loss needs a sensible scale).
"""
import collections
import functools
import gzip
import hashlib
import json
import math
import os
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkdm_jax.errors import UserError

KINDS = ('checkpoint', 'biencoder', 'scores', 'overlap')
OVERLAP_WEIGHTS = ('count', 'idf')
# Hand-written (a dozen function words; the baseline needs no NLP library): words that say nothing about
# whether a passage answers a question.
STOP_WORDS = frozenset('a an and are as at be by did do does for from how in is it of on or the to was were what '
                       'when where which who whom why with'.split())


def parse_spec(spec: str) -> tuple[str, str]:
  """(kind, source) of a teacher spec: 'biencoder:NAME', 'scores:FILE', 'overlap:count|idf', else a checkpoint
  to fine-tune."""
  kind, sep, source = spec.partition(':')
  if sep and kind in ('biencoder', 'scores'):
    if not source:
      raise UserError(f'teacher {spec!r}: give a checkpoint or file after {kind}:')
    return kind, source
  if kind == 'overlap':
    if source not in OVERLAP_WEIGHTS:
      raise UserError(f'teacher {spec!r}: expected overlap:count or overlap:idf')
    return kind, source
  return 'checkpoint', spec


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


def fit_calibration(scores, labels, steps=500):
  """(a, b) of the logistic regression P(y=1) = sigmoid(a * s + b) on labelled rows (labels >= 0).

  Scores are standardised first so one Adam learning rate suits any scale (hand-written: two parameters
  need no training loop or extra dependency)."""
  keep = np.asarray(labels) >= 0
  s, y = np.asarray(scores, np.float64)[keep], np.asarray(labels)[keep]
  if len(np.unique(y)) < 2:
    raise UserError('calibrating a teacher\'s scores needs dev rows of both classes')
  mean, std = s.mean(), s.std() or 1.0
  z, y = jnp.asarray((s - mean) / std, jnp.float32), jnp.asarray(y, jnp.float32)
  loss = lambda p: optax.sigmoid_binary_cross_entropy(p[0] * z + p[1], y).mean()
  optimizer = optax.adam(0.1)

  @jax.jit
  def fit(p):
    def step(carry, _):
      p, state = carry
      updates, state = optimizer.update(jax.grad(loss)(p), state)
      return (optax.apply_updates(p, updates), state), None
    return jax.lax.scan(step, (p, optimizer.init(p)), None, length=steps)[0][0]

  a, b = np.asarray(fit(jnp.array([1.0, 0.0], jnp.float32)), np.float64)
  return float(a / std), float(b - a * mean / std)


def calibrated_logits(scores, a, b):
  """Two-class logits [N, 2] = [0, a * s + b]."""
  s = np.asarray(scores, np.float64)
  return np.stack([np.zeros_like(s), a * s + b], axis=1).astype(np.float32)


def mean_pooled_cosines(embed, tokenizer, text_a, text_b, max_length, batch_size=64):
  """Cosine of the mean-pooled embeddings of text_a[i] and text_b[i], each distinct text encoded once.

  embed(ids [B, L], mask [B, L]) -> token states [B, L, D] (e.g. a jitted encoder apply)."""
  texts = sorted(set(text_a) | set(text_b))
  tok = tokenizer.__class__.from_str(tokenizer.to_str())
  tok.no_padding()
  tok.enable_truncation(max_length)
  tokens = [e.ids for e in tok.encode_batch(texts)]
  by_length = np.argsort([len(t) for t in tokens], kind='stable')
  vectors = None
  for start in range(0, len(texts), batch_size):
    rows = by_length[start:start + batch_size]
    width = -(-len(tokens[rows[-1]]) // 16) * 16  # the longest, rounded up: few shapes to compile
    ids, mask = np.zeros((2, batch_size, width), np.int32)
    mask[:, 0] = 1  # filler rows past the last text stay finite and are dropped
    for i, row in enumerate(rows):
      ids[i, :len(tokens[row])], mask[i, :len(tokens[row])] = tokens[row], 1
    hidden = np.asarray(embed(ids, mask), np.float32)[:len(rows)]
    real = mask[:len(rows), :, None]
    mean = (hidden * real).sum(1) / real.sum(1)
    if vectors is None:
      vectors = np.zeros((len(texts), mean.shape[1]), np.float32)
    vectors[rows] = mean / np.linalg.norm(mean, axis=1, keepdims=True)
  index = {text: i for i, text in enumerate(texts)}
  embedded = lambda column: vectors[[index[text] for text in column]]
  return np.sum(embedded(text_a) * embedded(text_b), axis=1)


def _words(text):
  return set(re.findall(r'\w+', text.lower())) - STOP_WORDS


def word_overlap_scorer(weight: str, passages):
  """(text_a, text_b) -> per pair, the question's distinct non-stop words found in the passage, counted
  (`count`) or weighted by their IDF log(N / df) over the distinct `passages` (`idf`; the table is built once
  here). Passages of text_b missing from `passages` join the table on the call that scores them."""
  documents = set(passages)
  frequency = collections.Counter(w for passage in documents for w in _words(passage))

  def scores(text_a, text_b):
    new = set(text_b) - documents
    table = frequency + collections.Counter(w for passage in new for w in _words(passage)) if new else frequency
    n = len(documents) + len(new)
    value = (lambda w: 1.0) if weight == 'count' else (lambda w: math.log(n / table[w]))
    return np.array([sum(value(w) for w in _words(a) & _words(b)) for a, b in zip(text_a, text_b)], np.float64)
  return scores


def word_overlap_scores(text_a, text_b, weight: str, passages) -> np.ndarray:
  """Word-overlap scores of the pairs (see word_overlap_scorer), IDF over `passages` and text_b."""
  return word_overlap_scorer(weight, passages)(text_a, text_b)
