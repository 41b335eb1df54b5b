"""Prepared corpora: pair files of any size as ArrayRecord shards, read back by random access with grain.

A corpus folder (written by `prepare`, one streaming pass with bounded memory, resumable after a kill):

  manifest.json                      sources (path, sha256, rows, skipped rows), read options, rows per shard,
                                     shard and row counts; written last, so a folder without it is unfinished
  text/shard-00000.array_record      one record per row: JSON [text_a, text_b, label, group, row key]
  text/shard-00000.rows.npz          that shard's row keys (int64) and labels (int8, -1 = none)
  enc-<key>/manifest.json            one encoding (`encode`): tokenizer, max length, token-id dtype
  enc-<key>/shard-00000.ids.npy      the shard's token ids, unpadded, row after row (uint16 or int32)
  enc-<key>/shard-00000.types.npy    their token type ids (uint8)
  enc-<key>/shard-00000.lengths.npy  tokens per row (int32; written last: marks the shard complete)

Shards hold `rows_per_shard` consecutive rows of the sources read in order (the last one fewer). Row keys are
`readers.row_key`s, occurrences counted per source file as the in-memory readers do, so a prepared corpus and
the same file read into memory give the same ids. Every shard file is written under a temporary name and
renamed when complete; a rerun continues after the last complete shard (encodings likewise).
ArrayRecord files use `group_size:1`, the layout for random access by record. Encodings are flat arrays, memory
mapped when read: a batch is one numpy gather per shard it touches, where an ArrayRecord read cost about 0.13 ms
a call (a 32-row batch of a 1M-pair corpus touches 16 shards; BENCHMARKS.md, Scale).
"""
import dataclasses
import hashlib
import itertools
import json
import logging
from pathlib import Path

import grain
import numpy as np
from array_record.python import array_record_module
from tqdm import tqdm

from mkdm_jax.data import readers
from mkdm_jax.data.tokenize import Encoded, encode, tokenizer_fingerprint
from mkdm_jax import paths
from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = 'manifest.json'
PLAN = 'prepare.json'  # the options of an unfinished prepare, to refuse a resume with other ones
WRITER_OPTIONS = 'group_size:1'
FORMAT_VERSION = 1
ENCODING_LAYOUT = 2  # flat .npy token arrays (1: one ArrayRecord record per row); part of the encoding's key


def _shard_name(i: int) -> str:
  return f'shard-{i:05d}'


def _write_records(path: Path, records):
  def write(tmp):
    writer = array_record_module.ArrayRecordWriter(str(tmp), WRITER_OPTIONS)
    for record in records:
      writer.write(record)
    writer.close()
  paths.write_atomic(path, write)


def _write_npy(path: Path, array):
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.save(f, array)
  paths.write_atomic(path, write)


def _write_npz(path: Path, **arrays):
  def write(tmp):
    with open(tmp, 'wb') as f:
      np.savez(f, **arrays)
  paths.write_atomic(path, write)


def _write_json(path: Path, obj):
  paths.write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def _finished_shards(folder: Path, suffix: str) -> int:
  """How many shards 0, 1, ... in a row have their `suffix` file (the last file a shard writes)."""
  count = 0
  while (folder / f'{_shard_name(count)}{suffix}').is_file():
    count += 1
  return count


@dataclasses.dataclass(frozen=True)
class ReadOptions:
  """How `prepare` reads its sources: format (tsv|jsonl), columns and label names, as the readers take them."""
  format: str
  text_a_col: str
  text_b_col: str
  label_col: str | None = None
  group_col: str | None = None
  label_names: tuple[str, ...] = ('0', '1')
  skip_bad_rows: bool = False

  def open(self, path) -> readers.PairStream:
    if self.format not in ('tsv', 'jsonl'):
      raise UserError(f'unknown corpus format {self.format!r}; expected tsv or jsonl')
    open_pairs = readers.open_jsonl if self.format == 'jsonl' else readers.open_tsv
    return open_pairs(path, text_a_col=self.text_a_col, text_b_col=self.text_b_col, label_col=self.label_col,
                      group_col=self.group_col, label_names=list(self.label_names),
                      skip_bad_rows=self.skip_bad_rows)


