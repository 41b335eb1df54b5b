"""Model outputs written to files: per-pair prediction files (`experiments/evaluate.py --predictions`,
`experiments/score.py`) and a model's logits on a prepared corpus, shard by shard (`corpus_logits`).

Prediction files:

One tab-separated row per pair, in input order, under the header `group  row  label  score  head_0 ...
head_{H-1}`: the raw group id (empty without groups), the row key (`mkdm_jax.data.row_key` of the pair), the
gold label (-1 when missing), and the positive-class probability of the combined prediction and of each head
at full precision (class probabilities joined by commas for tasks with more than two classes).
"""
import itertools
import os
from pathlib import Path

import numpy as np
from tqdm import tqdm

from mkdm_jax import data as data_lib
from mkdm_jax import models, saved_model, train
from mkdm_jax.data.readers import RowKeyer
from mkdm_jax.errors import UserError


def header(num_heads: int) -> str:
  return '\t'.join(['group', 'row', 'label', 'score'] + [f'head_{h}' for h in range(num_heads)])


def _probabilities(p) -> str:
  return repr(float(p[1])) if len(p) == 2 else ','.join(repr(float(x)) for x in p)


def lines(groups, ids, labels, out) -> list[str]:
  """Prediction rows (no header) of `train.predict`'s output `out`; `groups[i]` is row i's raw group or None."""
  probs = train.softmax(out['logits'])
  heads = train.softmax(out['head_logits'])
  return ['\t'.join([group or '', str(int(row)), str(int(label)), _probabilities(p)]
                    + [_probabilities(h) for h in head])
          for group, row, label, p, head in zip(groups, ids, labels, probs, heads)]


def write(path, examples, out):
  """The prediction file of in-memory `examples` (an `Examples`) and their `train.predict` output."""
  names = examples.group_names
  groups = [names[g] for g in examples.groups] if names is not None else [None] * len(examples)
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  text = '\n'.join([header(out['head_logits'].shape[1])] + lines(groups, examples.ids, examples.labels, out))
  path.write_text(text + '\n')


def score_stream(stream, model_dir, output, *, mesh, batch_size=128, chunk_rows=16384, progress=True) -> int:
  """Scores the pairs of `stream` (a `data.readers.PairStream`) with the saved model in `model_dir`,
  `chunk_rows` rows at a time (memory is bounded by the chunk, not the file), and writes the prediction file
  `output`. Returns the number of rows scored.

  Rows are written to `<output>.partial`, renamed to `output` when every row is scored: a killed run
  leaves no truncated file under the final name.
  """
  model, params, spec = saved_model.load(model_dir)
  tokenizer = models.load_tokenizer(spec['tokenizer_dir'])
  output = Path(output)
  output.parent.mkdir(parents=True, exist_ok=True)
  partial = output.with_name(output.name + '.partial')
  keyer = RowKeyer()
  rows = iter(stream)
  total = 0
  try:
    with open(partial, 'w', encoding='utf-8') as f, tqdm(unit=' pairs', disable=not progress,
                                                         desc=f'scoring {stream.path.name}') as bar:
      f.write(header(spec['num_heads']) + '\n')
      while chunk := list(itertools.islice(rows, chunk_rows)):
        text_a, text_b, labels, groups = (list(column) for column in zip(*chunk))
        ids = np.array([keyer(a, b, g) for a, b, g in zip(text_a, text_b, groups)], dtype=np.int64)
        examples = data_lib.Examples(text_a, text_b, np.array(labels, np.int32), None, ids, str(stream.path),
                                     fingerprint=f'{stream.path}:{total}')
        encoded = data_lib.encode(tokenizer, examples, spec['max_length'])
        out = train.predict(model, params, encoded, mesh=mesh, batch_size=batch_size)
        f.write('\n'.join(lines(groups, ids, labels, out)) + '\n')
        total += len(chunk)
        bar.update(len(chunk))
  except BaseException:
    partial.unlink(missing_ok=True)  # an unfinished file is never left behind, under either name
    raise
  stream.warn_skipped()
  if total == 0:
    partial.unlink()
    raise UserError(f'{stream.path}: no valid data rows' +
                    (f' ({stream.skipped} malformed rows skipped)' if stream.skipped else ''))
  os.replace(partial, output)
  return total



def corpus_logits(model, params, rows, shards, *, batch_size=128, progress=True, desc='corpus'):
  """(shard, the model's logits [rows of the shard, C]) for each of `shards` of a prepared corpus
  (`data.corpus.CorpusRows`), computed on this process's devices alone (a process scores its own shards)."""
  mesh = train.sharding.local_mesh()
  for shard in tqdm(shards, desc=f'{desc} on {rows.corpus_dir.name}', unit=' shards', disable=not progress):
    yield shard, train.predict(model, params, rows.shard_encoded(shard), mesh=mesh, batch_size=batch_size)['logits']
