"""BERT encoder (HF `BertModel` compatible: post-LN, exact GELU, tanh pooler) in flax.linen.

Param names of the encoder subtree (HF names in brackets, see `checkpoints.py` for the mapping):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/norm
  layer_{i}/attention/{query,key,value,output}  [encoder.layer.i.attention.self.*, .attention.output.dense]
  layer_{i}/attention_norm                      [encoder.layer.i.attention.output.LayerNorm]
  layer_{i}/intermediate, layer_{i}/output      [encoder.layer.i.intermediate.dense, .output.dense]
  layer_{i}/output_norm                         [encoder.layer.i.output.LayerNorm]
  pooler                                        [pooler.dense]
"""
import dataclasses
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from mkdm_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (defaults: MiniLM-L6-H384)."""
  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_attention_heads: int = 12
  intermediate_size: int = 1536
  max_position_embeddings: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(f'BertConfig: hidden_size={self.hidden_size} is not divisible by '
                      f'num_attention_heads={self.num_attention_heads}.')

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> 'BertConfig':
    """Reads an HF BERT config.json dict; rejects variants this encoder does not implement."""
    act = d.get('hidden_act', 'gelu')
    pos = d.get('position_embedding_type', 'absolute')
    if d.get('model_type', 'bert') != 'bert' or act != 'gelu' or pos != 'absolute':
      raise UserError(f"config.json: only BERT with hidden_act='gelu' and absolute position embeddings is "
                      f"supported, got model_type={d.get('model_type')!r}, hidden_act={act!r}, "
                      f'position_embedding_type={pos!r}.')
    try:
      return cls(
          vocab_size=d['vocab_size'], hidden_size=d['hidden_size'], num_layers=d['num_hidden_layers'],
          num_attention_heads=d['num_attention_heads'], intermediate_size=d['intermediate_size'],
          max_position_embeddings=d['max_position_embeddings'], type_vocab_size=d['type_vocab_size'],
          layer_norm_eps=d.get('layer_norm_eps', 1e-12),
          hidden_dropout=d.get('hidden_dropout_prob', 0.1),
          attention_dropout=d.get('attention_probs_dropout_prob', 0.1))
    except KeyError as e:
      raise UserError(f'config.json: missing BERT field {e}.') from None

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF BERT config.json dict (model_type 'bert')."""
    return {
        'model_type': 'bert', 'vocab_size': self.vocab_size, 'hidden_size': self.hidden_size,
        'num_hidden_layers': self.num_layers, 'num_attention_heads': self.num_attention_heads,
        'intermediate_size': self.intermediate_size, 'hidden_act': 'gelu',
        'max_position_embeddings': self.max_position_embeddings, 'type_vocab_size': self.type_vocab_size,
        'layer_norm_eps': self.layer_norm_eps, 'hidden_dropout_prob': self.hidden_dropout,
        'attention_probs_dropout_prob': self.attention_dropout, 'initializer_range': 0.02,
        'position_embedding_type': 'absolute', 'pad_token_id': 0,
    }


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention plus output projection; softmax in fp32."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.config
    b, l, d = x.shape
    h = cfg.num_attention_heads
    split = lambda t: t.reshape(b, l, h, d // h)
    q = split(_dense(d, self.dtype, 'query')(x))
    k = split(_dense(d, self.dtype, 'key')(x))
    v = split(_dense(d, self.dtype, 'value')(x))
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k).astype(jnp.float32) * (d // h) ** -0.5
    scores = jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min)
    probs = nn.softmax(scores, axis=-1)
    dropped = nn.Dropout(cfg.attention_dropout)(probs.astype(self.dtype), deterministic=deterministic)
    ctx = jnp.einsum('bhqk,bkhd->bqhd', dropped, v).reshape(b, l, d)
    return _dense(d, self.dtype, 'output')(ctx), probs


class BertLayer(nn.Module):
  """One post-LN transformer layer."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    drop = lambda t: nn.Dropout(cfg.hidden_dropout)(t, deterministic=deterministic)
    attn, probs = BertSelfAttention(cfg, self.dtype, name='attention')(x, mask, deterministic)
    x = norm('attention_norm')(x + drop(attn))
    y = nn.gelu(_dense(cfg.intermediate_size, self.dtype, 'intermediate')(x), approximate=False)
    y = _dense(cfg.hidden_size, self.dtype, 'output')(y)
    return norm('output_norm')(x + drop(y)), probs


class BertEmbeddings(nn.Module):
  """Word + position + token-type embeddings, LayerNorm, dropout."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, deterministic):
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                                     name=name)
    positions = jnp.arange(input_ids.shape[1])[None, :]
    x = (embed(cfg.vocab_size, 'word_embeddings')(input_ids)
         + embed(cfg.max_position_embeddings, 'position_embeddings')(positions)
         + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids))
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='norm')(x)
    return nn.Dropout(cfg.hidden_dropout)(x, deterministic=deterministic)


class BertEncoder(nn.Module):
  """BERT encoder with HF pooler: returns a dict with 'sequence', 'pooled', 'hidden_states', 'attentions'.

  `hidden_states` is the embeddings output then each layer's output; `attentions` holds fp32
  attention probabilities [B, heads, L, L] per layer (before attention dropout).
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    cfg = self.config
    mask = attention_mask.astype(bool)
    x = BertEmbeddings(cfg, self.dtype, name='embeddings')(input_ids, token_type_ids, deterministic)
    hidden_states, attentions = [x], []
    for i in range(cfg.num_layers):
      x, probs = BertLayer(cfg, self.dtype, name=f'layer_{i}')(x, mask, deterministic)
      hidden_states.append(x)
      attentions.append(probs)
    pooled = jnp.tanh(_dense(cfg.hidden_size, self.dtype, 'pooler')(x[:, 0]))
    return {'sequence': x, 'pooled': pooled, 'hidden_states': tuple(hidden_states),
            'attentions': tuple(attentions)}
