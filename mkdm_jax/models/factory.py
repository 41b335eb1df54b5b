"""The one place that builds teacher and student classifiers with their initial parameters.

Used by the pipeline (training), the benchmarks and, through `saved_model`, evaluation and export.
Checkpoints are named as `resolve_checkpoint` understands them, or 'random' for a randomly
initialised BERT of the given `random_shape` (layers, hidden, heads, intermediate).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig
from mkdm_jax.models.bilstm import BiLSTMConfig, bilstm_embeddings_from_bert
from mkdm_jax.models.checkpoints import cut_bottom_layers, load_hf_bert, resolve_checkpoint
from mkdm_jax.models.classifier import Classifier

STUDENT_PATTERN = r'bert\d+|bilstm'


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Settings shared by every model of a run."""
  dtype: str = 'float32'  # compute dtype; params stay float32
  random_shape: tuple[int, int, int, int] = (2, 64, 2, 128)  # layers, hidden, heads, intermediate
  max_length: int = 128
  bilstm_hidden: int = 256
  allow_pickle: bool = False


def random_bert_config(options: ModelOptions, num_layers=None) -> BertConfig:
  layers, hidden, heads, intermediate = options.random_shape
  return BertConfig(num_layers=num_layers or layers, hidden_size=hidden, num_attention_heads=heads,
                    intermediate_size=intermediate,
                    max_position_embeddings=max(options.max_length, 128))


@functools.lru_cache(maxsize=4)
def _load_checkpoint(name, allow_pickle):
  return load_hf_bert(resolve_checkpoint(name), allow_pickle=allow_pickle)


def load_encoder(checkpoint, options: ModelOptions):
  """(BertConfig, encoder params) of a checkpoint, or (random config, None) for 'random'."""
  if checkpoint == 'random':
    return random_bert_config(options), None
  return _load_checkpoint(checkpoint, options.allow_pickle)


def encoder_config(checkpoint, options: ModelOptions) -> BertConfig:
  """The architecture of a checkpoint without keeping its weights (for up-front checks)."""
  return load_encoder(checkpoint, options)[0]


def init_params(model: Classifier, seed: int, encoder_params=None):
  """Random init of a classifier (host numpy), the encoder replaced by pretrained weights if given."""
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = jax.tree.map(np.asarray, model.init(jax.random.PRNGKey(seed), dummy, dummy,
                                               jnp.ones_like(dummy))['params'])
  if encoder_params is not None:
    params = {**params, 'encoder': encoder_params}
  return params


def teacher(checkpoint, num_classes, seed, options: ModelOptions):
  """A one-head teacher classifier on a checkpoint, and its initial params."""
  config, encoder_params = load_encoder(checkpoint, options)
  model = Classifier(config, num_classes=num_classes, dtype=jnp.dtype(options.dtype))
  return model, init_params(model, seed, encoder_params)


def student(arch, checkpoint, num_classes, num_heads, seed, options: ModelOptions, combine='mean'):
  """A student classifier and its initial params.

  'bert<k>': the bottom k layers of `checkpoint` (a random k-layer BERT for 'random');
  'bilstm': a BiLSTM whose word embeddings come from `checkpoint`.
  """
  if not re.fullmatch(STUDENT_PATTERN, arch):
    raise UserError(f'student {arch!r}: expected bert<k> (e.g. bert3) or bilstm')
  config, encoder_params = load_encoder(checkpoint, options)
  dtype = jnp.dtype(options.dtype)
  if arch == 'bilstm':
    lstm = BiLSTMConfig(vocab_size=config.vocab_size, embed_dim=config.hidden_size,
                        hidden_size=options.bilstm_hidden)
    model = Classifier(lstm, num_classes, num_heads, combine, dtype)
    params = init_params(model, seed)
    if encoder_params is not None:
      params = jax.tree.map(np.asarray, bilstm_embeddings_from_bert(params, encoder_params))
    return model, params
  k = int(arch[len('bert'):])
  if encoder_params is None:
    config = random_bert_config(options, k)
  else:
    config, encoder_params = cut_bottom_layers(config, encoder_params, k)
  model = Classifier(config, num_classes, num_heads, combine, dtype)
  return model, init_params(model, seed, encoder_params)
