"""A run mixing teacher kinds and model families: a fine-tuned MPNet-base, a zero-shot MiniLM bi-encoder and
imported scores as teachers; MPNet, BERT and BiLSTM students, each reading its own tokenizer."""
import json

import numpy as np
import pytest

from conftest import CI_TINY, run_pipeline
from mkdm_jax import config, context, data, metrics
from mkdm_jax.teachers import overlap as overlap_teacher

pytestmark = pytest.mark.slow  # subprocess runs of the pipeline

FLAGS = dict(max_train_rows=40, max_eval_rows=60, unlabelled_extra=0, num_teachers=3, max_length=32,
             buckets=(32,), batch_size=8, eval_batch_size=32, teacher_learning_rates=(3e-5,), speed_rows=32,
             speed_repeats=1, students=('mpnet1', 'bert1', 'bilstm'), methods=('kd_single', 'mkdm'),
             student_checkpoint=('minilm-l6', 'mpnet=mpnet-base'))


def overlap(a, b):
  words = lambda text: set(text.lower().split())
  return len(words(a) & words(b)) / max(len(words(a)), 1)


def test_mixed_family_run(tmp_path, xla_cache):
  scores = tmp_path / 'overlap.tsv'
  cfg = config.config_from_flagfile(CI_TINY, workdir=str(tmp_path / 'w'), **FLAGS)
  examples = context.load_examples(cfg, data.get_task('wikiqa'))
  rows = {int(k): overlap(a, b) for e in examples.values() for k, a, b in zip(e.ids, e.text_a, e.text_b)}
  scores.write_text('row\tscore\n' + ''.join(f'{k}\t{v!r}\n' for k, v in rows.items()))
  flags = [f'--{k}={",".join(map(str, v)) if isinstance(v, tuple) else v}' for k, v in FLAGS.items()]
  proc = run_pipeline(tmp_path / 'w', *flags, f'--teacher_checkpoints=mpnet-base,biencoder:minilm-l6,scores:{scores}',
                      cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  workdir = tmp_path / 'w'
  results = json.loads((workdir / 'results.json').read_text())
  teachers = [r for r in results['rows'] if r['method'] == 'teacher']
  assert [(r['kind'], r['checkpoint']) for r in teachers] == [
      ('checkpoint', 'mpnet-base'), ('biencoder', 'minilm-l6'), ('scores', str(scores))]
  assert teachers[0]['params'] > 100e6 and teachers[0]['examples_per_sec'] > 0
  assert teachers[1]['examples_per_sec'] > 0 and teachers[2]['examples_per_sec'] is None
  assert {r['name'] for r in results['rows'] if r['student']} == {
      f'{s}_{m}' for s in ('mpnet1', 'bert1', 'bilstm') for m in ('kd_single', 'mkdm')}
  # Imported scores enter as calibrated logits [0, a * score + b].
  store = data.LogitStore(workdir / 'logits')
  manifest = json.loads((workdir / 'logits' / 'teacher_2.train' / 'manifest.json').read_text())['manifest']
  logits = store.read_rows('teacher_2.train', manifest, examples['train'].ids)
  x = np.array([rows[int(k)] for k in examples['train'].ids])
  assert np.all(logits[:, 0] == 0)
  slope, intercept = np.polyfit(x, logits[:, 1], 1)
  np.testing.assert_allclose(logits[:, 1], slope * x + intercept, atol=1e-4)
  assert slope > 0
  # Each model reads its own tokenizer: MPNet's vocabulary for the MPNet student, BERT's for the others.
  vocab = lambda run: json.loads((workdir / 'students' / run / 'tokenizer' / 'tokenizer.json').read_text())
  assert '<s>' in vocab('mpnet1_mkdm')['model']['vocab'] and '[CLS]' in vocab('bert1_mkdm')['model']['vocab']
  assert json.loads((workdir / 'students' / 'mpnet1_mkdm' / 'model.json').read_text())['encoder'] == 'mpnet'
  settings = json.loads((workdir / 'students' / 'mpnet1_mkdm' / 'settings.json').read_text())
  assert settings['student_checkpoint'] == 'mpnet-base' and len(settings['teachers']) == 3


def test_word_overlap_teachers_are_zero_shot_baselines(tmp_path, xla_cache):
  """overlap:idf and overlap:count need no training: their rows rank the test pairs as the raw word-overlap
  scores do (calibration is monotone), with IDF over every set's passages."""
  workdir = tmp_path / 'w'
  proc = run_pipeline(workdir, '--num_teachers=2', '--teacher_checkpoints=overlap:idf,overlap:count', '--students=',
                      '--methods=kd_single', '--stages=teachers,logits,evaluate,report', cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  assert not (workdir / 'teachers').exists()
  cfg = config.config_from_flagfile(CI_TINY, workdir=str(workdir), methods=('kd_single',))
  examples = context.load_examples(cfg, data.get_task('wikiqa'))
  passages = [t for e in examples.values() for t in e.text_b]
  rows = {r['name']: r for r in json.loads((workdir / 'results.json').read_text())['rows']}
  test = examples['eval']
  for name, weight in (('teacher_0', 'idf'), ('teacher_1', 'count')):
    assert (rows[name]['kind'], rows[name]['checkpoint']) == ('overlap', weight)
    assert rows[name]['params'] == 0 and rows[name]['examples_per_sec'] > 0
    raw = overlap_teacher.word_overlap_scorer(weight, passages)(test.text_a, test.text_b)
    probs = np.stack([1 - 1 / (1 + np.exp(-raw)), 1 / (1 + np.exp(-raw))], 1)  # any increasing map of the score
    expected = metrics.compute(['map', 'mrr', 'auc'], test.labels, probs, test.groups)
    for metric in ('map', 'mrr', 'auc'):
      assert rows[name]['metrics'][metric] == pytest.approx(expected[metric], abs=1e-9), (name, metric)
