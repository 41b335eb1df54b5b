"""Imported teacher scores and bi-encoder teachers against hand computations."""
import gzip
import json

import numpy as np
import pytest

from mkdm_jax import teachers
from mkdm_jax.teachers import base, biencoder, overlap, scores
from mkdm_jax.errors import UserError


def test_parse_spec():
  assert teachers.parse_spec('minilm-l6') == ('checkpoint', 'minilm-l6')
  assert teachers.parse_spec('biencoder:mpnet-base') == ('biencoder', 'mpnet-base')
  assert teachers.parse_spec('scores:/tmp/a.tsv') == ('scores', '/tmp/a.tsv')
  assert teachers.parse_spec('C:/models/x') == ('checkpoint', 'C:/models/x')
  assert teachers.parse_spec('overlap:idf') == ('overlap', 'idf')
  with pytest.raises(UserError, match='after scores:'):
    teachers.parse_spec('scores:')
  with pytest.raises(UserError, match='expected overlap:count or overlap:idf'):
    teachers.parse_spec('overlap:bm25')


def test_read_scalar_and_logit_scores(tmp_path):
  tsv = tmp_path / 's.tsv'
  tsv.write_text('group\trow\tlabel\tscore\thead_0\nQ1\t-5\t1\t0.25\t0.2\nQ1\t7\t0\t-1.5\t0.1\n')
  keys, values = scores.read_scores(tsv, 2)
  assert keys.tolist() == [-5, 7] and values.tolist() == [0.25, -1.5]
  tsv.write_text('row\tlogit_0\tlogit_1\n3\t1.0\t-2.0\n')
  keys, values = scores.read_scores(tsv, 2)
  assert keys.tolist() == [3] and values.tolist() == [[1.0, -2.0]]
  jsonl = tmp_path / 's.jsonl'
  jsonl.write_text(json.dumps({'row': 1, 'logits': [0.5, 1.5]}) + '\n' + json.dumps({'row': 2, 'logits': [0, 1]}))
  keys, values = scores.read_scores(jsonl, 2)
  assert keys.tolist() == [1, 2] and values.tolist() == [[0.5, 1.5], [0.0, 1.0]]


@pytest.mark.parametrize('name,content,message', [
    ('a.tsv', 'row\tprob\n1\t0.5\n', ':1: the header needs a "row" column'),
    ('a.tsv', 'row\tscore\n1\t0.5\n2\n', ':3: expected 2 tab-separated fields'),
    ('a.tsv', 'row\tscore\n1\tnan\n', ':2: expected one finite score'),
    ('a.tsv', 'row\tscore\nx\t1\n', ':2: row key'),
    ('a.tsv', 'row\tscore\n1\t0.5\n1\t0.7\n', 'row key 1 appears 2 times'),
    ('a.jsonl', '{"row": 1, "score": 1}\n{"row": 2}\n', ':2: expected an object'),
    ('a.jsonl', '{"row": 1, "score": 1}\n{"row": 2, "logits": [1, 2]}\n', 'mixes scalar scores'),
    ('a.jsonl', '{"row": 1, "logits": [1, 2, 3]}\n', ':1: expected one finite score or 2 logits'),
    ('a.tsv', '', 'empty file'),
])
def test_bad_score_files_name_file_and_line(tmp_path, name, content, message):
  path = tmp_path / name
  path.write_text(content)
  with pytest.raises(UserError) as e:
    scores.read_scores(path, 2)
  assert str(path) in str(e.value) and message in str(e.value)


