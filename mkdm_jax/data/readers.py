"""Strict readers for tab-separated and JSON-lines pair files, producing `Examples`.

File rules (both formats):
  * UTF-8 (a leading BOM is allowed); LF or CRLF line ends.
  * Blank lines at the end of a file are ignored; a blank line before the last row is a malformed row.
  * Every malformed row (bad UTF-8, wrong field count, empty text, unknown label, ...) raises `UserError`
    naming `file:line` and the problem, unless `skip_bad_rows=True`: then it is skipped, counted in
    `Examples.skipped` and reported once through `logging`.
  * Empty files and header-only files always raise.
TSV has no quoting (WikiQA sentences contain bare quotes): fields are split on every tab.
Row ids are `row_key`s of the rows' texts and raw group, so they do not move when other rows are skipped.
"""
import dataclasses
import gzip
import hashlib
import itertools
import json
import logging
from pathlib import Path

import numpy as np

from mkdm_jax.errors import UserError

_log = logging.getLogger(__name__)


# Part of every fingerprint made here: caches and logit stores made before ids were `row_key`s (they were
# positions 0..N-1) have other fingerprints, so they are recomputed rather than read with the wrong ids.
ID_SCHEME = "row_key/1"


def row_key(text_a: str, text_b: str, group: str | None = None, occurrence: int = 0) -> int:
  r"""The id of a row: a signed 64-bit integer that anyone can recompute from the data.

  Recipe: write the JSON array [text_a, text_b, group, occurrence] with no whitespace (group is null when
  the data has no group column; occurrence is a decimal integer), writing non-ASCII characters as they are
  and escaping only " and \ (as \" and \\) and the control characters U+0000..U+001F (as \b \t \n \f \r,
  the others as \u00xx with lower-case hex digits). Encode it as UTF-8, take the first 8 bytes of its
  BLAKE2b digest (the default 64-byte digest, no key) and read them as a big-endian two's-complement
  integer. Python's json.dumps(value, ensure_ascii=False, separators=(",", ":")) and JavaScript's
  JSON.stringify(value) write exactly this JSON: row_key("q?", "p.", "Q1") hashes ["q?","p.","Q1",0].
  `group` is the raw group value as a string (e.g. WikiQA's QuestionID). `occurrence` is 0 for the first
  row with this (text_a, text_b, group) in a file, 1 for the next identical one, and so on.
  """
  text = json.dumps([text_a, text_b, group, occurrence], ensure_ascii=False, separators=(",", ":"))
  return int.from_bytes(hashlib.blake2b(text.encode("utf-8")).digest()[:8], "big", signed=True)


def check_unique_ids(ids: np.ndarray, source: str):
  """Raises UserError if two rows share an id (a 64-bit hash collision of two different rows)."""
  keys, counts = np.unique(ids, return_counts=True)
  if np.any(counts > 1):
    raise UserError(f"{source}: different rows share the row key {keys[counts > 1][0]} (a hash collision); "
                    "change one character of one of them")


class RowKeyer:
  """Gives each row of a file, in file order, its `row_key`, counting repeats of identical rows.

  Rows are told apart by their occurrence-0 key (not their texts), held in a sorted int64 array (8 bytes a
  distinct row: a dict of Python ints cost about 100, which made prepare's memory grow with the corpus)
  plus a set of the newest keys, merged into the array every MERGE_EVERY rows; only repeated rows get a
  dict entry. Two different rows sharing a 64-bit key (odds about N^2 / 2^65) would be numbered as repeats
  of one row instead of failing `check_unique_ids`.
  """
  MERGE_EVERY = 65536

  def __init__(self):
    self._merged = np.empty(0, np.int64)
    self._recent = set()
    self._repeats = {}  # occurrence-0 key -> occurrences seen after the first

  def _seen(self, key: int) -> bool:
    if key in self._recent:
      return True
    i = int(np.searchsorted(self._merged, key))
    return i < len(self._merged) and int(self._merged[i]) == key

  def __call__(self, text_a: str, text_b: str, group: str | None) -> int:
    first = row_key(text_a, text_b, group, 0)
    if not self._seen(first):
      self._recent.add(first)
      if len(self._recent) >= self.MERGE_EVERY:
        # The new keys are unseen, so a concatenation sorted in place is the union (np.union1d's unique pass
        # held 4-5 copies of the table at once: prepare's memory then grew by 40 bytes a row).
        self._merged = np.concatenate([self._merged, np.fromiter(self._recent, np.int64, len(self._recent))])
        self._merged.sort()
        self._recent = set()
      return first
    occurrence = self._repeats.get(first, 0) + 1
    self._repeats[first] = occurrence
    return row_key(text_a, text_b, group, occurrence)


