"""MPNet encoder (HF `MPNetModel` compatible) in flax.linen, built from BERT's parts.

MPNet is BERT's post-LN transformer without token types, with positions counted past the padding
id, and with a relative-position bias (T5-style buckets, one learned scalar per bucket and head)
computed once per forward and added to every layer's attention scores.

Param names of the encoder subtree (HF names in brackets, see `hf_files.py` for the mapping):
  embeddings/{word,position}_embeddings/embedding, embeddings/norm
  relative_attention_bias/embedding             [encoder.relative_attention_bias]
  layer_{i}/attention/{query,key,value,output}  [encoder.layer.i.attention.attn.{q,k,v,o}]
  layer_{i}/attention_norm                      [encoder.layer.i.attention.LayerNorm]
  layer_{i}/intermediate, output, output_norm   (as BERT's) and pooler [pooler.dense]
"""
import dataclasses
import math
from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertEmbeddings, layers_and_pooler, padded_positions


@dataclasses.dataclass(frozen=True)
class MPNetConfig:
  """Architecture of an MPNet encoder (defaults: MPNet-base). Field names follow `BertConfig`."""
  MODEL_TYPE: ClassVar[str] = 'mpnet'  # HF config.json model_type
  vocab_size: int = 30527
  hidden_size: int = 768
  num_layers: int = 12
  num_attention_heads: int = 12
  intermediate_size: int = 3072
  max_position_embeddings: int = 514
  relative_attention_num_buckets: int = 32
  pad_token_id: int = 1
  layer_norm_eps: float = 1e-5
  hidden_dropout: float = 0.1
  attention_dropout: float = 0.1

  def __post_init__(self):
    if self.hidden_size % self.num_attention_heads:
      raise UserError(f'MPNetConfig: hidden_size={self.hidden_size} is not divisible by '
                      f'num_attention_heads={self.num_attention_heads}.')

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> 'MPNetConfig':
    """Reads an HF MPNet config.json dict; rejects variants this encoder does not implement."""
    act = d.get('hidden_act', 'gelu')
    if d.get('model_type') != cls.MODEL_TYPE or act != 'gelu':
      raise UserError(f"config.json: only MPNet with hidden_act='gelu' is supported, got "
                      f"model_type={d.get('model_type')!r}, hidden_act={act!r}.")
    try:
      return cls(
          vocab_size=d['vocab_size'], hidden_size=d['hidden_size'], num_layers=d['num_hidden_layers'],
          num_attention_heads=d['num_attention_heads'], intermediate_size=d['intermediate_size'],
          max_position_embeddings=d['max_position_embeddings'],
          relative_attention_num_buckets=d.get('relative_attention_num_buckets', 32),
          pad_token_id=d.get('pad_token_id', 1), layer_norm_eps=d.get('layer_norm_eps', 1e-12),
          hidden_dropout=d.get('hidden_dropout_prob', 0.1),
          attention_dropout=d.get('attention_probs_dropout_prob', 0.1))
    except KeyError as e:
      raise UserError(f'config.json: missing MPNet field {e}.') from None

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF MPNet config.json dict (model_type 'mpnet')."""
    return {
        'model_type': self.MODEL_TYPE, 'vocab_size': self.vocab_size, 'hidden_size': self.hidden_size,
        'num_hidden_layers': self.num_layers, 'num_attention_heads': self.num_attention_heads,
        'intermediate_size': self.intermediate_size, 'hidden_act': 'gelu',
        'max_position_embeddings': self.max_position_embeddings,
        'relative_attention_num_buckets': self.relative_attention_num_buckets,
        'layer_norm_eps': self.layer_norm_eps, 'hidden_dropout_prob': self.hidden_dropout,
        'attention_probs_dropout_prob': self.attention_dropout, 'initializer_range': 0.02,
        'pad_token_id': self.pad_token_id, 'bos_token_id': 0, 'eos_token_id': 2,
    }


def relative_position_buckets(length, num_buckets, max_distance=128) -> np.ndarray:
  """[L, L] bucket of key j for query i, exactly as HF MPNet's relative_position_bucket.

  Computed in numpy at trace time (the length is static), in float32 like PyTorch: its float32 log
  decides which bucket a distance near a boundary falls into.
  """
  n = np.arange(length)[:, None] - np.arange(length)[None, :]  # query minus key position
  half = num_buckets // 2
  exact = half // 2
  distance = np.abs(n)
  log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(exact))
  large = exact + (log_ratio / np.float32(math.log(max_distance / exact)) * np.float32(half - exact)
                   ).astype(np.int64)
  return (n < 0) * half + np.where(distance < exact, distance, np.minimum(large, half - 1))


class MPNetEncoder(nn.Module):
  """MPNet encoder with HF pooler; call signature and outputs as `BertEncoder` (token_type_ids ignored)."""
  config: MPNetConfig
  dtype: Any = jnp.float32
  branch_layers: int = 0  # top layers repeated per branch (bert.layers_and_pooler)
  branches: int = 1

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    cfg = self.config
    positions = padded_positions(attention_mask, cfg.pad_token_id)
    x = BertEmbeddings(cfg, self.dtype, name='embeddings')(input_ids, None, positions, deterministic)
    # HF buckets into 32 whatever the config says; 32 is what every released MPNet has.
    buckets = relative_position_buckets(input_ids.shape[1], cfg.relative_attention_num_buckets)
    bias = nn.Embed(cfg.relative_attention_num_buckets, cfg.num_attention_heads,
                    embedding_init=nn.initializers.normal(0.02), name='relative_attention_bias')(buckets)
    bias = bias.transpose(2, 0, 1).astype(jnp.float32)  # [heads, L, L], shared by every example and layer
    return layers_and_pooler(cfg, self.dtype, x, attention_mask.astype(bool), deterministic, bias,
                             branch_layers=self.branch_layers, branches=self.branches)
