"""The one place that builds teacher and student classifiers with their initial parameters.

Used by the pipeline (training), the benchmarks and, through `saved_model`, evaluation and export.
Checkpoints are named as `resolve_checkpoint` understands them, or 'random' for a randomly
initialised encoder of the given `random_shape` (layers, hidden, heads, intermediate).
"""
import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bilstm import BiLSTMConfig, bilstm_embeddings_from_bert
from mkdm_jax.models.checkpoints import cut_layers, load_hf_encoder, load_hf_head, resolve_checkpoint
from mkdm_jax.models.classifier import ENCODERS, Classifier, encoder_kind

STUDENT_PATTERN = r'(bert|roberta|mpnet)\d+|bilstm'


@dataclasses.dataclass(frozen=True)
class ModelOptions:
  """Settings shared by every model of a run."""
  dtype: str = 'float32'  # compute dtype; params stay float32
  random_shape: tuple[int, int, int, int] = (2, 64, 2, 128)  # layers, hidden, heads, intermediate
  max_length: int = 128
  bilstm_hidden: int = 256
  allow_pickle: bool = False


def random_config(options: ModelOptions, kind='bert', num_layers=None):
  """A 'bert', 'roberta' or 'mpnet' config of `options.random_shape` (num_layers replaces its layers)."""
  layers, hidden, heads, intermediate = options.random_shape
  positions = max(options.max_length, 128)
  config = ENCODERS[kind][0](num_layers=num_layers or layers, hidden_size=hidden, num_attention_heads=heads,
                             intermediate_size=intermediate, max_position_embeddings=positions)
  if kind != 'bert':  # positions count from pad_token_id + 1
    config = dataclasses.replace(config, max_position_embeddings=positions + config.pad_token_id + 1)
  return config


@functools.lru_cache(maxsize=4)
def _load_checkpoint(name, allow_pickle):
  return load_hf_encoder(resolve_checkpoint(name), allow_pickle=allow_pickle)


def load_encoder(checkpoint, options: ModelOptions):
  """(encoder config, encoder params) of a checkpoint, or (random BERT config, None) for 'random'."""
  if checkpoint == 'random':
    return random_config(options), None
  return _load_checkpoint(checkpoint, options.allow_pickle)


def encoder_module(config, dtype=jnp.float32):
  """The encoder module (BERT, RoBERTa, MPNet or BiLSTM) of an encoder config."""
  return ENCODERS[encoder_kind(config)][1](config, dtype)


def encoder_config(checkpoint, options: ModelOptions):
  """The architecture of a checkpoint without keeping its weights (for up-front checks)."""
  return load_encoder(checkpoint, options)[0]


def init_params(model: Classifier, rng, encoder_params=None):
  """The one random init of a classifier's params from the PRNG key `rng` (traceable: `train.step.init_state`
  calls it under jit), the encoder replaced by pretrained weights if given.

  The dummy input's length does not matter: no parameter's shape or value depends on it.
  """
  dummy = jnp.zeros((1, 8), jnp.int32)
  params = model.init(rng, dummy, dummy, jnp.ones_like(dummy))['params']
  if encoder_params is not None:
    params = {**params, 'encoder': encoder_params}
  return params


def host_init_params(model: Classifier, seed: int, encoder_params=None):
  """`init_params` from PRNGKey(seed) as host numpy arrays (the callers' private copies)."""
  return jax.tree.map(np.asarray, init_params(model, jax.random.PRNGKey(seed), encoder_params))


def teacher(checkpoint, num_classes, seed, options: ModelOptions):
  """A one-head teacher classifier on a checkpoint (of any kind config.json names), and its initial params.

  A sequence classifier of `num_classes` classes keeps its classification layer (a model fine-tuned on another
  task and exported with experiments/export.py continues as it was: TANDA's transfer-then-adapt); any other
  checkpoint gets a new head from `seed`.
  """
  config, encoder_params = load_encoder(checkpoint, options)
  model = Classifier(config, num_classes=num_classes, dtype=jnp.dtype(options.dtype))
  params = host_init_params(model, seed, encoder_params)
  head = None if encoder_params is None else load_hf_head(resolve_checkpoint(checkpoint), config, num_classes)
  if head is not None:
    params['heads'] = {'kernel': head[0][None], 'bias': head[1][None]}
  return model, params


