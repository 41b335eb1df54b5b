"""A trained model folder: `model.json` (architecture, task, tokenizer, max length) + `final/` params.

`experiments/run.py` writes one per teacher and student; `experiments/evaluate.py` and the HF export
read it back.
"""
import dataclasses
import json
from pathlib import Path

from mkdm_jax.errors import UserError
from mkdm_jax.models import BertConfig, BiLSTMConfig, Classifier
from mkdm_jax.train import load_params

SPEC_FILE = 'model.json'


def write_spec(directory, classifier: Classifier, *, tokenizer_dir, max_length, task, label_names):
  directory = Path(directory)
  directory.mkdir(parents=True, exist_ok=True)
  spec = {
      'encoder': 'bert' if isinstance(classifier.encoder, BertConfig) else 'bilstm',
      'encoder_config': dataclasses.asdict(classifier.encoder),
      'num_classes': classifier.num_classes, 'num_heads': classifier.num_heads,
      'combine': classifier.combine, 'tokenizer_dir': str(tokenizer_dir),
      'max_length': max_length, 'task': task, 'label_names': list(label_names)}
  (directory / SPEC_FILE).write_text(json.dumps(spec, indent=1))


def read_spec(directory):
  path = Path(directory) / SPEC_FILE
  if not path.exists():
    raise UserError(f'{directory} is not a saved model folder: {path} is missing '
                    '(use a teacher or student folder of a finished experiments/run.py work directory)')
  return json.loads(path.read_text())


def classifier_from_spec(spec):
  config_cls = BertConfig if spec['encoder'] == 'bert' else BiLSTMConfig
  return Classifier(config_cls(**spec['encoder_config']), num_classes=spec['num_classes'],
                    num_heads=spec['num_heads'], combine=spec['combine'])


def load(directory):
  """(classifier, params, spec) of a saved model folder."""
  spec = read_spec(directory)
  params = load_params(Path(directory) / 'final')
  return classifier_from_spec(spec), params, spec
