"""Prepared corpora (mkdm_jax.data.corpus, experiments/prepare.py): ArrayRecord shards that give exactly
the rows, ids and batches of the in-memory readers, resume after a kill, and refuse bad input clearly."""
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from mkdm_jax import models
from mkdm_jax.data import Encoded, batches, corpus, encode, readers
from mkdm_jax.errors import UserError

REPO = Path(__file__).resolve().parents[1]
OPTIONS = corpus.ReadOptions('tsv', 'question', 'passage', 'label', 'qid', ('0', '1'))


def write_corpus_file(path, n=70, seed=0, repeat_every=9):
  """A TSV of n labelled pairs of varied lengths; every `repeat_every`-th row repeats an earlier one."""
  rng = np.random.default_rng(seed)
  words = ['alpha', 'beta', 'gamma', 'delta', 'epsilon', 'zeta', 'eta', 'theta', 'iota', 'kappa']
  rows = []
  for i in range(n):
    if i and i % repeat_every == 0:
      rows.append(rows[i // 2])
      continue
    question = ' '.join(rng.choice(words, rng.integers(2, 6)))
    passage = ' '.join(rng.choice(words, rng.integers(3, 40)))
    rows.append((f'Q{i // 4}', question, passage, str(int(rng.integers(2)))))
  path.write_text('qid\tquestion\tpassage\tlabel\n' + ''.join('\t'.join(r) + '\n' for r in rows))
  return path


@pytest.fixture(scope='module')
def tokenizer(minilm_dir):
  return models.load_tokenizer(minilm_dir)


def in_memory(paths, tokenizer, max_length) -> Encoded:
  """The rows of `paths` read into memory and encoded, concatenated in order."""
  parts = [encode(tokenizer, readers.read_tsv(p, text_a_col='question', text_b_col='passage', label_col='label',
                                               group_col='qid', label_names=['0', '1']), max_length) for p in paths]
  arrays = ('input_ids', 'token_type_ids', 'attention_mask', 'lengths', 'labels', 'ids')
  return Encoded(**{k: np.concatenate([getattr(e, k) for e in parts]) for k in arrays}, groups=None,
                 fingerprint='in-memory')


def test_corpus_rows_and_batches_equal_the_in_memory_path(tmp_path, tokenizer, monkeypatch):
  # Shards are tokenised ENCODE_CHUNK rows at a time (bounded memory): 5 here, so 16-row shards take 4 calls.
  monkeypatch.setattr(corpus, 'ENCODE_CHUNK', 5)
  calls = []
  monkeypatch.setattr(corpus, 'encode', lambda tok, examples, n: calls.append(len(examples.text_a)) or
                      encode(tok, examples, n))
  files = [write_corpus_file(tmp_path / 'a.tsv', 70, seed=0), write_corpus_file(tmp_path / 'b.tsv', 45, seed=1)]
  manifest = corpus.prepare(files, tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)
  assert manifest['rows'] == 115 and manifest['shards'] == 8  # 7 full shards and one of 3 rows
  assert [s['rows'] for s in manifest['sources']] == [70, 45]
  assert manifest['sources'][0]['sha256'] == hashlib.sha256(files[0].read_bytes()).hexdigest()
  corpus.encode_corpus(tmp_path / 'corpus', tokenizer, 32, progress=False)
  assert calls == [5, 5, 5, 1] * 7 + [3]
  rows = corpus.CorpusRows(tmp_path / 'corpus', tokenizer, 32)
  expected = in_memory(files, tokenizer, 32)
  np.testing.assert_array_equal(rows.ids, expected.ids)  # row keys, repeats numbered per file
  np.testing.assert_array_equal(rows.labels, expected.labels)
  np.testing.assert_array_equal(rows.lengths, expected.lengths)
  assert rows.lengths.max() == 32 and rows.lengths.min() < 16  # truncated and short rows both present
  last = rows.shard_encoded(7)
  for key in ('input_ids', 'token_type_ids', 'attention_mask', 'ids'):
    np.testing.assert_array_equal(getattr(last, key), getattr(expected, key)[112:], err_msg=key)
  # Shuffled, bucketed batches of the stream equal those of the same rows in memory, key for key.
  streamed = list(batches(rows, 8, seed=3, epoch=1, buckets=(16, 32), process_index=1, process_count=2))
  held = list(batches(expected, 8, seed=3, epoch=1, buckets=(16, 32), process_index=1, process_count=2))
  assert len(streamed) == len(held) == 15
  for a, b in zip(streamed, held):
    assert a.keys() == b.keys()
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert {a['input_ids'].shape[1] for a in streamed} == {16, 32}


def test_an_encoding_is_finished_only_when_every_process_has_encoded_its_shards(tmp_path, tokenizer):
  """Processes encode their shares (shards p mod 2) with encode_shards; finish_encoding then writes the manifest,
  and refuses, naming the missing shards, while a share is not done; unfinished encodings cannot be read."""
  source = write_corpus_file(tmp_path / 'a.tsv', 70)
  corpus.prepare([source], tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)  # 5 shards
  enc_dir = corpus.encode_shards(tmp_path / 'corpus', tokenizer, 32, range(0, 5, 2), progress=False)
  assert sorted(p.name for p in enc_dir.glob('*.lengths.npy')) == [f'shard-0000{i}.lengths.npy' for i in (0, 2, 4)]
  with pytest.raises(UserError, match=r'shards \[1, 3\] are not encoded yet'):
    corpus.finish_encoding(tmp_path / 'corpus', tokenizer, 32)
  with pytest.raises(UserError, match='no finished encoding'):
    corpus.CorpusRows(tmp_path / 'corpus', tokenizer, 32)
  corpus.encode_shards(tmp_path / 'corpus', tokenizer, 32, range(1, 5, 2), progress=False)
  assert corpus.finish_encoding(tmp_path / 'corpus', tokenizer, 32) == enc_dir
  np.testing.assert_array_equal(corpus.CorpusRows(tmp_path / 'corpus', tokenizer, 32).lengths,
                                in_memory([source], tokenizer, 32).lengths)


def test_prepare_resumes_after_a_kill_without_rewriting_finished_shards(tmp_path, monkeypatch):
  source = write_corpus_file(tmp_path / 'a.tsv', 70)
  reference = corpus.prepare([source], tmp_path / 'reference', OPTIONS, rows_per_shard=16, progress=False)
  written = []
  real_write = corpus._write_records

  def dying_write(path, records):
    if len(written) == 2:
      raise KeyboardInterrupt  # the process is killed while writing shard 2
    written.append(path.name)
    real_write(path, records)

  monkeypatch.setattr(corpus, '_write_records', dying_write)
  with pytest.raises(KeyboardInterrupt):
    corpus.prepare([source], tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)
  assert not (tmp_path / 'corpus' / corpus.MANIFEST).exists()
  assert not [p for p in (tmp_path / 'corpus' / 'text').iterdir() if p.name.startswith('.')]  # no temp files
  with pytest.raises(UserError, match='unfinished'):
    corpus.read_manifest(tmp_path / 'corpus')
  written.clear()
  monkeypatch.setattr(corpus, '_write_records', lambda path, records: (written.append(path.name),
                                                                       real_write(path, records)))
  manifest = corpus.prepare([source], tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)
  assert written == ['shard-00002.array_record', 'shard-00003.array_record', 'shard-00004.array_record']
  assert {k: v for k, v in manifest.items()} == reference
  for name in sorted(os.listdir(tmp_path / 'reference' / 'text')):
    assert (tmp_path / 'corpus' / 'text' / name).read_bytes() == (tmp_path / 'reference' / 'text' / name).read_bytes()


def test_prepare_refuses_other_inputs_or_options_in_the_same_folder(tmp_path):
  source = write_corpus_file(tmp_path / 'a.tsv', 20)
  corpus.prepare([source], tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)
  with pytest.raises(UserError, match='rows_per_shard differ'):
    corpus.prepare([source], tmp_path / 'corpus', OPTIONS, rows_per_shard=8, progress=False)
  other = write_corpus_file(tmp_path / 'b.tsv', 20, seed=1)
  with pytest.raises(UserError, match='sources differ'):
    corpus.prepare([other], tmp_path / 'corpus', OPTIONS, rows_per_shard=16, progress=False)


def test_seeded_prefixes_keep_questions_whole_and_nest(tmp_path):
  """order_seed: questions in a seeded order, each whole and in file order; growing max_rows gives nested corpora
  (the stage-1 size curve), the full seeded corpus holds every row once."""
  source = write_corpus_file(tmp_path / 'a.tsv', 70)
  read = lambda folder: [row for shard in range(corpus.read_manifest(folder)['shards'])
                         for row in corpus._text_records(folder / 'text', shard)]
  sizes = {}
  for max_rows in (10, 30, None):
    folder = tmp_path / f'seeded-{max_rows}'
    manifest = corpus.prepare([source], folder, OPTIONS, rows_per_shard=16, progress=False, order_seed=7,
                              max_rows=max_rows)
    sizes[max_rows] = read(folder)
    assert manifest['rows'] == len(sizes[max_rows]) and manifest['order_seed'] == 7
  small, middle, full = sizes[10], sizes[30], sizes[None]
  assert full[:len(small)] == small and full[:len(middle)] == middle  # prefixes of one order
  # Same sources, other rows: other corpora to the logit store (stored logits of one never pass for another's).
  fingerprints = {corpus.CorpusIndex(tmp_path / f'seeded-{n}').fingerprint for n in (10, 30, None)}
  assert len(fingerprints) == 3
  plain = corpus.prepare([source], tmp_path / 'plain', OPTIONS, rows_per_shard=16, progress=False)
  in_file = read(tmp_path / 'plain')
  assert sorted(map(str, full)) == sorted(map(str, in_file)) and full != in_file and plain['rows'] == 70
  questions = [r[3] for r in small]
  assert len(small) >= 10 and all(questions.count(q) == [r[3] for r in in_file].count(q) for q in set(questions))
  assert len(small) - 10 < max(questions.count(q) for q in set(questions))  # rounded up to one whole question
  for q in set(questions):  # each question's rows in file order
    assert [r for r in small if r[3] == q] == [r for r in in_file if r[3] == q]
  with pytest.raises(UserError, match='max_rows=5 takes a seeded prefix'):
    corpus.prepare([source], tmp_path / 'bad', OPTIONS, progress=False, max_rows=5)
  with pytest.raises(UserError, match='differ'):  # another seed into the same folder
    corpus.prepare([source], tmp_path / 'seeded-10', OPTIONS, rows_per_shard=16, progress=False, order_seed=8,
                   max_rows=10)


def test_train_order_seed_trains_on_the_seeded_corpus_prefix(tmp_path):
  """--train_order_seed with --max_train_rows: the training rows are exactly the first questions of a corpus
  prepared with that order seed (a teacher's transfer step sees the stage-1 prefix's pairs); -1 keeps file order."""
  from mkdm_jax import config, context
  source = write_corpus_file(tmp_path / 'a.tsv', 70)
  corpus.prepare([source], tmp_path / 'seeded', OPTIONS, rows_per_shard=16, progress=False, order_seed=7, max_rows=10)
  prefix = [tuple(row[:3]) for row in corpus._text_records(tmp_path / 'seeded' / 'text', 0)]
  flags = dict(workdir=str(tmp_path / 'w'), task='tsv', train_split=str(source), text_a_col='question',
               text_b_col='passage', label_col='label', group_col='qid', max_train_rows=10)
  seeded = context.load_train_rows(config.Config(**flags, train_order_seed=7))
  assert list(zip(seeded.text_a, seeded.text_b, seeded.labels.tolist())) == prefix
  in_file = context.load_train_rows(config.Config(**flags))
  assert len(in_file) == 10 and in_file.text_b != seeded.text_b
  other = context.load_train_rows(config.Config(**flags, train_order_seed=8))
  assert other.text_b != seeded.text_b
  with pytest.raises(UserError, match='--train_order_seed=-2'):
    config.validate(config.Config(**flags, train_order_seed=-2))


def test_malformed_rows_name_file_and_line_or_are_counted(tmp_path):
  source = write_corpus_file(tmp_path / 'a.tsv', 20)
  lines = source.read_text().splitlines()
  lines[6] = 'Q1\tonly two fields'
  source.write_text('\n'.join(lines) + '\n')
  with pytest.raises(UserError, match=f'{source}:7: expected 4 tab-separated fields, found 2'):
    corpus.prepare([source], tmp_path / 'strict', OPTIONS, progress=False)
  lenient = corpus.ReadOptions(**{**OPTIONS.__dict__, 'skip_bad_rows': True})
  manifest = corpus.prepare([source], tmp_path / 'lenient', lenient, progress=False)
  assert manifest['rows'] == 19 and manifest['sources'][0]['skipped'] == 1
  with pytest.raises(UserError, match='no finished encoding'):
    corpus.CorpusRows(tmp_path / 'lenient', models.load_tokenizer(models.resolve_checkpoint('minilm-l6')), 32)


@pytest.mark.slow
def test_prepare_command(tmp_path, minilm_dir):
  """experiments/prepare.py: a glob of sources, an encoding per named tokenizer, and one-line errors."""
  for i in range(2):
    write_corpus_file(tmp_path / f'corpus-{i}.tsv', 30, seed=i)
  script = [sys.executable, str(REPO / 'experiments' / 'prepare.py'), '--noprogress']
  common = [f'--input={tmp_path}/corpus-*.tsv', '--text_a_col=question', '--text_b_col=passage',
            '--group_col=qid', '--tokenizers=minilm-l6', '--max_length=32', '--rows_per_shard=25']
  proc = subprocess.run(script + common + [f'--output={tmp_path / "out"}'], capture_output=True, text=True,
                        cwd=REPO, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report['rows'] == 60 and report['shards'] == 3 and len(report['encodings']) == 1
  rows = corpus.CorpusRows(tmp_path / 'out', models.load_tokenizer(minilm_dir), 32)
  assert len(rows) == 60 and (rows.labels == -1).all()  # no --label_col: unlabelled pairs
  proc = subprocess.run(script + common[1:] + [f'--input={tmp_path}/missing-*.tsv', f'--output={tmp_path / "x"}'],
                        capture_output=True, text=True, cwd=REPO, timeout=600)
  assert proc.returncode == 2 and 'Traceback' not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith('error: --input'), proc.stderr[-2000:]
