"""Prediction files of experiments/evaluate.py --predictions and experiments/score.py, checked against
in-process predictions."""
import json
import os
import subprocess
import sys
from pathlib import Path

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

import jax
import numpy as np
import pytest

from mkdm_jax import data, metrics, models, predictions, saved_model, train

REPO = Path(__file__).resolve().parents[1]
TINY_BERT = models.BertConfig(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=128)
QUESTIONS = {'WQ-12': 'what is the capital of france', 'WQ-3': 'who wrote hamlet',
             'WQ-40': 'how tall is mount everest'}
PASSAGES = ['paris is the capital and largest city of france .', 'hamlet is a tragedy by william shakespeare .',
            'mount everest is 8,849 metres above sea level .', 'bananas are berries .']
# (group, question, passage, label) in file order; the last row repeats an earlier one (occurrence 1).
ROWS = [(g, q, p, int(i == j)) for i, (g, q) in enumerate(QUESTIONS.items()) for j, p in enumerate(PASSAGES)]
ROWS.append(ROWS[1])


def evaluate(*args):
  return subprocess.run([sys.executable, str(REPO / 'experiments' / 'evaluate.py'), *args], capture_output=True,
                        text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=REPO, timeout=900)


@pytest.fixture(scope='module')
def model_dir(tmp_path_factory, minilm_dir):
  """A saved tiny random BERT with two heads combined by non-uniform learned weights."""
  directory = tmp_path_factory.mktemp('predictions') / 'bert'
  model = models.Classifier(TINY_BERT, num_classes=2, num_heads=2, combine='learned')
  dummy = np.zeros((1, 8), np.int32)
  params = model.init(jax.random.PRNGKey(0), dummy, dummy, np.ones_like(dummy))['params']
  params = {**params, 'combine_weights': np.array([1.5, -0.5], np.float32)}
  saved_model.write_spec(directory, model, tokenizer_dir=minilm_dir, max_length=64, task='wikiqa',
                         label_names=['not_answer', 'answer'])
  train.save_params(directory / 'final', params)
  return directory


def write_pairs(path, labelled):
  header = ['qid', 'question', 'passage'] + (['gold'] if labelled else [])
  lines = ['\t'.join(header)] + ['\t'.join([g, q, p] + ([str(y)] if labelled else [])) for g, q, p, y in ROWS]
  path.write_text('\n'.join(lines) + '\n')
  return path


def read_tsv(path):
  lines = path.read_text().splitlines()
  return lines[0], [line.split('\t') for line in lines[1:]]


def in_process(directory, path, **columns):
  """predict()'s output for the file's rows, with the saved model loaded here."""
  model, params, spec = saved_model.load(directory)
  examples = data.load_split(data.get_task('tsv'), None, path=path, text_a_col='question', text_b_col='passage',
                             **columns)
  encoded = data.encode(models.load_tokenizer(spec['tokenizer_dir']), examples, spec['max_length'])
  return train.predict(model, params, encoded, mesh=train.make_mesh(), buckets=(32, 64))


