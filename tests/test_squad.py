"""The SQuAD question-sentence task: gzipped TSVs read in memory and by the corpus preparation (a small fixture)."""
import gzip

import numpy as np
import pytest

from mkdm_jax.data import corpus, load_split, readers
from mkdm_jax.errors import UserError

HEADER = 'qid\tquestion\tsentence\tlabel\ttitle\tparagraph\n'
ROWS = [('A/0/0', 'When did it begin?', 'It began in 1973.', '1'),
        ('A/0/0', 'When did it begin?', 'Prices rose.', '0'),
        ('A/0/1', 'Who proclaimed it?', 'OAPEC proclaimed it.', '1'),
        ('B/3/7', 'Where is B?', 'B is far.', '0')]


def write(folder, split):
  path = folder / 'squad' / f'squad-v1.1-{split}-pairs.tsv.gz'
  path.parent.mkdir(parents=True, exist_ok=True)
  with gzip.open(path, 'wt', encoding='utf-8') as f:
    f.write(HEADER + ''.join('\t'.join(r) + '\tT\tp\n' for r in ROWS))
  return path


def test_squad_splits_read_with_questions_as_groups(tmp_path):
  write(tmp_path, 'dev')
  dev = load_split('squad', 'dev', tmp_path)
  assert dev.text_a == [r[1] for r in ROWS] and dev.text_b == [r[2] for r in ROWS]
  assert dev.labels.tolist() == [1, 0, 1, 0] and dev.groups.tolist() == [0, 0, 1, 2]
  assert dev.group_names == ['A/0/0', 'A/0/1', 'B/3/7']
  assert dev.ids[0] == readers.row_key(ROWS[0][1], ROWS[0][2], 'A/0/0')
  assert len(load_split('squad', 'dev', tmp_path, max_rows=1)) == 2  # the first question kept whole
  with pytest.raises(UserError, match=r'squad train: file not found.*squad-v1.1-\{train,dev\}-pairs.tsv.gz'):
    load_split('squad', 'train', tmp_path)
  with pytest.raises(UserError, match="unknown split 'test'"):
    load_split('squad', 'test', tmp_path)


def test_gzipped_and_plain_files_give_the_same_rows_and_fingerprint(tmp_path):
  gz = write(tmp_path, 'train')
  plain = tmp_path / 'plain.tsv'
  plain.write_bytes(gzip.decompress(gz.read_bytes()))
  columns = dict(text_a_col='question', text_b_col='sentence', label_col='label', group_col='qid',
                 label_names=['not_answer', 'answer'])
  a, b = readers.read_tsv(gz, **columns), readers.read_tsv(plain, **columns)
  assert a.text_b == b.text_b and np.array_equal(a.ids, b.ids) and a.fingerprint == b.fingerprint


def test_prepare_reads_the_gzipped_pairs_into_a_corpus(tmp_path):
  gz = write(tmp_path, 'train')
  options = corpus.ReadOptions('tsv', 'question', 'sentence', None, 'qid', ('0', '1'), False)
  manifest = corpus.prepare([gz], tmp_path / 'corpus', options, rows_per_shard=3, progress=False)
  assert (manifest['rows'], manifest['shards']) == (4, 2)
