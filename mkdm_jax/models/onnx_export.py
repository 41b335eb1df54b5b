"""ONNX files of an exported Hugging Face classifier folder, for serving with ONNX Runtime.

`export_onnx(hf_dir)` writes `<hf_dir>/model.onnx` (fp32; inputs input_ids, attention_mask and, for BERT,
token_type_ids, int64 [batch, length], both axes dynamic; output logits [batch, classes]) through PyTorch's
TorchScript ONNX exporter, and with `int8=True` also `<hf_dir>/model.int8.onnx` (ONNX Runtime's dynamic
quantisation of the MatMul weights to int8). Needs `torch` and `onnxruntime` (test requirements here).
"""
import pathlib

from mkdm_jax.errors import UserError

OPSET = 17


def onnx_input_names(hf_dir) -> list[str]:
  """The model's inputs, in the order `export_onnx` declares them."""
  import json
  model_type = json.loads((pathlib.Path(hf_dir) / 'config.json').read_text())['model_type']
  return ['input_ids', 'attention_mask'] + (['token_type_ids'] if model_type == 'bert' else [])


def export_onnx(hf_dir, *, int8=False) -> list[pathlib.Path]:
  """Writes model.onnx (and model.int8.onnx) into the HF folder; returns the files written."""
  try:
    import torch
    import transformers
  except ImportError as e:
    raise UserError(f'ONNX export needs PyTorch ({e}); pip install torch onnxruntime') from None
  hf_dir = pathlib.Path(hf_dir)
  model = transformers.AutoModelForSequenceClassification.from_pretrained(str(hf_dir), attn_implementation='eager')
  model.eval()
  names = onnx_input_names(hf_dir)
  example = tuple(torch.ones((2, 8), dtype=torch.int64) for _ in names)

  class Logits(torch.nn.Module):  # positional inputs in `names` order, the logits tensor out
    def __init__(self, inner):
      super().__init__()
      self.inner = inner

    def forward(self, *inputs):
      return self.inner(**dict(zip(names, inputs))).logits

  out = hf_dir / 'model.onnx'
  axes = {name: {0: 'batch', 1: 'length'} for name in names}
  with torch.no_grad():
    torch.onnx.export(Logits(model), example, str(out), input_names=names, output_names=['logits'],
                      dynamic_axes={**axes, 'logits': {0: 'batch'}}, opset_version=OPSET, dynamo=False)
  written = [out]
  if int8:
    try:
      from onnxruntime.quantization import QuantType, quantize_dynamic
    except ImportError as e:
      raise UserError(f'int8 quantisation needs onnxruntime ({e}); pip install onnxruntime') from None
    quantized = hf_dir / 'model.int8.onnx'
    quantize_dynamic(str(out), str(quantized), weight_type=QuantType.QInt8)
    written.append(quantized)
  return written
