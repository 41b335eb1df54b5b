"""BERT encoder (HF `BertModel` compatible: post-LN, exact GELU, tanh pooler) in flax.linen; RoBERTa too.

Param names of the encoder subtree (HF names in brackets, see `hf_files.py` for the mapping):
  embeddings/{word,position,token_type}_embeddings/embedding, embeddings/norm
  layer_{i}/attention/{query,key,value,output}  [encoder.layer.i.attention.self.*, .attention.output.dense]
  layer_{i}/attention_norm                      [encoder.layer.i.attention.output.LayerNorm]
  layer_{i}/intermediate, layer_{i}/output      [encoder.layer.i.intermediate.dense, .output.dense]
  layer_{i}/output_norm                         [encoder.layer.i.output.LayerNorm]
  pooler                                        [pooler.dense]
RoBERTa (HF `RobertaModel`) has the same layout and layers; its positions count past the padding id.
"""
import dataclasses
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models import cpu_attention


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """Architecture of a BERT encoder (defaults: MiniLM-L6-H384)."""
  MODEL_TYPE: ClassVar[str] = 'bert'  # HF config.json model_type
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
    if d.get('model_type', cls.MODEL_TYPE) != cls.MODEL_TYPE or act != 'gelu' or pos != 'absolute':
      raise UserError(f"config.json: only {cls.MODEL_TYPE} with hidden_act='gelu' and absolute position "
                      f"embeddings is supported, got model_type={d.get('model_type')!r}, hidden_act={act!r}, "
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
      raise UserError(f'config.json: missing {cls.MODEL_TYPE} field {e}.') from None

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF BERT config.json dict (model_type 'bert')."""
    return {
        'model_type': self.MODEL_TYPE, 'vocab_size': self.vocab_size, 'hidden_size': self.hidden_size,
        'num_hidden_layers': self.num_layers, 'num_attention_heads': self.num_attention_heads,
        'intermediate_size': self.intermediate_size, 'hidden_act': 'gelu',
        'max_position_embeddings': self.max_position_embeddings, 'type_vocab_size': self.type_vocab_size,
        'layer_norm_eps': self.layer_norm_eps, 'hidden_dropout_prob': self.hidden_dropout,
        'attention_probs_dropout_prob': self.attention_dropout, 'initializer_range': 0.02,
        'position_embedding_type': 'absolute', 'pad_token_id': 0,
    }


@dataclasses.dataclass(frozen=True)
class RobertaConfig(BertConfig):
  """Architecture of a RoBERTa encoder (defaults: roberta-base's vocabulary and positions): BERT whose
  positions count from pad_token_id + 1, with (in practice) one token type."""
  MODEL_TYPE: ClassVar[str] = 'roberta'
  vocab_size: int = 50265
  max_position_embeddings: int = 514
  type_vocab_size: int = 1
  layer_norm_eps: float = 1e-5
  pad_token_id: int = 1

  @classmethod
  def from_hf_dict(cls, d: dict[str, Any]) -> 'RobertaConfig':
    """Reads an HF RoBERTa config.json dict."""
    return dataclasses.replace(super().from_hf_dict(d), pad_token_id=d.get('pad_token_id', 1))

  def to_hf_dict(self) -> dict[str, Any]:
    """An HF RoBERTa config.json dict (model_type 'roberta')."""
    return {**super().to_hf_dict(), 'pad_token_id': self.pad_token_id, 'bos_token_id': 0, 'eos_token_id': 2}


def padded_positions(mask, pad_token_id):
  """HF's create_position_ids_from_input_ids: real tokens count from pad_token_id + 1, padding sits at it.

  Taken from the attention mask rather than from `input_ids != pad_token_id`: the same for right-padded
  rows, and independent of which id a tokenizer pads with.
  """
  mask = mask.astype(jnp.int32)
  return jnp.cumsum(mask, axis=1) * mask + pad_token_id


def _mix32(x):
  """lowbias32 integer hash (C. Wellons): every input bit affects every output bit."""
  x = (x ^ (x >> 16)) * jnp.uint32(0x7feb352d)
  x = (x ^ (x >> 15)) * jnp.uint32(0x846ca68b)
  return x ^ (x >> 16)


def hash_dropout(x, rate, seed):
  """Inverted dropout of x, keeping each element when a hash of (its index, seed: uint32[2]) says so."""
  index = jax.lax.iota(jnp.uint32, x.size).reshape(x.shape)
  bits = _mix32(_mix32(index + seed[0]) ^ seed[1])
  keep = bits >= jnp.uint32(round(rate * 2**32))
  return jnp.where(keep, x * (1.0 / (1.0 - rate)), 0.0).astype(x.dtype)


def dropout_seed(module, rate, deterministic):
  """uint32[2] seed from the module's 'dropout' rng, or None when dropout is off."""
  if deterministic or rate == 0.0:
    return None
  return jax.random.bits(module.make_rng('dropout'), (2,), jnp.uint32)


class Dropout(nn.Module):
  """Per-element (inverted) dropout like HF BERT's, drawing from a counter-based hash.

  `flax.linen.Dropout` draws threefry bits, which XLA:CPU runs as several memory-bound passes (a
  fifth of a MiniLM train step's op time here, mostly the attention-probability masks); hashing
  element indices with a seed from the 'dropout' rng fuses into the consumer as one elementwise
  pass. Masks are deterministic per rng; tensors must have fewer than 2**32 elements.
  """
  rate: float

  @nn.compact
  def __call__(self, x, deterministic):
    if self.rate >= 1.0 and not deterministic:
      return jnp.zeros_like(x)
    seed = dropout_seed(self, self.rate, deterministic)
    return x if seed is None else hash_dropout(x, self.rate, seed)


def gelu(x):
  """Exact GELU in HF's erf form (XLA's erf is a cheap rational; jax.nn.gelu's erfc is not)."""
  return 0.5 * x * (1.0 + jax.lax.erf(x * np.float32(2**-0.5).astype(x.dtype)))


def _dense(features, dtype, name):
  return nn.Dense(features, dtype=dtype, kernel_init=nn.initializers.normal(0.02), name=name)


# Examples per attention chunk: the largest batch divisor whose fp32 scores fit in this many bytes.
ATTENTION_CHUNK_BYTES = 4 * 2**20


def _attention_chunk(batch, heads, length):
  fit = max(1, ATTENTION_CHUNK_BYTES // (heads * length * length * 4))
  return max(c for c in range(1, min(batch, fit) + 1) if batch % c == 0)


class BertSelfAttention(nn.Module):
  """Multi-head self-attention plus output projection; softmax in fp32. Tokens x: [B*L, D].

  At inference on the CPU backend (fp32, head size a multiple of 8) the core is the fused
  `cpu_attention` kernel: XLA:CPU runs batched matmuls on one core, the kernel threads (example,
  head) pairs and skips padded keys. Otherwise (training, other backends, no C++ compiler):
  softmax normalisation is applied to the context, exp(s - max) @ v / sum, not to the [B, heads,
  L, L] scores (one pass less over them; dropout commutes with the row scaling). Padded keys are
  zeroed in k, so their scores are exactly 0 and the row maximum needs no masked copy of the scores
  (XLA:CPU wrote one: the core ran about 18% slower); the mask then multiplies exp(). The
  maximum may thus be 0 instead of the largest unmasked score, which only changes the result if
  every unmasked score of a row is below -87 (exp underflows); a row with no unmasked key gets a
  zero context (HF BERT attends uniformly there; the pipeline never builds such rows). Without
  dropout the context is computed a few examples at a time (lax.map over batch chunks) so that each
  chunk's scores stay in cache (about 2x faster on CPU than one chunk). Training uses one chunk: under
  autodiff, stacking the per-chunk residuals cost as much as the chunking saved. The returned probabilities are
  computed separately, so XLA drops them unless a caller uses them.

  `bias` ([heads, L, L] fp32 shared by the batch, e.g. MPNet's relative-position bias) is added to the
  scores, by the kernel too; on the einsum path padded keys then score their bias, not 0, which only
  moves the row maximum.
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic, bias=None):
    cfg = self.config
    (b, l), d, h = mask.shape, x.shape[-1], cfg.num_attention_heads
    heads = lambda t: t.reshape(b, l, h, d // h)  # token-major [B, L, heads, d/heads]
    split = lambda t: heads(t).transpose(0, 2, 1, 3)  # [B, heads, L, d/heads]
    keep = mask.astype(jnp.float32)
    q_dense = _dense(d, self.dtype, 'query')(x) * (d // h) ** -0.5
    k_dense = _dense(d, self.dtype, 'key')(x)
    v_dense = _dense(d, self.dtype, 'value')(x)
    add_bias = lambda scores: scores if bias is None else scores + bias
    scores = add_bias(jnp.einsum('bhqd,bhkd->bhqk', split(q_dense), split(k_dense)).astype(jnp.float32))
    probs = nn.softmax(jnp.where(mask[:, None, None, :], scores, jnp.finfo(jnp.float32).min), axis=-1)
    if deterministic and cpu_attention.applies(self.dtype, d // h):
      ctx = cpu_attention.attention(heads(q_dense), heads(k_dense), heads(v_dense), keep, bias)
      return _dense(d, self.dtype, 'output')(ctx.reshape(b * l, d)), probs
    q, k, v = split(q_dense), split(k_dense * keep.reshape(b * l, 1).astype(self.dtype)), split(v_dense)
    seed = dropout_seed(self, cfg.attention_dropout, deterministic)
    c = _attention_chunk(b, h, l) if deterministic else b

    def context(args):
      q, k, v, keep = args
      scores = add_bias(jnp.einsum('bhqd,bhkd->bhqk', q, k).astype(jnp.float32))
      # The context does not depend on the shift, so its gradient is exactly 0: stop_gradient spares the
      # backward pass a [B, heads, L, L] compare-and-select through max (7.7% of a MiniLM train step's ops).
      e = jnp.exp(scores - jax.lax.stop_gradient(scores.max(-1, keepdims=True))) * keep[:, None, None, :]
      total = jnp.maximum(e.sum(-1, keepdims=True), jnp.finfo(jnp.float32).tiny)
      if seed is not None:
        e = hash_dropout(e, cfg.attention_dropout, seed)
      ctx = jnp.einsum('bhqk,bhkd->bhqd', e.astype(self.dtype), v)
      return (ctx / total).astype(self.dtype)

    if c == b:
      ctx = context((q, k, v, keep))
    else:  # deterministic: no dropout inside the chunks
      chunks = lambda t: t.reshape(b // c, c, *t.shape[1:])
      ctx = jax.lax.map(context, (chunks(q), chunks(k), chunks(v), chunks(keep)))
    ctx = ctx.reshape(b, h, l, d // h).transpose(0, 2, 1, 3).reshape(b * l, d)
    return _dense(d, self.dtype, 'output')(ctx), probs


class BertLayer(nn.Module):
  """One post-LN transformer layer on tokens x: [B*L, D] (also MPNet's: its config has the same fields)."""
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x, mask, deterministic, bias=None):
    cfg = self.config
    norm = lambda name: nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name=name)
    drop = lambda t: Dropout(cfg.hidden_dropout)(t, deterministic)
    attn, probs = BertSelfAttention(cfg, self.dtype, name='attention')(x, mask, deterministic, bias)
    x = norm('attention_norm')(x + drop(attn))
    y = gelu(_dense(cfg.intermediate_size, self.dtype, 'intermediate')(x))
    y = _dense(cfg.hidden_size, self.dtype, 'output')(y)
    return norm('output_norm')(x + drop(y)), probs


class BertEmbeddings(nn.Module):
  """Word + position (+ token-type unless token_type_ids is None) embeddings, LayerNorm, dropout.

  Returns tokens [B*L, D]. MPNet uses it too (same fields and param names, no token types).
  """
  config: BertConfig
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, input_ids, token_type_ids, positions, deterministic):
    cfg = self.config
    embed = lambda n, name: nn.Embed(n, cfg.hidden_size, embedding_init=nn.initializers.normal(0.02),
                                     name=name)
    x = (embed(cfg.vocab_size, 'word_embeddings')(input_ids)
         + embed(cfg.max_position_embeddings, 'position_embeddings')(positions))
    if token_type_ids is not None:
      x = x + embed(cfg.type_vocab_size, 'token_type_embeddings')(token_type_ids)
    x = x.reshape(-1, cfg.hidden_size)
    x = nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=self.dtype, name='norm')(x)
    return Dropout(cfg.hidden_dropout)(x, deterministic)


