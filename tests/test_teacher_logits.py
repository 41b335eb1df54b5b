"""The logits stage and store reads with teacher objects, in process: stand-in teachers count what they are asked."""
import dataclasses
import types

import numpy as np
import pytest

from mkdm_jax import config, teacher_logits
from mkdm_jax import context as context_lib
from mkdm_jax.data import corpus
from mkdm_jax.data.readers import Examples
from mkdm_jax.data.tasks import get_task
from mkdm_jax.errors import UserError
from mkdm_jax.teachers import base
from mkdm_jax.teachers.scores import ImportedScores, read_scores


def examples(keys, labels=None, groups=None):
  n = len(keys)
  return Examples(text_a=[f'q{k}' for k in keys], text_b=[f'p{k}' for k in keys],
                  labels=np.asarray(labels if labels is not None else [-1] * n, np.int32),
                  groups=None if groups is None else np.asarray(groups, np.int64), ids=np.asarray(keys, np.int64),
                  source='test', fingerprint=f'fp{keys}', group_names=None if groups is None else
                  [str(g) for g in sorted(set(groups))])


class Counting(base.Teacher):
  """Logits = [0, row key]: asked rows are recorded."""
  kind = 'test'

  def __init__(self, index, directory):
    super().__init__(index, 'src', directory)
    self.asked = []

  def fingerprint(self):
    return f'counting-{self.index}'

  def logits(self, ctx, dataset, rows):
    self.asked.append((dataset, list(rows)))
    keys = ctx.examples[dataset].ids[rows].astype(np.float32)
    return np.stack([np.zeros_like(keys), keys * (1 if self.index == 0 else -1)], 1)


def context(tmp_path, teachers, sets):
  cfg = dataclasses.replace(config.Config(workdir=str(tmp_path)), max_length=32, unlabelled_corpus='')
  return types.SimpleNamespace(cfg=cfg, shared=tmp_path, examples=sets, teachers=teachers, primary='map')


def test_rows_shared_by_sets_are_computed_once_and_stored_by_key(tmp_path):
  teacher = Counting(0, tmp_path / 'teachers' / 'teacher_0')
  sets = {'train': examples([1, 2, 3]), 'unlabelled': examples([3, 2, 9]), 'eval': examples([4])}
  ctx = context(tmp_path, (teacher,), sets)
  teacher_logits.stage_logits(ctx)
  assert teacher.asked == [('train', [0, 1, 2]), ('unlabelled', [2]), ('eval', [0])]  # keys 3 and 2 reused
  np.testing.assert_array_equal(teacher_logits.read(ctx, 'unlabelled')[:, 0, 1], [3, 2, 9])
  teacher_logits.stage_logits(ctx)  # stored: nothing asked again
  assert len(teacher.asked) == 3
  with pytest.raises(UserError, match='teacher_1.eval are missing or stale: run the logits stage'):
    teacher_logits.read(context(tmp_path, (Counting(1, tmp_path / 'teacher_1'),), sets), 'eval')


def test_best_teacher_is_the_best_on_dev(tmp_path):
  teachers = (Counting(0, tmp_path / 'teacher_0'), Counting(1, tmp_path / 'teacher_1'))
  # Positives have the smaller keys: teacher 1 (score -key) ranks them first, teacher 0 last.
  dev = examples([1, 2, 7, 8], labels=[1, 0, 0, 0], groups=[0, 0, 0, 0])
  ctx = context(tmp_path, teachers, {'dev': dev})
  teacher_logits.stage_logits(ctx)
  assert teacher_logits.best_teacher(ctx) == 1
  assert teacher_logits.best_teacher(context(tmp_path, teachers, {'train': dev})) == 0  # no dev split