def test_compare_logits_by_hand(tmp_path):
  a, b = tmp_path / 'a.tsv', tmp_path / 'b.tsv.gz'
  a.write_text('row\tlogit_0\tlogit_1\n1\t0\t1\n2\t0\t2\n3\t1\t0\n9\t5\t5\n')
  with gzip.open(b, 'wt') as f:  # rows 1-3 in another order, row 4 only here
    f.write('row\tlogit_0\tlogit_1\n3\t0\t0.5\n1\t0\t3\n2\t0.5\t1.5\n4\t0\t0\n')
  out = scores.compare_logits(a, b)
  # margins on rows 1, 2, 3: a = 1, 2, -1; b = 3, 1, 0.5; ranks a 2, 3, 1 and b 3, 2, 1
  assert out['rows_a'] == 4 and out['rows_b'] == 4 and out['common_rows'] == 3
  assert out['max_abs_logit_diff'] == pytest.approx(2.0)
  assert out['mean_abs_margin_diff'] == pytest.approx((2 + 1 + 1.5) / 3)
  assert out['spearman_margin'] == pytest.approx(0.5)  # 1 - 6 * (1 + 1 + 0) / (3 * 8)
  assert out['argmax_agreement'] == pytest.approx(2 / 3)  # row 3: class 0 in a, 1 in b
  (tmp_path / 'c.tsv').write_text('row\tlogit_0\tlogit_1\n7\t0\t1\n')
  with pytest.raises(UserError, match='share no row key'):
    scores.compare_logits(a, tmp_path / 'c.tsv')
  (tmp_path / 'd.tsv').write_text('row\tscore\n1\t0.5\n')
  with pytest.raises(UserError, match='d.tsv: holds scalar scores'):
    scores.compare_logits(a, tmp_path / 'd.tsv')


def test_align_reports_missing_rows_and_ignores_others(tmp_path):
  keys, values = np.array([10, 11, 12]), np.array([1.0, 2.0, 3.0])
  out = scores.align('f.tsv', keys, values, {'train': np.array([12, 10]), 'dev': np.array([11])})
  assert out['train'].tolist() == [3.0, 1.0] and out['dev'].tolist() == [2.0]
  with pytest.raises(UserError, match=r'missing for dev: 1 rows \(first keys \[99\]\)'):
    scores.align('f.tsv', keys, values, {'train': np.array([12, 10, 11]), 'dev': np.array([99])})
  out = scores.align('f.tsv', keys, values, {'train': np.array([12])})  # a file may cover more rows
  assert out['train'].tolist() == [3.0]


def test_calibration_recovers_a_logistic_model():
  rng = np.random.default_rng(0)
  scores = rng.normal(3.0, 2.0, size=20000)  # any scale and offset
  a, b = 1.5, -4.0
  labels = (rng.random(20000) < 1 / (1 + np.exp(-(a * scores + b)))).astype(np.int32)
  labels[:100] = -1  # unlabelled rows are ignored
  fitted_a, fitted_b = base.fit_calibration(scores, labels)
  assert fitted_a == pytest.approx(a, rel=0.08) and fitted_b == pytest.approx(b, rel=0.08)
  logits = base.calibrated_logits(np.array([0.0, 2.0]), fitted_a, fitted_b)
  np.testing.assert_allclose(logits, [[0, fitted_b], [0, 2 * fitted_a + fitted_b]], rtol=1e-6)
  with pytest.raises(UserError, match='both classes'):
    base.fit_calibration(scores[:10], np.zeros(10, np.int32))


def test_mean_pooled_cosines_by_hand(minilm_dir):
  from mkdm_jax.models import load_tokenizer
  tokenizer = load_tokenizer(minilm_dir)
  tokenizer.no_padding()
  vocab = tokenizer.get_vocab_size()
  table = np.random.default_rng(1).normal(size=(vocab, 5)).astype(np.float32)
  embed = lambda ids, mask: table[ids]  # token states: a fixed random vector per token id
  text_a, text_b = ['who wrote hamlet', 'what is a cat', 'who wrote hamlet'], ['shakespeare', 'a cat is an animal',
                                                                               'a cat is an animal']
  cosines = biencoder.mean_pooled_cosines(embed, tokenizer, text_a, text_b, max_length=16, batch_size=2)

  def hand(text):
    ids = tokenizer.encode(text).ids  # [CLS] ... [SEP], as the sentence encoder sees a single text
    mean = table[ids].mean(0)
    return mean / np.linalg.norm(mean)
  expected = [float(hand(a) @ hand(b)) for a, b in zip(text_a, text_b)]
  np.testing.assert_allclose(cosines, expected, rtol=1e-5)