def row_keys(text_a: list[str], text_b: list[str], groups: list[str] | None, source: str) -> np.ndarray:
  """int64 [N] `row_key`s of rows in file order; `groups` holds each row's raw group, or is None."""
  keyer = RowKeyer()
  ids = np.array([keyer(*row) for row in zip(text_a, text_b, groups or [None] * len(text_a))], dtype=np.int64)
  check_unique_ids(ids, source)
  return ids


@dataclasses.dataclass
class Examples:
  """Sentence pairs with labels (-1 = none), optional question groups and stable row ids.

  `fingerprint` identifies the rows, ids included (readers hash the file, the read options and
  `ID_SCHEME`; `select` and `make_unlabelled_pairs` derive theirs from the parent's).
  """
  text_a: list[str]
  text_b: list[str]
  labels: np.ndarray  # int32 [N], -1 = no label
  groups: np.ndarray | None  # int64 [N] group code (question index in order of first appearance)
  ids: np.ndarray  # int64 [N] unique row ids: `row_key`s for data from a reader
  source: str
  fingerprint: str
  skipped: int = 0
  group_names: list[str] | None = None  # raw group id of each group code; set exactly when `groups` is

  def __post_init__(self):
    if (self.groups is None) != (self.group_names is None):
      raise ValueError("give group_names (the raw group id of each code) exactly when groups are given")

  def __len__(self):
    return len(self.text_a)

  def select(self, indices) -> "Examples":
    """Rows at `indices` (positions), with a fingerprint derived from the parent's and the indices.

    Group codes and `group_names` are kept as they are (names of groups left without rows stay).
    """
    idx = np.asarray(indices, dtype=np.int64)
    return dataclasses.replace(
        self,
        text_a=[self.text_a[i] for i in idx],
        text_b=[self.text_b[i] for i in idx],
        labels=self.labels[idx],
        groups=None if self.groups is None else self.groups[idx],
        ids=self.ids[idx],
        fingerprint=hashlib.sha256(self.fingerprint.encode() + idx.tobytes()).hexdigest())


class RowError(Exception):
  """A malformed row; readers turn it into a `UserError` naming file and line."""


def parse_label(value, label_names: list[str]) -> int:
  """A label given as one of `label_names` or as its integer index."""
  if isinstance(value, str):
    text = value.strip()
    if text in label_names:
      return label_names.index(text)
    if text in [str(i) for i in range(len(label_names))]:
      return int(text)
  elif isinstance(value, int) and not isinstance(value, bool) and 0 <= value < len(label_names):
    return value
  allowed = ", ".join(repr(n) for n in label_names)
  raise RowError(f"unknown label {value!r}; allowed: {allowed} or 0..{len(label_names) - 1}")


def check_unicode(value: str, column) -> str:
  """`value`, if it is valid Unicode (JSON escapes can make lone surrogates, which `row_key` cannot hash)."""
  try:
    value.encode("utf-8")
  except UnicodeEncodeError as e:
    raise RowError(f"field {column!r} is not valid Unicode (lone surrogate at character {e.start + 1})") from None
  return value


def check_text(value, column) -> str:
  """A non-empty text field."""
  if not isinstance(value, str):
    raise RowError(f"field {column!r} must be a string, got {type(value).__name__}")
  if not value.strip():
    raise RowError(f"empty {column!r} field")
  return check_unicode(value, column)


class _Lines:
  """A file's numbered lines (without line ends), read one at a time, and the sha256 of its (for *.gz,
  decompressed) bytes.

  Blank lines at the end of the file are dropped; a blank line before a row is yielded as it is (the row
  parser rejects it). Memory is bounded by the longest run of blank lines, not the file size.
  """

  def __init__(self, path: Path):
    self.path = path
    try:
      # Closed by sha256(), which every reader calls.
      self._file = (gzip.open if path.suffix == ".gz" else open)(path, "rb")  # noqa: SIM115
    except OSError as e:
      raise UserError(f"{path}: cannot read file: {e.strerror}") from e
    self._hash = hashlib.sha256()
    self._numbered = self._read()
    self.first = next(self._numbered, None)
    if self.first is None:
      self._file.close()
      raise UserError(f"{path}: file is empty")

  def _read(self):
    blanks = []
    for lineno, line in enumerate(self._file, start=1):
      self._hash.update(line)
      line = line[:-1] if line.endswith(b"\n") else line
      line = line[:-1] if line.endswith(b"\r") else line
      if not line.strip():
        blanks.append((lineno, line))
        continue
      yield from blanks
      blanks = []
      yield lineno, line

  def __iter__(self):
    """The lines after `first`."""
    return self._numbered

  def sha256(self) -> str:
    """The whole file's sha256 (the unread rest is hashed too); closes the file."""
    for chunk in iter(lambda: self._file.read(1 << 20), b""):
      self._hash.update(chunk)
    self._file.close()
    return self._hash.hexdigest()


