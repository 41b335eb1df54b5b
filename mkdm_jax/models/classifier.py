"""Sequence-pair classifier: a BERT, RoBERTa, MPNet or BiLSTM encoder plus N linear heads on its pooled
feature."""
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig, BertEncoder, Dropout, RobertaConfig
from mkdm_jax.models.bilstm import BiLSTMConfig, BiLSTMEncoder
from mkdm_jax.models.mpnet import MPNetConfig, MPNetEncoder

COMBINE_MODES = ('mean', 'learned')
# Encoder kinds, as model.json and student names ('bert3', 'mpnet3') spell them: (config class, module).
ENCODERS = {'bert': (BertConfig, BertEncoder), 'roberta': (RobertaConfig, BertEncoder),
            'mpnet': (MPNetConfig, MPNetEncoder), 'bilstm': (BiLSTMConfig, BiLSTMEncoder)}


def encoder_kind(config) -> str:
  """'bert', 'roberta', 'mpnet' or 'bilstm': the kind of an encoder config."""
  for kind, (config_cls, _) in ENCODERS.items():
    if type(config) is config_cls:  # not isinstance: RobertaConfig is a BertConfig
      return kind
  raise UserError(f'{type(config).__name__}: not an encoder config ({", ".join(ENCODERS)}).')


class Classifier(nn.Module):
  """Encoder + `num_heads` linear heads (one per teacher in MKDM) combined into one prediction.

  combine='mean': logits = mean of head logits; 'learned': softmax-normalised learned weights
  over heads (param 'combine_weights', initialised uniform). `dtype` is the compute dtype; params
  are fp32 and the heads run in fp32.

  head_layers = k > 0 (transformer encoders): each head has its own copy of the encoder's top k layers and pooler
  on the shared bottom layers (CERBERUS-style layer heads; the heads can then rank differently), k = 0: linear
  heads on one pooled vector.

  Returns {'head_logits': [B, H, C], 'logits': [B, C]} (fp32); with output_hidden_states and a
  transformer encoder also 'hidden_states' (embeddings, then each layer; in `dtype`) and 'attentions' (fp32).
  """
  encoder: BertConfig | RobertaConfig | MPNetConfig | BiLSTMConfig
  num_classes: int
  num_heads: int = 1
  combine: str = 'mean'
  dtype: Any = jnp.float32
  head_layers: int = 0

  @property
  def padding_invariant(self) -> bool:
    """Whether a row's logits are bitwise the same however far it is padded: true of the transformers (masked
    keys add exact zeros), not of the BiLSTM (its scans' sums change in the last bits)."""
    return encoder_kind(self.encoder) != 'bilstm'

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic: bool = True,
               output_hidden_states: bool = False):
    if self.combine not in COMBINE_MODES:
      raise UserError(f'Classifier: combine={self.combine!r}, expected one of {COMBINE_MODES}.')
    if self.num_heads < 1 or self.num_classes < 1:
      raise UserError(f'Classifier: num_heads={self.num_heads} and num_classes={self.num_classes} '
                      'must both be >= 1.')
    kind = encoder_kind(self.encoder)
    if self.head_layers and (kind == 'bilstm' or not 0 < self.head_layers < self.encoder.num_layers):
      raise UserError(f'Classifier: head_layers={self.head_layers} needs a transformer encoder with more layers '
                      f'({kind}, {getattr(self.encoder, "num_layers", 0)} layers): the heads share the layers below.')
    branches = dict(branch_layers=self.head_layers, branches=self.num_heads) if self.head_layers else {}
    enc = ENCODERS[kind][1](self.encoder, self.dtype, name='encoder', **branches)
    dropout = self.encoder.dropout if kind == 'bilstm' else self.encoder.hidden_dropout
    out = enc(input_ids, token_type_ids, attention_mask, deterministic=deterministic)
    x = Dropout(dropout)(out['pooled'], deterministic).astype(jnp.float32)  # [B, D], or [B, H, D] per head
    head_logits = Heads(self.num_heads, self.num_classes, name='heads')(x)
    if self.combine == 'learned':
      w = nn.softmax(self.param('combine_weights', nn.initializers.zeros, (self.num_heads,)))
    else:
      w = jnp.full((self.num_heads,), 1.0 / self.num_heads)
    result = {'head_logits': head_logits, 'logits': jnp.einsum('h,bhc->bc', w, head_logits)}
    if output_hidden_states and 'hidden_states' in out:
      result['hidden_states'] = out['hidden_states']
      result['attentions'] = out['attentions']
    return result


class Heads(nn.Module):
  """`num_heads` linear heads as one kernel [H, D, C] and bias [H, C], applied with one einsum (to one pooled
  vector [B, D], or head h to its own [B, H, D] row h)."""
  num_heads: int
  num_classes: int

  @nn.compact
  def __call__(self, x):
    kernel = self.param('kernel', nn.initializers.normal(0.02),
                        (self.num_heads, x.shape[-1], self.num_classes))
    bias = self.param('bias', nn.initializers.zeros, (self.num_heads, self.num_classes))
    return jnp.einsum('bhd,hdc->bhc' if x.ndim == 3 else 'bd,hdc->bhc', x, kernel) + bias


def combination_weights(classifier: Classifier, params):
  """The weights [H] (summing to 1) with which `classifier` combines its head logits."""
  if classifier.combine == 'learned':
    return nn.softmax(jnp.asarray(params['combine_weights'], jnp.float32))
  return jnp.full((classifier.num_heads,), 1.0 / classifier.num_heads)