def _source_identity(path: Path) -> dict:
  try:
    stat = path.stat()
  except OSError as e:
    raise UserError(f'{path}: cannot read file: {e.strerror}') from e
  return {'path': str(path.absolute()), 'bytes': stat.st_size, 'mtime_ns': stat.st_mtime_ns}


def _rows(sources, options: ReadOptions, report):
  """(text_a, text_b, label, group, row key) of every source row in order; fills `report` per source."""
  for path in sources:
    stream = options.open(path)
    keyer = readers.RowKeyer()  # occurrences count per file, as for in-memory reads
    rows = 0
    for a, b, label, group in stream:
      rows += 1
      yield a, b, label, group, keyer(a, b, group)
    stream.warn_skipped()
    report.append({'path': str(Path(path).absolute()), 'sha256': stream.file_sha256(), 'rows': rows,
                   'skipped': stream.skipped})


def seeded_order(groups, seed, max_rows=None) -> list[int]:
  """Row positions with their questions (`groups[i]`; None: the row is its own) in the order of a permutation
  seeded by `seed`, each question's rows together and in file order; with `max_rows`, the first questions holding
  at least that many rows. The order depends on the seed alone, so a smaller `max_rows` is a prefix of a larger
  one. Prepared corpora (`prepare`'s order_seed) and --train_order_seed share it."""
  first = {}  # group -> its rows' positions, groups in file order
  for i, group in enumerate(groups):
    first.setdefault(group if group is not None else ('row', i), []).append(i)
  questions = list(first.values())
  out = []
  for g in np.random.default_rng(seed).permutation(len(questions)):
    if max_rows is not None and len(out) >= max_rows:
      break
    out.extend(questions[g])
  return out


def seeded_prefix(rows, seed, max_rows=None):
  """The rows (a, b, label, group, ...) in `seeded_order`."""
  rows = list(rows)
  return [rows[i] for i in seeded_order([row[3] for row in rows], seed, max_rows)]


def prepare(sources, out_dir, options: ReadOptions, *, rows_per_shard=65536, progress=True, order_seed=None,
            max_rows=None) -> dict:
  """Converts pair files into a corpus folder (see the module doc); returns its manifest.

  A rerun after a kill continues after the last complete shard; a finished corpus is left as it is. A
  rerun with other sources or options is an error naming the difference (use a new folder). With `order_seed`
  the rows are held in memory and written in `seeded_prefix` order (questions shuffled, kept whole), cut after
  `max_rows` rows rounded up to whole questions: corpora of one seed and growing sizes nest.
  """
  sources = [Path(p) for p in sources]
  if not sources:
    raise UserError('no input files to prepare')
  if rows_per_shard < 1:
    raise UserError(f'rows_per_shard must be at least 1, got {rows_per_shard}')
  out_dir = Path(out_dir)
  if max_rows is not None and (order_seed is None or max_rows < 1):
    raise UserError(f'max_rows={max_rows} takes a seeded prefix: it needs an order seed and at least one row')
  plan = {'version': FORMAT_VERSION, 'sources': [_source_identity(p) for p in sources],
          'options': dataclasses.asdict(options), 'rows_per_shard': rows_per_shard,
          **({'order_seed': order_seed, 'max_rows': max_rows} if order_seed is not None else {})}
  _check_plan(out_dir, plan)
  if (out_dir / MANIFEST).is_file():
    return read_manifest(out_dir)
  text_dir = out_dir / 'text'
  text_dir.mkdir(parents=True, exist_ok=True)
  _write_json(out_dir / PLAN, plan)
  done = _finished_shards(text_dir, '.rows.npz')
  report = []
  rows = _rows(sources, options, report)
  if order_seed is not None:
    rows = iter(seeded_prefix(rows, order_seed, max_rows))
  resumed_rows = sum(1 for _ in itertools.islice(rows, done * rows_per_shard))  # written before a kill
  if done:
    log.info('%s: resuming after %d complete shards (%d rows)', out_dir, done, resumed_rows)
  shard, written = done, resumed_rows
  with tqdm(total=None, initial=resumed_rows, unit=' rows', desc=f'prepare {out_dir.name}',
            disable=not progress) as bar:
    while chunk := list(itertools.islice(rows, rows_per_shard)):
      name = _shard_name(shard)
      _write_records(text_dir / f'{name}.array_record',
                     (json.dumps(row, ensure_ascii=False).encode() for row in chunk))
      _write_npz(text_dir / f'{name}.rows.npz', ids=np.array([r[4] for r in chunk], np.int64),
                 labels=np.array([r[2] for r in chunk], np.int8))
      shard += 1
      written += len(chunk)
      bar.update(len(chunk))
  if written == 0:
    raise UserError(f'{", ".join(map(str, sources))}: no valid data rows')
  manifest = dict(plan, sources=report, rows=written, shards=shard)
  _write_json(out_dir / MANIFEST, manifest)
  (out_dir / PLAN).unlink(missing_ok=True)
  return manifest


