"""BiLSTM student encoder: embeddings, one bidirectional LSTM layer, masked mean+max pooling.

Inputs are left-aligned (`[CLS] q [SEP] p [SEP] pad...`); the attention mask makes both directions
ignore padding, so appending padding never changes the pooled output.
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import Dropout


@dataclasses.dataclass(frozen=True)
class BiLSTMConfig:
  """Architecture of the BiLSTM encoder (embed_dim 384 = MiniLM word-embedding width)."""
  vocab_size: int = 30522
  embed_dim: int = 384
  hidden_size: int = 256
  type_vocab_size: int = 2
  dropout: float = 0.1


class _GateParams(nn.Module):
  """One gate's kernel [fan_in, features] (and bias), named like flax.linen.Dense params."""
  fan_in: int
  features: int
  kernel_init: Any
  use_bias: bool

  @nn.compact
  def __call__(self):
    kernel = self.param('kernel', self.kernel_init, (self.fan_in, self.features))
    return kernel, self.param('bias', nn.initializers.zeros, (self.features,)) if self.use_bias else None


class _LSTMParams(nn.Module):
  """One direction's weights under flax OptimizedLSTMCell's names and initialisers.

  Returns the gate-concatenated (order i, f, g, o) input kernel [E, 4h], recurrent kernel [h, 4h]
  and recurrent bias [4h].
  """
  embed_dim: int
  hidden_size: int

  @nn.compact
  def __call__(self):
    h = self.hidden_size
    inputs = [_GateParams(self.embed_dim, h, nn.initializers.lecun_normal(), False, name=f'i{g}')()[0]
              for g in 'ifgo']
    recurrent = [_GateParams(h, h, nn.initializers.orthogonal(), True, name=f'h{g}')() for g in 'ifgo']
    return (jnp.concatenate(inputs, -1), jnp.concatenate([k for k, _ in recurrent], -1),
            jnp.concatenate([b for _, b in recurrent], -1))


class BiLSTMEncoder(nn.Module):
  """Returns {'sequence': [B, L, 2h], 'pooled': [B, 2h]}.

  pooled = tanh(dense([masked mean; masked max] of the BiLSTM outputs)), width 2 * hidden_size.
  The LSTM is flax's OptimizedLSTMCell (same params, `OptimizedLSTMCell_0` forward, `_1` backward)
  computed faster: one scan steps both directions together, one batched dot per step on [x_t; h]
  (hoisting the input projections out of the scan, the cuDNN recipe, measured 1.1-1.7x slower here).
  The scan skips (lax.cond) the steps past the batch's longest row, so a bucketed or fixed-length
  batch costs what its longest row needs. The backward direction runs over reversed time from that
  row's end and keeps its zero state through each shorter row's trailing padding, so it starts at
  the row's last real token.
  Outputs at padding positions are not meaningful (pooling masks them).
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
    x = Dropout(cfg.dropout)(x, deterministic)
    mask = jnp.asarray(attention_mask, bool)
    directions = [_LSTMParams(cfg.embed_dim, cfg.hidden_size, name=f'OptimizedLSTMCell_{i}')()
                  for i in range(2)]
    # Per direction one kernel [E + h, 4h] on [x_t; h_{t-1}]: one batched dot per step for both.
    kernel = jnp.stack([jnp.concatenate([w_in, w_rec]) for w_in, w_rec, _ in directions])
    kernel = kernel.astype(self.dtype)  # [2, E + h, 4h]
    bias = jnp.stack([b for _, _, b in directions])[:, None].astype(jnp.float32)  # [2, 1, 4h]
    (batch, length), hidden = mask.shape, cfg.hidden_size
    steps = jnp.where(mask, jnp.arange(length) + 1, 0).max()  # past the longest row all is padding

    def step(carry, t):
      """Forward direction at position t, backward direction at position steps - 1 - t."""
      c, h = carry
      inputs = jnp.stack([x[:, t], x[:, steps - 1 - t]])  # [2, B, E]
      real = jnp.stack([mask[:, t], mask[:, steps - 1 - t]])[..., None]
      z = jnp.einsum('dbk,dkn->dbn', jnp.concatenate([inputs, h.astype(self.dtype)], -1), kernel) + bias
      i, f, g, o = jnp.split(z.astype(jnp.float32), 4, axis=-1)
      new_c = nn.sigmoid(f) * c + nn.sigmoid(i) * jnp.tanh(g)
      new_h = nn.sigmoid(o) * jnp.tanh(new_c)
      return jnp.where(real, new_c, c), jnp.where(real, new_h, h)

    def maybe_step(carry, t):  # steps past the longest row are skipped (at run time: lax.cond)
      carry = jax.lax.cond(t < steps, step, lambda carry, t: carry, carry, t)
      return carry, carry[1]

    zeros = jnp.zeros((2, batch, hidden), jnp.float32)
    _, outs = jax.lax.scan(maybe_step, (zeros, zeros), jnp.arange(length))  # [L, 2, B, h]
    backward = jnp.take(outs[:, 1], (steps - 1 - jnp.arange(length)) % length, axis=0)
    seq = jnp.concatenate([outs[:, 0], backward], -1)  # time-major [L, B, 2h]
    m = mask.T[..., None]
    mean = jnp.where(m, seq, 0.).sum(0) / jnp.maximum(m.sum(0), 1)
    mx = jnp.where(m, seq, jnp.finfo(jnp.float32).min).max(0)
    feature = nn.Dense(2 * cfg.hidden_size, dtype=self.dtype, name='feature')
    pooled = jnp.tanh(feature(jnp.concatenate([mean, mx], -1).astype(self.dtype)))
    return {'sequence': seq.transpose(1, 0, 2), 'pooled': pooled}


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