def _decode(line: bytes, lineno: int) -> str:
  try:
    return line.decode("utf-8-sig" if lineno == 1 else "utf-8")
  except UnicodeDecodeError as e:
    raise RowError(f"not valid UTF-8 (byte 0x{line[e.start]:02x} at column {e.start + 1})") from None


class PairStream:
  """The rows of a pair file, parsed as they are read: iterating yields (text_a, text_b, label, group).

  Made by `open_tsv` / `open_jsonl`, which check the header (TSV) at once. A malformed row raises
  `UserError` naming file and line, or with `skip_bad_rows` is counted in `skipped` (`first_error` holds the
  first). `labelled` / `grouped` say whether rows carry labels / raw group ids (-1 / None otherwise);
  `options` are the read options that, with the file's hash, make the rows' fingerprint.
  """

  def __init__(self, lines: _Lines, data_lines, parse_row, *, options, labelled, grouped, skip_bad_rows):
    self.path = lines.path
    self.options = options
    self.labelled = labelled
    self.grouped = grouped
    self.skipped = 0
    self.first_error = None
    self._lines = lines
    self._data_lines = data_lines
    self._parse_row = parse_row
    self._skip_bad_rows = skip_bad_rows

  def __iter__(self):
    for lineno, raw in self._data_lines:
      try:
        if not raw.strip():
          raise RowError("blank line before the end of the file")
        row = self._parse_row(_decode(raw, lineno))
      except RowError as e:
        if not self._skip_bad_rows:
          raise UserError(f"{self.path}:{lineno}: {e}") from None
        self.skipped += 1
        self.first_error = self.first_error or f"line {lineno}: {e}"
        continue
      yield row

  def file_sha256(self) -> str:
    """The whole file's sha256 (call once, after reading the rows you need)."""
    return self._lines.sha256()

  def warn_skipped(self):
    """Logs the count of skipped rows and the first one's problem (once, at the end of a read)."""
    if self.skipped:
      _log.warning("%s: skipped %d malformed rows (first: %s)", self.path, self.skipped, self.first_error)


def _build(stream: PairStream, rows, max_rows, whole_groups) -> Examples:
  """Examples from a stream's parsed rows [(text_a, text_b, label, group)]."""
  stream.warn_skipped()
  path = stream.path
  if not rows:
    raise UserError(f"{path}: no valid data rows" +
                    (f" ({stream.skipped} malformed rows skipped)" if stream.skipped else ""))
  text_a, text_b, labels, groups = (list(column) for column in zip(*rows))
  if groups[0] is None:
    groups = codes = names = None
  else:
    index = {}
    codes = np.array([index.setdefault(g, len(index)) for g in groups], dtype=np.int64)
    names = list(index)
  ids = row_keys(text_a, text_b, groups, str(path))
  options = dict(stream.options, max_rows=max_rows, whole_groups=whole_groups, ids=ID_SCHEME)
  fingerprint = hashlib.sha256((stream.file_sha256() + json.dumps(options, sort_keys=True)).encode())
  return Examples(text_a, text_b, np.array(labels, dtype=np.int32), codes, ids, str(path),
                  fingerprint.hexdigest(), stream.skipped, names)


def _collect(stream: PairStream, *, max_rows, whole_groups) -> Examples:
  """The stream's rows in memory, the first `max_rows` of them when given (with `whole_groups`, rounded
  up to the end of the last group so that no group is cut)."""
  if max_rows is not None and max_rows < 1:
    raise UserError(f"max_rows must be at least 1, got {max_rows}")
  rows, full, keep_group = [], False, whole_groups and stream.grouped
  for row in stream:
    if full and row[3] != rows[-1][3]:
      break  # whole_groups: the last group is complete.
    rows.append(row)
    full = max_rows is not None and len(rows) >= max_rows
    if full and not keep_group:
      break  # rows after the last one kept are not read (nor checked)
  return _build(stream, rows, max_rows, whole_groups)


def _first_line(lines: _Lines) -> str:
  try:
    return _decode(lines.first[1], 1)
  except RowError as e:
    raise UserError(f"{lines.path}:1: {e}") from None


def _is_index(col) -> bool:
  return isinstance(col, int) or (isinstance(col, str) and col.isascii() and col.isdigit())


