"""GLUE MNLI/QNLI/RTE and SNLI through `tfds.data_source` (array_record; TensorFlow is not needed).

Label orders are tfds's: MNLI/SNLI entailment=0, neutral=1, contradiction=2; QNLI/RTE entailment=0,
not_entailment=1. GLUE test splits have no labels (-1 is kept); SNLI rows without a gold label (-1) are dropped.
"""
import hashlib

import numpy as np

from mkdm_jax.data.readers import ID_SCHEME, Examples, row_keys
from mkdm_jax.errors import UserError

# tfds name -> (first text field, second text field).
FIELDS = {
    "glue/mnli": ("premise", "hypothesis"),
    "glue/qnli": ("question", "sentence"),
    "glue/rte": ("sentence1", "sentence2"),
    "snli": ("premise", "hypothesis"),
}


def _import_tfds():
  try:
    import tensorflow_datasets as tfds
    import tensorflow_datasets.text.glue  # noqa: F401  (registers `glue`)
  except ImportError as e:
    raise UserError(f"tfds tasks need tensorflow-datasets ({e}); install it with "
                    "`pip install tensorflow-datasets importlib_resources` (TensorFlow is not needed)") from e
  return tfds


def load_tfds(name: str, split: str, *, data_dir=None, max_rows=None) -> Examples:
  """Loads split `split` of tfds dataset `name` (a key of FIELDS); `data_dir` is tfds's data folder."""
  tfds = _import_tfds()
  try:
    records = tfds.data_source(name, split=split, data_dir=data_dir)
  except Exception as e:  # tfds raises many types (KeyError, ValueError, download errors) for missing data.
    raise UserError(f"tfds:{name} split {split!r} could not be loaded ({type(e).__name__}: {e}); tfds needs "
                    "internet to download and prepare it once, or a prepared copy under --data_dir") from e
  return examples_from_records(records, source=f"tfds:{name}/{split}", fields=FIELDS[name],
                               drop_unlabelled=name == "snli", max_rows=max_rows)


def _text(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)


def examples_from_records(records, *, source, fields, drop_unlabelled=False, max_rows=None) -> Examples:
  """Examples from an iterable of tfds feature dicts (bytes or str text, int or 0-d array labels).

  Row ids are `row_key`s without a group (repeated pairs numbered); `max_rows` counts kept rows.
  """
  text_a, text_b, labels = [], [], []
  digest = hashlib.sha256(f"{source}\n{ID_SCHEME}\n".encode())
  for record in records:
    if max_rows is not None and len(labels) >= max_rows:
      break
    label = int(record["label"])
    if drop_unlabelled and label < 0:
      continue
    a, b = _text(record[fields[0]]), _text(record[fields[1]])
    text_a.append(a)
    text_b.append(b)
    labels.append(label)
    digest.update(f"{len(a)}:{a}{len(b)}:{b}{label}\n".encode())
  if not labels:
    raise UserError(f"{source}: no rows")
  return Examples(text_a, text_b, np.array(labels, dtype=np.int32), None, row_keys(text_a, text_b, None, source),
                  source, digest.hexdigest())