def layers_and_pooler(cfg, dtype, x, mask, deterministic, bias=None, branch_layers=0, branches=1):
  """The encoder output dict of embedded tokens x [B*L, D]: `cfg.num_layers` BertLayers, tanh pooler.

  Call it inside an encoder's compact `__call__`: the layers and the pooler become the encoder's
  submodules 'layer_{i}' and 'pooler'. `bias` goes to every layer's attention scores.
  With `branch_layers` = k > 0 the top k layers and the pooler are repeated in `branches` separate copies,
  'branch{b}_layer_{i}' and 'branch{b}_pooler', on the shared bottom layers: 'pooled' is then [B, branches, D]
  (one per head) and 'sequence', 'hidden_states' and 'attentions' are the shared body's.
  """
  unflatten = lambda t: t.reshape(*mask.shape, cfg.hidden_size)
  hidden_states, attentions = [unflatten(x)], []
  shared = cfg.num_layers - branch_layers
  for i in range(shared):
    x, probs = BertLayer(cfg, dtype, name=f'layer_{i}')(x, mask, deterministic, bias)
    hidden_states.append(unflatten(x))
    attentions.append(probs)
  pool = lambda t, name: jnp.tanh(_dense(cfg.hidden_size, dtype, name)(unflatten(t)[:, 0]))
  if branch_layers:
    pooled = []
    for b in range(branches):
      y = x
      for i in range(shared, cfg.num_layers):
        y, _ = BertLayer(cfg, dtype, name=f'branch{b}_layer_{i}')(y, mask, deterministic, bias)
      pooled.append(pool(y, f'branch{b}_pooler'))
    return {'sequence': unflatten(x), 'pooled': jnp.stack(pooled, axis=1), 'hidden_states': tuple(hidden_states),
            'attentions': tuple(attentions)}
  return {'sequence': unflatten(x), 'pooled': pool(x, 'pooler'), 'hidden_states': tuple(hidden_states),
          'attentions': tuple(attentions)}


