"""A zero-shot bi-encoder teacher: the cosine of a checkpoint's mean-pooled embeddings of question and passage (the
sentence-transformers recipe these checkpoints were trained for), calibrated on dev."""
import functools

import jax
import jax.numpy as jnp
import numpy as np

from mkdm_jax.models import count_params, factory, load_tokenizer
from mkdm_jax.teachers.base import Calibrated, cached_fingerprint


class BiEncoder(Calibrated):
  kind = 'biencoder'

  def __init__(self, index, source, directory, find_tokenizer, *, options):
    super().__init__(index, source, directory, find_tokenizer)
    self.options = options

  @functools.cache
  def encoder(self):
    """(encoder config, params) of the checkpoint, loaded once."""
    return factory.load_encoder(self.source, self.options)

  def fingerprint(self):
    """A hash of the encoder's parameters."""
    return cached_fingerprint(self.directory, lambda: self.encoder()[1])

  @functools.cache
  def _embed(self):
    config, params = self.encoder()
    module = factory.encoder_module(config)
    return jax.jit(lambda ids, mask: module.apply({'params': params}, ids, jnp.zeros_like(ids), mask)['sequence'])

  def score_pairs(self, ctx, text_a, text_b):
    return mean_pooled_cosines(self._embed(), load_tokenizer(self.tokenizer_dir), text_a, text_b,
                               ctx.cfg.max_length, ctx.cfg.eval_batch_size)

  def report_fields(self):
    return {'params': count_params(self.encoder()[1])}


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