def test_scores_fingerprint_follows_the_file(tmp_path):
  import hashlib
  import os
  path = tmp_path / 's.tsv'
  path.write_text('row\tscore\n1\t0.5\n')
  first = scores.scores_fingerprint(path)
  assert first == 'sha256:' + hashlib.sha256(path.read_bytes()).hexdigest()[:16]
  path.write_text('row\tscore\n1\t0.7\n')
  os.utime(path, ns=(1, 2))  # a new version, whatever the clock
  assert scores.scores_fingerprint(path) == 'sha256:' + hashlib.sha256(path.read_bytes()).hexdigest()[:16] != first


def test_gzipped_score_files_read_like_plain_ones(tmp_path):
  for name, text in (('s.tsv.gz', 'row\tlogit_0\tlogit_1\n3\t1.0\t-2.0\n'),
                     ('s.jsonl.gz', json.dumps({'row': 3, 'logits': [1.0, -2.0]}) + '\n')):
    with gzip.open(tmp_path / name, 'wt') as f:
      f.write(text)
    keys, values = scores.read_scores(tmp_path / name, 2)
    assert keys.tolist() == [3] and values.tolist() == [[1.0, -2.0]]
  broken = tmp_path / 'broken.tsv.gz'
  broken.write_bytes(gzip.compress(b'row\tscore\n1\t0.5\n')[:-9])  # cut short
  with pytest.raises(UserError, match=f'{broken}: cannot read teacher scores'):
    scores.read_scores(broken, 2)


def test_word_overlap_by_hand():
  """'What is the capital of France?' vs 'Paris is the capital of France.': capital and france overlap
  (what/is/the/of are stop words); IDF over the 3 distinct passages."""
  passages = ['Paris is the capital of France.', 'France borders Spain.', 'The capital of Peru is Lima.']
  q = 'What is the capital of France?'
  counts = overlap.word_overlap_scorer('count', passages)([q, q, q], passages)
  assert counts.tolist() == [2.0, 1.0, 1.0]
  idf = overlap.word_overlap_scorer('idf', passages)([q, q, q], passages)
  capital, france = np.log(3 / 2), np.log(3 / 2)  # each word is in 2 of the 3 passages
  np.testing.assert_allclose(idf, [capital + france, france, capital])
  assert overlap.word_overlap_scorer('idf', [])(['Who?'], ['Nobody at all.']).tolist() == [0.0]


def test_build_makes_one_object_per_spec_with_its_own_settings(tmp_path):
  from mkdm_jax import config
  scores_file = tmp_path / 's.tsv'
  scores_file.write_text('row\tscore\n1\t0.5\n')
  cfg = config.Config(workdir='w', num_teachers=4, teacher_seeds=(7, 8, 9, 10), teacher_learning_rates=(1e-5,),
                      teacher_checkpoints=('random', 'biencoder:minilm-l6', 'overlap:idf', f'scores:{scores_file}'))
  resolved = []
  built = teachers.build(cfg, tmp_path, config.model_options(cfg), lambda source: resolved.append(source) or source)
  assert [type(t) for t in built] == [teachers.FineTuned, teachers.BiEncoder, teachers.WordOverlap,
                                      teachers.ImportedScores]
  assert [t.name for t in built] == ['teacher_0', 'teacher_1', 'teacher_2', 'teacher_3']
  assert (built[0].seed, built[0].learning_rate, built[0].batch_size) == (7, 1e-5, None)
  assert [(t.trains, t.runs_online, t.scores_corpus, t.calibrated) for t in built] == [
      (True, True, True, False), (False, False, False, True), (False, False, False, True),
      (False, False, True, False)]
  assert resolved == []  # tokenizers resolve on first use only (a hub checkpoint would download)
  assert built[1].tokenizer_dir == 'minilm-l6' and built[2].tokenizer_dir is None
  assert built[2].fingerprint() == 'overlap:idf' and built[3].fingerprint().startswith('sha256:')
  built[3].check()
  assert built[3].scorer(None, 10) is None and built[3].report_fields() == {'params': None}  # nothing runs
  scores_file.unlink()
  with pytest.raises(UserError, match='no such file'):
    built[3].check()