def open_tsv(path, *, text_a_col, text_b_col, label_col=None, group_col=None, label_names,
             optional_label=False, skip_bad_rows=False) -> PairStream:
  """A `PairStream` of a TSV file of pairs.

  Columns are header names, or integer indices (ints or digit strings) for a file without a header.
  `label_col=None` gives unlabelled rows (-1); so does a missing label column when `optional_label`.
  """
  path = Path(path)
  cols = [c for c in (text_a_col, text_b_col, label_col, group_col) if c is not None]
  if text_a_col is None or text_b_col is None:
    raise UserError(f"{path}: give both text columns (text_a_col and text_b_col)")
  indexed = [_is_index(c) for c in cols]
  if any(indexed) and not all(indexed):
    raise UserError(f"{path}: columns must be all header names or all integer indices, got {cols}")
  lines = _Lines(path)
  first = _first_line(lines)
  if all(indexed):  # No header: the first row sets the field count.
    data_lines = itertools.chain([lines.first], lines)
    width = len(first.split("\t"))
    positions = [int(c) for c in cols]
    if max(positions) >= width:
      raise UserError(f"{path}:1: column index {max(positions)} out of range for rows of {width} fields")
  else:
    data_lines = iter(lines)
    header = first.split("\t")
    second = next(data_lines, None)
    if second is None:
      raise UserError(f"{path}: has a header line but no data rows")
    data_lines = itertools.chain([second], data_lines)
    if optional_label and label_col not in header:
      label_col = None
      cols = [c for c in (text_a_col, text_b_col, group_col) if c is not None]
    missing = [c for c in cols if c not in header]
    if missing:
      raise UserError(f"{path}:1: header lacks column(s) {missing}; found {header}")
    width = len(header)
    positions = [header.index(c) for c in cols]
  names = [str(c) for c in cols]
  has_label, has_group = label_col is not None, group_col is not None

  def parse_row(line):
    fields = line.split("\t")
    if len(fields) != width:
      raise RowError(f"expected {width} tab-separated fields, found {len(fields)}")
    values = [fields[p] for p in positions]
    a = check_text(values[0], names[0])
    b = check_text(values[1], names[1])
    label = parse_label(values[2], label_names) if has_label else -1
    group = check_text(values[-1], names[-1]) if has_group else None
    return a, b, label, group

  options = dict(format="tsv", columns=names, labelled=has_label, label_names=label_names)
  return PairStream(lines, data_lines, parse_row, options=options, labelled=has_label, grouped=has_group,
                    skip_bad_rows=skip_bad_rows)


def open_jsonl(path, *, text_a_col, text_b_col, label_col=None, group_col=None, label_names,
               skip_bad_rows=False) -> PairStream:
  """A `PairStream` of a JSON-lines file: one object per line with the given keys (labels as names or ints)."""
  path = Path(path)
  if text_a_col is None or text_b_col is None:
    raise UserError(f"{path}: give both text keys (text_a_col and text_b_col)")
  lines = _Lines(path)

  def parse_row(line):
    try:
      obj = json.loads(line)
    except json.JSONDecodeError as e:
      raise RowError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    except RecursionError:
      raise RowError("JSON nested too deeply") from None
    if not isinstance(obj, dict):
      raise RowError(f"expected a JSON object, got {type(obj).__name__}")
    missing = [k for k in (text_a_col, text_b_col, label_col, group_col) if k is not None and k not in obj]
    if missing:
      raise RowError(f"missing key(s) {missing}")
    a = check_text(obj[text_a_col], text_a_col)
    b = check_text(obj[text_b_col], text_b_col)
    label = -1 if label_col is None else parse_label(obj[label_col], label_names)
    group = None
    if group_col is not None:
      group = obj[group_col]
      if not isinstance(group, (str, int)) or isinstance(group, bool) or not str(group).strip():
        raise RowError(f"group {group_col!r} must be a non-empty string or an integer, got {group!r}")
      group = check_unicode(str(group), group_col)
    return a, b, label, group

  options = dict(format="jsonl", columns=[text_a_col, text_b_col, label_col, group_col], label_names=label_names)
  return PairStream(lines, itertools.chain([lines.first], lines), parse_row, options=options,
                    labelled=label_col is not None, grouped=group_col is not None, skip_bad_rows=skip_bad_rows)


def read_tsv(path, *, label_names, optional_label=False, skip_bad_rows=False, max_rows=None, whole_groups=False,
             **columns) -> Examples:
  """A TSV file of pairs in memory (`open_tsv`'s rows); `max_rows` keeps the first rows (with
  `whole_groups`, rounded up to the end of the last group, so no group is cut)."""
  stream = open_tsv(path, **columns, label_names=label_names, optional_label=optional_label,
                    skip_bad_rows=skip_bad_rows)
  return _collect(stream, max_rows=max_rows, whole_groups=whole_groups)


def read_jsonl(path, *, label_names, skip_bad_rows=False, max_rows=None, whole_groups=False, **columns) -> Examples:
  """A JSON-lines file of pairs in memory (`open_jsonl`'s rows); `max_rows` as in `read_tsv`."""
  stream = open_jsonl(path, **columns, label_names=label_names, skip_bad_rows=skip_bad_rows)
  return _collect(stream, max_rows=max_rows, whole_groups=whole_groups)
