"""Exports a saved BERT teacher or student to a Hugging Face `BertForSequenceClassification` folder.

  python experiments/export.py --model=runs/quickstart/students/bert3_mkdm --out=exports/bert3_mkdm

The folder holds config.json (with the task's label names), model.safetensors and the tokenizer files of
the model's tokenizer. A multi-head student becomes one classifier layer giving its combined logits.
BiLSTM students have no Hugging Face equivalent and are refused. --onnx adds model.onnx for ONNX Runtime
(and --onnx_int8 its dynamically quantised int8 twin, model.int8.onnx); see mkdm_jax/models/onnx_export.py.
"""
import pathlib

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

from absl import flags

from mkdm_jax import models, saved_model
from mkdm_jax.models import onnx_export
from mkdm_jax.errors import UserError

FLAGS = flags.FLAGS
flags.DEFINE_string('model', None, 'Saved model folder (a teacher or student folder of a work directory).')
flags.DEFINE_string('out', None, 'Output folder (created; must be empty or absent).')
flags.DEFINE_boolean('onnx', False, 'Also write model.onnx (fp32, dynamic batch and length; needs torch).')
flags.DEFINE_boolean('onnx_int8', False, 'With --onnx: also model.int8.onnx, int8 dynamic quantisation '
                     '(needs onnxruntime).')

flags.mark_flags_as_required(['model', 'out'])


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  out = pathlib.Path(FLAGS.out)
  if FLAGS.onnx_int8 and not FLAGS.onnx:
    raise UserError('--onnx_int8 quantises the ONNX file: add --onnx')
  if out.exists() and (not out.is_dir() or any(out.iterdir())):
    raise UserError(f'--out={out} exists and is not an empty folder; choose a new folder')
  model, params, spec = saved_model.load(FLAGS.model)
  models.export_hf(out, model, params, tokenizer_dir=spec['tokenizer_dir'], label_names=spec['label_names'])
  if FLAGS.onnx:
    for path in onnx_export.export_onnx(out, int8=FLAGS.onnx_int8):
      print(f'wrote {path}')
  print(f'exported {FLAGS.model} ({spec["task"]}, labels {spec["label_names"]}) to {out}')


if __name__ == '__main__':
  cli.main(main)
