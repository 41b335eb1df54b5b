"""The Hugging Face BERT, RoBERTa and MPNet layouts: state-dict names and shapes of our encoder params,
sequence-classifier heads, tokenizer files.

Both checkpoint import (checkpoints.py, onnx_import.py) and export build on it.
"""
import pathlib
import shutil

import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig
from mkdm_jax.models.mpnet import MPNetConfig

TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')

# HF names of our attention modules (BERT's also RoBERTa's); the rest of a layer is named alike.
_BERT_ATTENTION = {'query': 'attention.self.query', 'key': 'attention.self.key', 'value': 'attention.self.value',
                   'output': 'attention.output.dense', 'attention_norm': 'attention.output.LayerNorm'}
_MPNET_ATTENTION = {'query': 'attention.attn.q', 'key': 'attention.attn.k', 'value': 'attention.attn.v',
                    'output': 'attention.attn.o', 'attention_norm': 'attention.LayerNorm'}
# HF sequence classifier per model_type, and whether its head is dense + tanh + out_proj on the first
# token with no pooler in the model (else one linear layer on the pooler).
SEQUENCE_CLASSIFIERS = {'bert': ('BertForSequenceClassification', False),
                        'roberta': ('RobertaForSequenceClassification', True),
                        'mpnet': ('MPNetForSequenceClassification', True)}


def hf_prefix(cfg) -> str:
  """The base-model prefix of the family's HF task models ('bert.', 'roberta.', 'mpnet.')."""
  return cfg.MODEL_TYPE + '.'


def _hf_modules(cfg: BertConfig | MPNetConfig):
  """(HF module name, our encoder path, kind, dims) for every encoder module.

  dims: (rows, width) for 'embed', (width,) for 'norm', (fan_in, fan_out) for 'dense'.
  """
  d, f = cfg.hidden_size, cfg.intermediate_size
  mpnet = isinstance(cfg, MPNetConfig)
  mods = [('embeddings.word_embeddings', ('embeddings', 'word_embeddings'), 'embed', (cfg.vocab_size, d)),
          ('embeddings.position_embeddings', ('embeddings', 'position_embeddings'), 'embed',
           (cfg.max_position_embeddings, d))]
  if not mpnet:
    mods.append(('embeddings.token_type_embeddings', ('embeddings', 'token_type_embeddings'), 'embed',
                 (cfg.type_vocab_size, d)))
  mods.append(('embeddings.LayerNorm', ('embeddings', 'norm'), 'norm', (d,)))
  if mpnet:
    mods.append(('encoder.relative_attention_bias', ('relative_attention_bias',), 'embed',
                 (cfg.relative_attention_num_buckets, cfg.num_attention_heads)))
  attention = _MPNET_ATTENTION if mpnet else _BERT_ATTENTION
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.layer.{i}.', f'layer_{i}'
    mods += [(hf + attention[name], (ours, 'attention', name), 'dense', (d, d))
             for name in ('query', 'key', 'value', 'output')]
    mods += [(hf + attention['attention_norm'], (ours, 'attention_norm'), 'norm', (d,)),
             (hf + 'intermediate.dense', (ours, 'intermediate'), 'dense', (d, f)),
             (hf + 'output.dense', (ours, 'output'), 'dense', (f, d)),
             (hf + 'output.LayerNorm', (ours, 'output_norm'), 'norm', (d,))]
  mods.append(('pooler.dense', ('pooler',), 'dense', (d, d)))
  return mods


def _tensors(kind, dims):
  """[(HF tensor suffix, our param name, HF shape, transpose)] of one module."""
  if kind == 'embed':
    return [('weight', 'embedding', dims, False)]
  if kind == 'norm':
    return [('weight', 'scale', dims, False), ('bias', 'bias', dims, False)]
  return [('weight', 'kernel', dims[::-1], True), ('bias', 'bias', dims[1:], False)]


def hf_state_to_encoder_params(state, cfg: BertConfig | MPNetConfig, source='checkpoint'):
  """HF BertModel / RobertaModel / MPNetModel state dict (numpy, with or without the `hf_prefix`) -> our
  encoder params (fp32).

  The original Google checkpoints on the hub (bert-base/large-uncased) name LayerNorm parameters
  gamma/beta; transformers renames them on load, and so do we. RoBERTa and MPNet sequence classifiers
  have no pooler; their head's first layer `classifier.dense` (where `export_hf` writes the pooler)
  stands in.
  """
  legacy = {'LayerNorm.gamma': 'LayerNorm.weight', 'LayerNorm.beta': 'LayerNorm.bias'}
  state = {k.removeprefix(hf_prefix(cfg)): v for k, v in state.items()}
  if SEQUENCE_CLASSIFIERS[cfg.MODEL_TYPE][1] and 'pooler.dense.weight' not in state:
    state = {k.replace('classifier.dense.', 'pooler.dense.', 1): v for k, v in state.items()}
  state = {next((k.replace(old, new) for old, new in legacy.items() if k.endswith(old)), k): v
           for k, v in state.items()}
  params, problems = {}, []
  for hf_mod, path, kind, dims in _hf_modules(cfg):
    for suffix, name, shape, transpose in _tensors(kind, dims):
      key = f'{hf_mod}.{suffix}'
      if key not in state:
        problems.append(f'missing {key} {shape}')
      elif tuple(state[key].shape) != shape:
        problems.append(f'{key}: shape {tuple(state[key].shape)} in file, {shape} from config.json')
      else:
        value = np.asarray(state[key], np.float32)
        node = params
        for p in path:
          node = node.setdefault(p, {})
        node[name] = np.ascontiguousarray(value.T) if transpose else value
  if problems:
    raise UserError(f'{source}: weights do not match config.json:\n  ' + '\n  '.join(problems))
  return params


def encoder_params_to_hf_state(params, cfg: BertConfig | MPNetConfig, prefix=None):
  """Our encoder params -> HF BertModel / RobertaModel / MPNetModel state dict of C-contiguous fp32 arrays.

  Keys start with `prefix`, by default the family's task-model prefix (`hf_prefix`).
  """
  prefix = hf_prefix(cfg) if prefix is None else prefix
  state = {}
  for hf_mod, path, kind, dims in _hf_modules(cfg):
    tree = params
    for key in path:
      tree = tree[key]
    for suffix, name, _, transpose in _tensors(kind, dims):
      value = np.asarray(tree[name], np.float32)
      state[f'{prefix}{hf_mod}.{suffix}'] = np.ascontiguousarray(value.T if transpose else value)
  return state


def copy_tokenizer_files(src_dir, out_dir):
  """Copies vocab.txt / tokenizer.json / their configs; UserError if src_dir has none of them."""
  found = [pathlib.Path(src_dir) / n for n in TOKENIZER_FILES if (pathlib.Path(src_dir) / n).is_file()]
  if not found:
    raise UserError(f'{src_dir}: no tokenizer files ({", ".join(TOKENIZER_FILES)}) to copy.')
  for f in found:
    shutil.copyfile(f, pathlib.Path(out_dir) / f.name)
