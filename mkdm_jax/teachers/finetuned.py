"""A checkpoint fine-tuned here as a cross-encoder teacher (the paper's teachers)."""
import functools

import numpy as np

from mkdm_jax import predictions, saved_model, train
from mkdm_jax.errors import UserError
from mkdm_jax.models import count_params, factory
from mkdm_jax.teachers.base import Teacher, cached_fingerprint


class FineTuned(Teacher):
  """Fine-tuned from `source` (a checkpoint name/folder, or 'random') on the run's training rows with its own seed,
  learning rate and batch size; its saved model predicts the logits, runs inside the train step with
  --online_teachers, and scores prepared corpora."""
  kind = 'checkpoint'
  trains = runs_online = scores_corpus = True

  def __init__(self, index, source, directory, find_tokenizer, *, seed, learning_rate, batch_size):
    super().__init__(index, source, directory, find_tokenizer)
    self.seed, self.learning_rate, self.batch_size = seed, learning_rate, batch_size

  @property
  def spec(self):
    return self.source

  def init_model(self, num_classes, options):
    """(model, initial params) to fine-tune: the checkpoint's encoder and a new head."""
    return factory.teacher(self.source, num_classes, self.seed, options)

  @functools.cache
  def saved(self):
    """(model, params) of the trained teacher, loaded once."""
    if not train.is_complete(self.directory):
      raise UserError(f'teacher {self.directory} is not trained yet: run the teachers stage first')
    return saved_model.load(self.directory)[:2]

  def fingerprint(self):
    """A hash of its final parameters."""
    return cached_fingerprint(self.directory, lambda: self.saved()[1])

  def logits(self, ctx, dataset, rows):
    model, params = self.saved()
    encoded = ctx.encoded(self.tokenizer_dir, dataset).select(rows)
    return train.predict(model, params, encoded, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size,
                         desc=f'{self.name}.{dataset}' if ctx.cfg.progress else None)['logits']

  def corpus_logits(self, ctx, rows, shards):
    model, params = self.saved()
    return predictions.corpus_logits(model, params, rows, shards, batch_size=ctx.cfg.eval_batch_size,
                                     progress=ctx.cfg.progress, desc=f'{self.name}.corpus')

  def scorer(self, ctx, count):
    model, params = self.saved()
    encoded = ctx.encoded(self.tokenizer_dir, 'eval').select(np.arange(count))
    return lambda: train.predict(model, params, encoded, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size)

  def report_fields(self):
    return {'params': count_params(self.saved()[1]),
            'train_seconds': saved_model.read_spec(self.directory).get('train_seconds')}

  def save_threshold(self, threshold):
    saved_model.update_spec(self.directory, threshold=threshold)