def _check_plan(out_dir: Path, plan: dict):
  """Refuses to continue or reuse a corpus made from other sources or options."""
  for name in (MANIFEST, PLAN):
    path = out_dir / name
    if not path.is_file():
      continue
    stored = json.loads(path.read_text())
    stored_plan, wanted = {k: stored.get(k) for k in plan}, json.loads(json.dumps(plan))
    if name == MANIFEST:  # the manifest holds sha256 and counts per source; compare paths only
      stored_plan['sources'] = [s['path'] for s in stored['sources']]
      wanted['sources'] = [s['path'] for s in plan['sources']]
    if stored_plan != wanted:
      diff = sorted(k for k in wanted if stored_plan.get(k) != wanted[k])
      raise UserError(f'{out_dir} was prepared from other inputs or options ({", ".join(diff)} differ: '
                      f'{path} has {[stored_plan.get(k) for k in diff]}); use a new output folder')


def read_manifest(corpus_dir) -> dict:
  path = Path(corpus_dir) / MANIFEST
  if not path.is_file():
    state = 'unfinished (rerun prepare to complete it)' if (Path(corpus_dir) / PLAN).is_file() else 'missing'
    raise UserError(f'{corpus_dir}: not a prepared corpus: {path} is {state}')
  return json.loads(path.read_text())


def encoding_key(tokenizer, max_length: int) -> str:
  text = f'{tokenizer_fingerprint(tokenizer)}\n{max_length}\nlayout {ENCODING_LAYOUT}'
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def _text_records(text_dir: Path, shard: int) -> list[list]:
  source = grain.sources.ArrayRecordDataSource([str(text_dir / f'{_shard_name(shard)}.array_record')])
  return [json.loads(r) for r in source.__getitems__(range(len(source)))]


ENCODE_CHUNK = 4096  # rows per tokenizer call: its Encoding objects (about 5 KB a row) stay a few MB


def _encode_rows(tokenizer, rows, max_length, dtype, fingerprint, source):
  """(token ids in `dtype`, uint8 type ids, int32 lengths) of text rows, unpadded and concatenated, tokenised
  ENCODE_CHUNK rows at a time so the tokenizer's per-row objects never hold a whole shard (a 65,536-row call
  held about 500 MB, and glibc's per-thread arenas kept it)."""
  ids, types, lengths = [], [], []
  for start in range(0, len(rows), ENCODE_CHUNK):
    chunk = rows[start:start + ENCODE_CHUNK]
    examples = readers.Examples([r[0] for r in chunk], [r[1] for r in chunk], np.array([r[2] for r in chunk], np.int32),
                                None, np.array([r[4] for r in chunk], np.int64), source,
                                fingerprint=f'{fingerprint}:{start}')
    encoded = encode(tokenizer, examples, max_length)
    real = encoded.attention_mask.astype(bool)  # right padding: row-major order keeps each row's tokens together
    ids.append(encoded.input_ids[real].astype(dtype))
    types.append(encoded.token_type_ids[real].astype(np.uint8))
    lengths.append(encoded.lengths.astype(np.int32))
  return np.concatenate(ids), np.concatenate(types), np.concatenate(lengths)


def _encoding(corpus_dir, tokenizer, max_length: int):
  """(corpus manifest, encoding folder, token-id dtype, lengths file of shard i) of one encoding."""
  corpus_dir = Path(corpus_dir)
  enc_dir = corpus_dir / f'enc-{encoding_key(tokenizer, max_length)}'
  dtype = np.dtype(np.uint16 if tokenizer.get_vocab_size() <= 2**16 else np.int32)
  return read_manifest(corpus_dir), enc_dir, dtype, lambda shard: enc_dir / f'{_shard_name(shard)}.lengths.npy'