def check_student(arch, checkpoint, options: ModelOptions, layers=None):
  """Raises UserError for a student that cannot be built (before any work): returns (kind, k, layers)."""
  match = re.fullmatch(STUDENT_PATTERN, arch)
  if not match:
    raise UserError(f'student {arch!r}: expected bert<k>, roberta<k> or mpnet<k> (e.g. bert3) or bilstm')
  if arch == 'bilstm':
    return 'bilstm', 0, None
  kind, k = match.group(1), int(arch[len(match.group(1)):])
  if checkpoint == 'random':
    if layers is not None:
      raise UserError(f'student {arch!r} from {checkpoint!r}: layers={layers} picks pretrained layers; it needs '
                      'a checkpoint')
    return kind, k, None
  config = encoder_config(checkpoint, options)
  if encoder_kind(config) != kind:
    raise UserError(f'student {arch!r}: checkpoint {checkpoint!r} is a {encoder_kind(config)} model; '
                    f'use {encoder_kind(config)}{k}')
  layers = tuple(range(k)) if layers is None else tuple(layers)
  if len(layers) != k or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= config.num_layers:
    raise UserError(f'student {arch!r}: layers={layers} must be {k} distinct ascending indices of the '
                    f'{config.num_layers} layers of {checkpoint!r} (0 to {config.num_layers - 1})')
  return kind, k, layers


def student(arch, checkpoint, num_classes, num_heads, seed, options: ModelOptions, combine='mean',
            layers=None, head_layers=0):
  """A student classifier and its initial params.

  'bert<k>' / 'roberta<k>' / 'mpnet<k>': k layers of `checkpoint` (one of that kind), by default the
  bottom k, else the teacher `layers` (k ascending indices, e.g. (0, 4, 8) for DistilBERT's every-other-
  layer pick); for 'random' a random k-layer encoder of that kind. 'bilstm': a BiLSTM whose word
  embeddings come from `checkpoint` (`layers` does not apply). `head_layers` > 0 (transformers): every head
  gets its own copy of the top `head_layers` layers and the pooler, each starting from the same loaded weights.
  """
  kind, k, layers = check_student(arch, checkpoint, options, None if arch == 'bilstm' else layers)
  config, encoder_params = load_encoder(checkpoint, options)
  dtype = jnp.dtype(options.dtype)
  if head_layers and (arch == 'bilstm' or not 0 < head_layers < k):
    raise UserError(f'student {arch!r}: head_layers={head_layers} needs a transformer student with more layers '
                    '(the heads share the layers below theirs)')
  if arch == 'bilstm':
    lstm = BiLSTMConfig(vocab_size=config.vocab_size, embed_dim=config.hidden_size,
                        hidden_size=options.bilstm_hidden)
    model = Classifier(lstm, num_classes, num_heads, combine, dtype)
    params = host_init_params(model, seed)
    if encoder_params is not None:
      params = jax.tree.map(np.asarray, bilstm_embeddings_from_bert(params, encoder_params))
    return model, params
  if encoder_params is None:
    config = random_config(options, kind, k)
  else:
    config, encoder_params = cut_layers(config, encoder_params, layers)
    if head_layers:
      encoder_params = branched(encoder_params, config.num_layers, head_layers, num_heads)
  model = Classifier(config, num_classes, num_heads, combine, dtype, head_layers)
  return model, host_init_params(model, seed, encoder_params)


def branched(encoder_params, num_layers, head_layers, branches):
  """Encoder params with the top `head_layers` layers and the pooler copied into each branch ('branch{b}_layer_{i}',
  'branch{b}_pooler'; `bert.layers_and_pooler`) and removed from the shared stack."""
  top = [f'layer_{i}' for i in range(num_layers - head_layers, num_layers)] + ['pooler']
  out = {name: p for name, p in encoder_params.items() if name not in top}
  for b in range(branches):
    out.update({f'branch{b}_{name}': jax.tree.map(np.array, encoder_params[name]) for name in top})
  return out
