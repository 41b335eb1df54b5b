"""BiLSTM student encoder: embeddings, one bidirectional LSTM layer, masked mean+max pooling.

Inputs are left-aligned (`[CLS] q [SEP] p [SEP] pad...`); `seq_lengths` from the attention mask make
both directions ignore padding, so appending padding never changes the outputs.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mkdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BiLSTMConfig:
  """Architecture of the BiLSTM encoder (embed_dim 384 = MiniLM word-embedding width)."""
  vocab_size: int = 30522
  embed_dim: int = 384
  hidden_size: int = 256
  type_vocab_size: int = 2
  dropout: float = 0.1


class BiLSTMEncoder(nn.Module):
  """Returns {'sequence': [B, L, 2h], 'pooled': [B, 2h]}.

  pooled = tanh(dense([masked mean; masked max] of the BiLSTM outputs)), width 2 * hidden_size.
  """
  config: BiLSTMConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.embed_dim, embedding_init=nn.initializers.normal(0.02),
                                     name=name)
    x = (embed(cfg.vocab_size, 'word_embeddings')(input_ids)
         + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)).astype(self.dtype)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    mask = attention_mask.astype(bool)
    lstm = lambda name: nn.RNN(nn.OptimizedLSTMCell(cfg.hidden_size, dtype=self.dtype), name=name)
    bilstm = nn.Bidirectional(lstm('forward'), lstm('backward'), name='bilstm')
    seq = bilstm(x, seq_lengths=mask.sum(-1)).astype(jnp.float32)
    m = mask[..., None]
    mean = jnp.where(m, seq, 0.).sum(1) / jnp.maximum(m.sum(1), 1)
    mx = jnp.where(m, seq, jnp.finfo(jnp.float32).min).max(1)
    feature = nn.Dense(2 * cfg.hidden_size, dtype=self.dtype, name='feature')
    pooled = jnp.tanh(feature(jnp.concatenate([mean, mx], -1).astype(self.dtype)))
    return {'sequence': seq, 'pooled': pooled}


def bilstm_embeddings_from_bert(bilstm_params, bert_encoder_params):
  """Returns a copy of Classifier params (BiLSTM encoder) whose word embeddings come from BERT.

  Widths must match: set BiLSTMConfig.embed_dim to the BERT hidden_size (384 for MiniLM) and
  vocab_size to the BERT vocabulary size; there is no learned projection.
  """
  bert = bert_encoder_params['embeddings']['word_embeddings']['embedding']
  ours = bilstm_params['encoder']['word_embeddings']['embedding']
  if tuple(bert.shape) != tuple(ours.shape):
    raise UserError(f'BiLSTM embeddings from BERT: BERT word embeddings are {tuple(bert.shape)} but the '
                    f'BiLSTM expects {tuple(ours.shape)} (vocab_size, embed_dim); set BiLSTMConfig '
                    f'vocab_size={bert.shape[0]}, embed_dim={bert.shape[1]}.')
  encoder = dict(bilstm_params['encoder'])
  encoder['word_embeddings'] = {'embedding': jnp.asarray(bert, jnp.float32)}
  return {**bilstm_params, 'encoder': encoder}
