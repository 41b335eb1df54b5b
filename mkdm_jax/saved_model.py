"""A trained model folder: `model.json` (architecture, dtype, task, max length), `final/` params and
`tokenizer/` (a copy of the tokenizer files), so the folder can be moved or shared on its own.

`experiments/run.py` writes one per teacher and student; `experiments/evaluate.py` and the HF export
read it back.
"""
import dataclasses
import json
from pathlib import Path

import jax.numpy as jnp

from mkdm_jax import paths
from mkdm_jax.errors import UserError
from mkdm_jax.models import Classifier
from mkdm_jax.models.classifier import ENCODERS, encoder_kind
from mkdm_jax.models.hf_files import copy_tokenizer_files
from mkdm_jax.train import load_params

SPEC_FILE = 'model.json'
TOKENIZER_DIR = 'tokenizer'


def write_spec(directory, classifier: Classifier, *, tokenizer_dir, max_length, task, label_names, **extra):
  """Writes model.json and copies the tokenizer files of `tokenizer_dir` into `<directory>/tokenizer/`.

  `extra` holds further JSON-serialisable fields (e.g. combine_weights, threshold).
  """
  directory = Path(directory)
  (directory / TOKENIZER_DIR).mkdir(parents=True, exist_ok=True)
  copy_tokenizer_files(tokenizer_dir, directory / TOKENIZER_DIR)
  # dict(**a, **b) raises TypeError if an extra field would silently replace a core one.
  spec = dict(
      encoder=encoder_kind(classifier.encoder),
      encoder_config=dataclasses.asdict(classifier.encoder),
      num_classes=classifier.num_classes, num_heads=classifier.num_heads, combine=classifier.combine,
      head_layers=classifier.head_layers,
      dtype=jnp.dtype(classifier.dtype).name, tokenizer_dir=TOKENIZER_DIR, max_length=max_length, task=task,
      label_names=list(label_names), **extra)
  _write(directory, spec)


def update_spec(directory, **fields):
  """Rewrites model.json with `fields` added or replaced."""
  _write(directory, {**_read_raw(directory), **fields})


def _write(directory, spec):
  paths.write_text_atomic(Path(directory) / SPEC_FILE, json.dumps(spec, indent=1))


def _read_raw(directory):
  path = Path(directory) / SPEC_FILE
  if not path.exists():
    raise UserError(f'{directory} is not a saved model folder: {path} is missing '
                    '(use a teacher or student folder of a finished experiments/run.py work directory)')
  return json.loads(path.read_text())


def read_spec(directory):
  """model.json with `tokenizer_dir` resolved against the folder (older specs hold an absolute path)."""
  spec = _read_raw(directory)
  spec['tokenizer_dir'] = str(Path(directory) / spec['tokenizer_dir'])
  return spec


def classifier_from_spec(spec):
  """The Classifier a model.json describes (encoder kind: a key of `models.classifier.ENCODERS`)."""
  if spec['encoder'] not in ENCODERS:
    raise UserError(f"model.json: encoder {spec['encoder']!r} is unknown to this version; expected one of "
                    f'{", ".join(ENCODERS)}')
  config_cls = ENCODERS[spec['encoder']][0]
  return Classifier(config_cls(**spec['encoder_config']), num_classes=spec['num_classes'],
                    num_heads=spec['num_heads'], combine=spec['combine'],
                    dtype=jnp.dtype(spec.get('dtype', 'float32')), head_layers=spec.get('head_layers', 0))


def load(directory):
  """(classifier, params, spec) of a saved model folder."""
  spec = read_spec(directory)
  params = load_params(Path(directory) / 'final')
  return classifier_from_spec(spec), params, spec
