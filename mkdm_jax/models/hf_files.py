"""The Hugging Face BERT layout: state-dict names and shapes of our encoder params, tokenizer files.

Both checkpoint import (checkpoints.py, onnx_import.py) and export build on it.
"""
import pathlib
import shutil

import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig

TOKENIZER_FILES = ('vocab.txt', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json')


def _hf_modules(cfg: BertConfig):
  """(HF module name, our encoder path, kind, dims) for every BERT encoder module.

  dims: (rows, width) for 'embed', (width,) for 'norm', (fan_in, fan_out) for 'dense'.
  """
  d, f = cfg.hidden_size, cfg.intermediate_size
  mods = [('embeddings.word_embeddings', ('embeddings', 'word_embeddings'), 'embed', (cfg.vocab_size, d)),
          ('embeddings.position_embeddings', ('embeddings', 'position_embeddings'), 'embed',
           (cfg.max_position_embeddings, d)),
          ('embeddings.token_type_embeddings', ('embeddings', 'token_type_embeddings'), 'embed',
           (cfg.type_vocab_size, d)),
          ('embeddings.LayerNorm', ('embeddings', 'norm'), 'norm', (d,))]
  for i in range(cfg.num_layers):
    hf, ours = f'encoder.layer.{i}.', f'layer_{i}'
    mods += [(hf + 'attention.self.query', (ours, 'attention', 'query'), 'dense', (d, d)),
             (hf + 'attention.self.key', (ours, 'attention', 'key'), 'dense', (d, d)),
             (hf + 'attention.self.value', (ours, 'attention', 'value'), 'dense', (d, d)),
             (hf + 'attention.output.dense', (ours, 'attention', 'output'), 'dense', (d, d)),
             (hf + 'attention.output.LayerNorm', (ours, 'attention_norm'), 'norm', (d,)),
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


def hf_state_to_encoder_params(state, cfg: BertConfig, source='checkpoint'):
  """HF BertModel state dict (numpy, with or without 'bert.' prefix) -> our encoder params (fp32).

  The original Google checkpoints on the hub (bert-base/large-uncased) name LayerNorm parameters
  gamma/beta; transformers renames them on load, and so do we.
  """
  legacy = {'LayerNorm.gamma': 'LayerNorm.weight', 'LayerNorm.beta': 'LayerNorm.bias'}
  state = {k.removeprefix('bert.'): v for k, v in state.items()}
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


def encoder_params_to_hf_state(params, cfg: BertConfig, prefix='bert.'):
  """Our encoder params -> HF BertModel state dict of C-contiguous fp32 numpy arrays."""
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
