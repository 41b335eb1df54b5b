"""What every teacher kind has: its place in the run, what it can do, and scalar-score calibration.

A teacher gives per-row logits [N, C] for the logit store (`mkdm_jax.teacher_logits` writes them once, keyed by
row) and enters the same soft loss whatever its kind. The pipeline asks a teacher what it can do (`trains`,
`runs_online`, `scores_corpus`) and never branches on its kind.

Calibration of scalar scores (bi-encoder cosines, word overlap, imported scores): logits [0, a * s + b] with (a, b)
fitted by logistic regression of the dev labels on the scores s, so that softmax gives calibrated probabilities
(the soft loss needs a sensible scale).
"""
import functools
import hashlib
import logging
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)


class Teacher:
  """One teacher of a run, built once from its spec (`mkdm_jax.teachers.build`).

  kind: the spec's kind, for reports; source: checkpoint name/folder, scores file or overlap weighting;
  directory: where it keeps what it saves (`<shared_dir>/teachers/teacher_<i>`); find_tokenizer: () -> the
  tokenizer folder of the model it runs (resolved on first use: a hub checkpoint downloads), or None.
  """
  kind = ''
  trains = False  # fine-tuned by the teachers stage
  runs_online = False  # can run inside the train step (--online_teachers)
  scores_corpus = False  # can score a prepared --unlabelled_corpus shard by shard
  calibrated = False  # two-class scalar scores calibrated on the dev split

  def __init__(self, index: int, source: str, directory: pathlib.Path, find_tokenizer=None):
    self.index, self.source, self.directory, self._find_tokenizer = index, source, directory, find_tokenizer

  @functools.cached_property
  def tokenizer_dir(self) -> pathlib.Path | None:
    return self._find_tokenizer() if self._find_tokenizer else None

  @property
  def name(self) -> str:
    return self.directory.name

  @property
  def spec(self) -> str:
    return f'{self.kind}:{self.source}'

  def check(self):
    """Raises UserError when the teacher cannot serve as given (e.g. a missing file)."""

  def fingerprint(self) -> str:
    """Everything its logits depend on (the logit store's staleness key)."""
    raise NotImplementedError

  def logits(self, ctx, dataset: str, rows: np.ndarray) -> np.ndarray:
    """[len(rows), C] logits of rows `rows` (indices) of `ctx.examples[dataset]`."""
    raise NotImplementedError

  def corpus_logits(self, ctx, rows, shards):
    """(shard, [rows of the shard, C] logits) for each of `shards` of the prepared corpus `rows`
    (`ctx.teacher_corpus(self)`); teachers with `scores_corpus` only."""
    raise NotImplementedError

  def scorer(self, ctx, count: int):
    """A callable scoring the first `count` eval rows as the teacher does at inference (timed by the evaluate
    stage), or None where nothing runs (imported scores)."""
    return None

  def report_fields(self) -> dict:
    """Fields of its results row besides metrics: parameters, and training time where it trains."""
    return {'params': None}

  def save_threshold(self, threshold):
    """Keeps the dev-tuned threshold with the saved model (teachers with a saved model only)."""


class Calibrated(Teacher):
  """A teacher with a scalar score per pair (`scores(ctx, dataset)`), calibrated on dev into two-class logits."""
  calibrated = True

  def __init__(self, *args, **kwargs):
    super().__init__(*args, **kwargs)
    self._fit = None  # (a, b) of the dev calibration
    self._set_logits = {}  # dataset -> calibrated logits of the whole set

  def score_pairs(self, ctx, text_a, text_b) -> np.ndarray:
    """Scalar scores of the pairs (text_a[i], text_b[i])."""
    raise NotImplementedError

  def scores(self, ctx, dataset: str) -> np.ndarray:
    examples = ctx.examples[dataset]
    return self.score_pairs(ctx, examples.text_a, examples.text_b)

  def scorer(self, ctx, count):
    rows = ctx.examples['eval'].select(np.arange(count))
    return lambda: self.score_pairs(ctx, rows.text_a, rows.text_b)

  def logits(self, ctx, dataset, rows):
    # Scored over whole sets (cached): scores do not depend on which rows a set shares with another.
    if dataset not in self._set_logits:
      self._set_logits[dataset] = self.calibrate(ctx, self.scores(ctx, dataset))
    return self._set_logits[dataset][rows]

  def calibrate(self, ctx, scores):
    """Two-class logits of scalar `scores` with the calibration fitted on dev (once)."""
    if 'dev' not in ctx.examples:
      raise UserError(f'{self.name} ({self.spec}) gives scalar scores, which are calibrated on the dev split: '
                      'give a --dev_split')
    if self._fit is None:
      self._fit = fit_calibration(self.scores(ctx, 'dev'), ctx.examples['dev'].labels)
      log.info('%s: calibrated on dev: logit = %.4g * score + %.4g', self.name, *self._fit)
    return calibrated_logits(scores, *self._fit)


def params_fingerprint(params) -> str:
  digest = hashlib.sha256()
  for leaf in jax.tree.leaves(params):
    digest.update(np.ascontiguousarray(leaf).tobytes())
  return digest.hexdigest()[:16]


def cached_fingerprint(directory: pathlib.Path, params_of) -> str:
  """The hash of `params_of()`, computed once and kept in `<directory>/fingerprint`."""
  path = directory / 'fingerprint'
  if not path.exists():
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(params_fingerprint(params_of()))
  return path.read_text()


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