@pytest.mark.slow
def test_predictions_tsv_matches_in_process_scores(model_dir, tmp_path):
  pairs = write_pairs(tmp_path / 'pairs.tsv', labelled=True)
  out = tmp_path / 'out' / 'predictions.tsv'
  proc = evaluate(f'--model={model_dir}', '--task=tsv', f'--eval_file={pairs}', '--text_a_col=question',
                  '--text_b_col=passage', '--label_col=gold', '--group_col=qid', f'--predictions={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  header, rows = read_tsv(out)
  assert header == 'group\trow\tlabel\tscore\thead_0\thead_1'
  assert len(rows) == len(ROWS)
  assert [r[0] for r in rows] == [g for g, _, _, _ in ROWS]
  occurrences = [0] * (len(ROWS) - 1) + [1]
  assert [int(r[1]) for r in rows] == [data.row_key(q, p, g, n) for (g, q, p, _), n in zip(ROWS, occurrences)]
  assert [int(r[2]) for r in rows] == [y for _, _, _, y in ROWS]
  expected = in_process(model_dir, pairs, label_col='gold', group_col='qid')
  weights = np.exp([1.5, -0.5]) / np.exp([1.5, -0.5]).sum()
  np.testing.assert_allclose(expected['logits'], np.einsum('h,bhc->bc', weights, expected['head_logits']),
                             atol=1e-5)
  scores = np.array([[float(x) for x in r[3:]] for r in rows])
  np.testing.assert_allclose(scores[:, 0], train.softmax(expected['logits'])[:, 1], atol=1e-6)
  for h in range(2):
    np.testing.assert_allclose(scores[:, 1 + h], train.softmax(expected['head_logits'][:, h])[:, 1], atol=1e-6)
  assert np.abs(scores[:, 1] - scores[:, 2]).max() > 1e-6  # the head columns are not copies
  # MAP recomputed from the file equals the reported one.
  codes = {g: i for i, g in enumerate(dict.fromkeys(r[0] for r in rows))}
  probs = np.stack([1 - scores[:, 0], scores[:, 0]], 1)
  recomputed = metrics.compute(['map'], np.array([int(r[2]) for r in rows]), probs,
                               np.array([codes[r[0]] for r in rows]))
  assert recomputed['map'] == pytest.approx(report['metrics']['map'], abs=1e-9)
  assert report['predictions'] == str(out.absolute())


@pytest.mark.slow
def test_unlabelled_file_with_predictions(model_dir, tmp_path):
  pairs = write_pairs(tmp_path / 'pairs.tsv', labelled=False)
  out = tmp_path / 'predictions.tsv'
  proc = evaluate(f'--model={model_dir}', '--task=tsv', f'--eval_file={pairs}', '--text_a_col=question',
                  '--text_b_col=passage', f'--predictions={out}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert 'metrics' not in report and report['labelled_rows'] == 0 and report['rows'] == len(ROWS)
  header, rows = read_tsv(out)
  assert header == 'group\trow\tlabel\tscore\thead_0\thead_1'
  # No --group_col: empty groups, row keys without a group.
  occurrences = [0] * (len(ROWS) - 1) + [1]
  assert [r[0] for r in rows] == [''] * len(ROWS)
  assert [int(r[1]) for r in rows] == [data.row_key(q, p, None, n) for (_, q, p, _), n in zip(ROWS, occurrences)]
  assert [r[2] for r in rows] == ['-1'] * len(ROWS)
  expected = in_process(model_dir, pairs)
  np.testing.assert_allclose([float(r[3]) for r in rows], train.softmax(expected['logits'])[:, 1], atol=1e-6)


@pytest.mark.slow
def test_unlabelled_file_without_predictions_is_one_error_line(model_dir, tmp_path):
  pairs = write_pairs(tmp_path / 'pairs.tsv', labelled=False)
  proc = evaluate(f'--model={model_dir}', '--task=tsv', f'--eval_file={pairs}', '--text_a_col=question',
                  '--text_b_col=passage')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and '--label_col' in last and '--predictions' in last, last


def score(*args):
  return subprocess.run([sys.executable, str(REPO / 'experiments' / 'score.py'), '--noprogress', *args],
                        capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=REPO,
                        timeout=900)


@pytest.mark.slow
def test_score_command_writes_evaluate_predictions(model_dir, tmp_path):
  """score.py, reading 5 rows at a time (the repeated row falls in a later chunk than its first
  occurrence), writes the rows evaluate.py --predictions writes for the same file."""
  pairs = write_pairs(tmp_path / 'pairs.tsv', labelled=True)
  columns = ['--text_a_col=question', '--text_b_col=passage', '--label_col=gold', '--group_col=qid']
  proc = evaluate(f'--model={model_dir}', '--task=tsv', f'--eval_file={pairs}', *columns,
                  f'--predictions={tmp_path / "evaluate.tsv"}')
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = tmp_path / 'scored' / 'scores.tsv'
  proc = score(f'--model={model_dir}', f'--input={pairs}', f'--output={out}', '--chunk_rows=5', *columns)
  assert proc.returncode == 0, proc.stderr[-3000:]
  report = json.loads(proc.stdout)
  assert report['rows'] == len(ROWS) and report['output'] == str(out.absolute())
  header, rows = read_tsv(out)
  expected_header, expected = read_tsv(tmp_path / 'evaluate.tsv')
  assert header == expected_header
  assert [r[:3] for r in rows] == [r[:3] for r in expected]  # group, row key (occurrences counted), label
  np.testing.assert_allclose(np.array([r[3:] for r in rows], float), np.array([r[3:] for r in expected], float),
                             atol=1e-6)
  assert not out.with_name('scores.tsv.partial').exists()


def test_score_stream_reads_bounded_chunks(model_dir, tmp_path, monkeypatch):
  """An unlabelled JSON-lines file is scored chunk_rows rows at a time, never more, in input order."""
  path = tmp_path / 'pairs.jsonl'
  path.write_text(''.join(json.dumps({'q': q, 'p': p}) + '\n' for _, q, p, _ in ROWS))
  sizes = []
  real_predict = train.predict

  def counting_predict(model, params, encoded, **kwargs):
    sizes.append(len(encoded))
    return real_predict(model, params, encoded, **kwargs)

  monkeypatch.setattr(predictions.train, 'predict', counting_predict)
  stream = data.readers.open_jsonl(path, text_a_col='q', text_b_col='p', label_names=['0', '1'])
  out = tmp_path / 'scores.tsv'
  assert predictions.score_stream(stream, model_dir, out, mesh=train.make_mesh(), chunk_rows=4,
                                  progress=False) == len(ROWS)
  assert sizes == [4, 4, 4, 1]
  _, rows = read_tsv(out)
  occurrences = [0] * (len(ROWS) - 1) + [1]
  assert [int(r[1]) for r in rows] == [data.row_key(q, p, None, n) for (_, q, p, _), n in zip(ROWS, occurrences)]
  assert [r[2] for r in rows] == ['-1'] * len(ROWS)
  tsv = write_pairs(tmp_path / 'pairs.tsv', labelled=False)
  monkeypatch.setattr(predictions.train, 'predict', real_predict)
  expected = in_process(model_dir, tsv)
  np.testing.assert_allclose([float(r[3]) for r in rows], train.softmax(expected['logits'])[:, 1], atol=1e-6)


@pytest.mark.slow
def test_score_bad_row_is_one_error_line_and_leaves_no_file(model_dir, tmp_path):
  pairs = write_pairs(tmp_path / 'pairs.tsv', labelled=False)
  lines = pairs.read_text().splitlines()
  lines[4] = lines[4].split('\t')[0]  # line 5: one field instead of three
  pairs.write_text('\n'.join(lines) + '\n')
  out = tmp_path / 'scores.tsv'
  proc = score(f'--model={model_dir}', f'--input={pairs}', f'--output={out}', '--text_a_col=question',
               '--text_b_col=passage', '--chunk_rows=2')
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and f'{pairs}:5: expected 3 tab-separated fields, found 1' in last, last
  assert not out.exists() and not out.with_name('scores.tsv.partial').exists()
  # An existing output is kept unless --overwrite is given.
  out.write_text('earlier results\n')
  proc = score(f'--model={model_dir}', f'--input={pairs}', f'--output={out}', '--text_a_col=question',
               '--text_b_col=passage', '--skip_bad_rows')
  assert proc.returncode == 2 and '--overwrite' in proc.stderr.strip().splitlines()[-1], proc.stderr[-3000:]
  assert out.read_text() == 'earlier results\n'
  proc = score(f'--model={model_dir}', f'--input={pairs}', f'--output={out}', '--text_a_col=question',
               '--text_b_col=passage', '--skip_bad_rows', '--overwrite')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert json.loads(proc.stdout)['skipped_rows'] == 1
  assert len(read_tsv(out)[1]) == len(ROWS) - 1