def encode_shards(corpus_dir, tokenizer, max_length: int, shards, *, progress=True) -> Path:
  """Encodes those of `shards` not yet encoded for `tokenizer` at `max_length` (processes pass their own
  share, e.g. range(p, S, n)); returns the encoding's folder. `finish_encoding` completes it."""
  manifest, enc_dir, dtype, lengths_file = _encoding(corpus_dir, tokenizer, max_length)
  if (enc_dir / MANIFEST).is_file():
    return enc_dir
  enc_dir.mkdir(exist_ok=True)
  todo = [s for s in shards if not lengths_file(s).is_file()]
  for shard in tqdm(todo, desc=f'encode {Path(corpus_dir).name}', unit=' shards', disable=not progress):
    rows = _text_records(Path(corpus_dir) / 'text', shard)
    ids, types, lengths = _encode_rows(tokenizer, rows, max_length, dtype, f'{enc_dir.name}:{shard}', str(corpus_dir))
    _write_npy(enc_dir / f'{_shard_name(shard)}.ids.npy', ids)
    _write_npy(enc_dir / f'{_shard_name(shard)}.types.npy', types)
    _write_npy(lengths_file(shard), lengths)  # last: marks the shard complete
  return enc_dir


def finish_encoding(corpus_dir, tokenizer, max_length: int) -> Path:
  """Writes the encoding's manifest once every shard is encoded (one process does this after all have
  encoded their share); returns the encoding's folder."""
  manifest, enc_dir, dtype, lengths_file = _encoding(corpus_dir, tokenizer, max_length)
  if not (enc_dir / MANIFEST).is_file():
    missing = [s for s in range(manifest['shards']) if not lengths_file(s).is_file()]
    if missing:
      raise UserError(f'{enc_dir}: shards {missing[:5]} are not encoded yet (another process still working?)')
    _write_json(enc_dir / MANIFEST, {'tokenizer': tokenizer_fingerprint(tokenizer), 'max_length': max_length,
                                     'dtype': dtype.name, 'shards': manifest['shards']})
  return enc_dir


def encode_corpus(corpus_dir, tokenizer, max_length: int, *, progress=True) -> Path:
  """Adds (or completes) the corpus's encoding for `tokenizer` at `max_length`; returns its folder."""
  encode_shards(corpus_dir, tokenizer, max_length, range(read_manifest(corpus_dir)['shards']), progress=progress)
  return finish_encoding(corpus_dir, tokenizer, max_length)


class CorpusLogits:
  """Teacher logits of every corpus row, [N, T, C] by position, read from per-shard arrays on disk (memory
  mapped): what `batches` needs as an `extra` array without holding N x T x C floats in memory."""

  def __init__(self, per_teacher: list[list[np.ndarray]], shard_rows: list[int]):
    if any(len(shards) != len(shard_rows) or [len(a) for a in shards] != list(shard_rows) for shards in per_teacher):
      raise ValueError('every teacher needs one logits array per corpus shard, of the shard\'s length')
    self._per_teacher = per_teacher
    self._starts = np.cumsum([0] + list(shard_rows))

  def __len__(self):
    return int(self._starts[-1])

  def __getitem__(self, rows) -> np.ndarray:
    rows = np.asarray(rows)
    shard = np.searchsorted(self._starts, rows, side='right') - 1
    offset = rows - self._starts[shard]
    out = np.empty((len(rows), len(self._per_teacher), self._per_teacher[0][0].shape[1]), np.float32)
    for s in np.unique(shard):
      at = np.flatnonzero(shard == s)
      for t, shards in enumerate(self._per_teacher):
        out[at, t] = shards[s][offset[at]]
    return out