def test_calibrated_teacher_scores_whole_sets_once(tmp_path):
  class Length(base.Calibrated):
    kind = 'test'
    calls = 0

    def fingerprint(self):
      return 'length'

    def score_pairs(self, ctx, text_a, text_b):
      Length.calls += 1
      return np.array([len(b) for b in text_b], np.float64)

  dev = examples([1, 22, 333, 4444], labels=[0, 0, 1, 1])
  teacher = Length(0, 'len', tmp_path / 'teacher_0')
  ctx = context(tmp_path, (teacher,), {'dev': dev, 'eval': examples([55, 6])})
  logits = teacher.logits(ctx, 'eval', np.array([1]))
  a, b = base.fit_calibration([2, 3, 4, 5], [0, 0, 1, 1])
  np.testing.assert_allclose(logits, [[0.0, a * 2 + b]], rtol=1e-6)  # 'p6' has 2 characters
  teacher.logits(ctx, 'eval', np.array([0]))
  assert Length.calls == 2  # dev (for the fit) and eval, each once


def test_a_scores_teacher_serves_a_prepared_corpus_and_its_export_holds_the_corpus(tmp_path):
  """`scores:` teachers look a corpus's rows up by key (no model, no tokenizer): what an export of a corpus run
  holds, so a stage-1 corpus is scored once. A file without the corpus's rows is refused by name."""
  source = tmp_path / 'pairs.tsv'
  source.write_text('question\tpassage\n' + ''.join(f'q{i}\tpassage {i}\n' for i in range(7)), encoding='utf-8')
  corpus_dir = tmp_path / 'corpus'
  corpus.prepare([source], corpus_dir, corpus.ReadOptions('tsv', 'question', 'passage'), rows_per_shard=3,
                 progress=False)
  keys = corpus.CorpusIndex(corpus_dir).ids
  sets = {'train': examples([101, 102]), 'dev': examples([103])}
  scores = tmp_path / 'teacher_0.tsv'
  scores.write_text('row\tlogit_0\tlogit_1\n' + ''.join(f'{k}\t0\t{v}\n' for v, k in enumerate([101, 102, 103,
                                                                                                *keys.tolist()])))
  cfg = dataclasses.replace(config.Config(workdir=str(tmp_path)), max_length=32, unlabelled_corpus=str(corpus_dir),
                            progress=False)
  teacher = ImportedScores(0, str(scores), tmp_path / 'teachers' / 'teacher_0')
  ctx = context_lib.Context(cfg=cfg, workdir=tmp_path, shared=tmp_path, task=get_task('wikiqa'), buckets=(32,),
                            examples=sets, teachers=(teacher,), mesh=None, metrics=[], primary='map')
  assert teacher.tokenizer_dir is None and teacher.scores_corpus
  teacher_logits.stage_logits(ctx)
  stored = teacher_logits.read(ctx, 'unlabelled')  # the corpus, by position: values 3..9 in file order
  np.testing.assert_array_equal(stored[np.arange(7)][:, 0, 1], np.arange(3, 10))
  assert sorted(p.name for p in (tmp_path / 'logits' / 'teacher_0.corpus').iterdir()) == [
      f'shard-{i:05d}-of-00003' for i in range(3)]
  (exported,) = teacher_logits.export(ctx, tmp_path / 'export')
  exported_keys, values = read_scores(exported, 2)
  assert sorted(exported_keys.tolist()) == sorted([101, 102, 103, *keys.tolist()])
  np.testing.assert_array_equal(values[np.argsort(exported_keys)], read_scores(scores, 2)[1][np.argsort(
      read_scores(scores, 2)[0])])
  scores.write_text('row\tlogit_0\tlogit_1\n101\t0\t1\n102\t0\t1\n103\t0\t1\n')  # no corpus rows
  ctx = dataclasses.replace(ctx, shared=tmp_path / 'other', teachers=(
      ImportedScores(0, str(scores), tmp_path / 'teachers' / 'teacher_0'),), encodings={})
  with pytest.raises(UserError, match=r'teacher_0.tsv: teacher scores are missing for corpus shard 0: 3 rows'):
    teacher_logits.stage_logits(ctx)