class BertEncoder(nn.Module):
  """BERT or RoBERTa encoder with HF pooler: returns a dict with 'sequence', 'pooled', 'hidden_states',
  'attentions'.

  `hidden_states` is the embeddings output then each layer's output; `attentions` holds fp32
  attention probabilities [B, heads, L, L] per layer (before attention dropout).
  Layers run on a [B*L, D] token matrix: XLA:CPU reduces 2-D gradients (bias, LayerNorm) several
  times faster than the same reductions over two axes of [B, L, D].
  """
  config: BertConfig
  dtype: Any = jnp.float32
  branch_layers: int = 0  # top layers repeated per branch (layers_and_pooler)
  branches: int = 1

  @nn.compact
  def __call__(self, input_ids, token_type_ids, attention_mask, *, deterministic=True):
    if isinstance(self.config, RobertaConfig):
      positions = padded_positions(attention_mask, self.config.pad_token_id)
    else:
      positions = jnp.arange(input_ids.shape[1])[None, :]
    x = BertEmbeddings(self.config, self.dtype, name='embeddings')(input_ids, token_type_ids, positions,
                                                                   deterministic)
    return layers_and_pooler(self.config, self.dtype, x, attention_mask.astype(bool), deterministic,
                             branch_layers=self.branch_layers, branches=self.branches)