class CorpusIndex:
  """A prepared corpus's row keys and labels, shard by shard, without an encoding: what a teacher that reads no
  tokens (imported scores) needs of it."""

  def __init__(self, corpus_dir):
    self.corpus_dir = Path(corpus_dir)
    self.manifest = read_manifest(self.corpus_dir)
    self._shard_names = [_shard_name(i) for i in range(self.manifest['shards'])]
    self.shard_rows = []
    ids, labels = [], []
    for s in self._shard_names:
      with np.load(self.corpus_dir / 'text' / f'{s}.rows.npz') as z:
        ids.append(z['ids'])
        labels.append(z['labels'].astype(np.int32))
        self.shard_rows.append(len(z['ids']))
    self.ids, self.labels = np.concatenate(ids), np.concatenate(labels)
    self.groups = None
    # The whole manifest: the sources, and which of their rows in which order (a seeded prefix of one source
    # is another corpus with the same sources).
    self._identity = json.dumps(self.manifest, sort_keys=True)
    self.fingerprint = hashlib.sha256(f'{self._identity}\nrow keys'.encode()).hexdigest()
    self._shard_starts = np.cumsum([0] + self.shard_rows)

  def __len__(self):
    return len(self.ids)

  def shard_ids(self, shard: int) -> np.ndarray:
    return self.ids[self._shard_starts[shard]:self._shard_starts[shard + 1]]


class CorpusRows(CorpusIndex):
  """One encoding of a prepared corpus, read by random access: what `batches` needs of an `Encoded`
  (lengths, labels, ids, max_length, `tokens`) with only the small per-row arrays in memory."""

  def __init__(self, corpus_dir, tokenizer, max_length: int):
    super().__init__(corpus_dir)
    enc_dir = self.corpus_dir / f'enc-{encoding_key(tokenizer, max_length)}'
    if not (enc_dir / MANIFEST).is_file():
      raise UserError(f'{self.corpus_dir}: no finished encoding for this tokenizer at max_length {max_length}; '
                      'run encode_corpus (the logits stage does) first')
    shards = self._shard_names
    self.max_length = max_length
    per_shard_lengths = [np.load(enc_dir / f'{s}.lengths.npy') for s in shards]
    self.lengths = np.concatenate(per_shard_lengths)
    self.fingerprint = hashlib.sha256(f'{self._identity}\n{enc_dir.name}'.encode()).hexdigest()
    # Each row's first token within its shard's flat arrays (int64: 8 bytes a row), and the arrays, mapped lazily.
    self._token_starts = np.concatenate([np.cumsum(n, dtype=np.int64) - n for n in per_shard_lengths])
    self._enc_dir = enc_dir
    self._arrays = [None] * len(shards)

  def _shard_arrays(self, shard: int) -> tuple[np.ndarray, np.ndarray]:
    if self._arrays[shard] is None:
      name = self._enc_dir / self._shard_names[shard]
      self._arrays[shard] = (np.load(f'{name}.ids.npy', mmap_mode='r'), np.load(f'{name}.types.npy', mmap_mode='r'))
    return self._arrays[shard]

  def tokens(self, rows, length: int) -> dict[str, np.ndarray]:
    """input_ids, token_type_ids, attention_mask int32 [len(rows), length] of the rows at these positions."""
    rows = np.asarray(rows)
    real = np.arange(length)[None, :] < self.lengths[rows][:, None]
    input_ids, token_type_ids = np.zeros((2, len(rows), length), np.int32)
    # Token t of row r is element token_starts[r] + t of its shard's flat arrays: one gather per shard touched.
    flat = self._token_starts[rows][:, None] + np.arange(length)[None, :]
    shard = np.searchsorted(self._shard_starts, rows, side='right') - 1
    for s in np.unique(shard):
      ids, types = self._shard_arrays(s)
      mask = real & (shard == s)[:, None]
      input_ids[mask], token_type_ids[mask] = ids[flat[mask]], types[flat[mask]]
    return {'input_ids': input_ids, 'token_type_ids': token_type_ids, 'attention_mask': real.astype(np.int32)}

  def shard_encoded(self, shard: int) -> Encoded:
    """The rows of one shard as an in-memory `Encoded` (for scoring shard by shard)."""
    rows = np.arange(self._shard_starts[shard], self._shard_starts[shard + 1])
    tokens = self.tokens(rows, self.max_length)
    return Encoded(**tokens, lengths=self.lengths[rows], labels=self.labels[rows], ids=self.ids[rows], groups=None,
                   fingerprint=f'{self.fingerprint}:{shard}')
