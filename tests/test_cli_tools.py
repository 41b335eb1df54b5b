"""experiments/evaluate.py, export.py and ablate.py, run as the user runs them (subprocesses)."""
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # as the entry points do, before jax's first computation

import jax
import numpy as np
import pytest

from mkdm_jax import metrics, models, saved_model, train

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = REPO / 'experiments'
CI_TINY = SCRIPTS / 'configs' / 'ci_tiny.flags'
TINY_BERT = models.BertConfig(hidden_size=32, num_layers=2, num_attention_heads=2, intermediate_size=64,
                              max_position_embeddings=128)
QUESTIONS = ['what is the capital of france', 'who wrote hamlet', 'how tall is mount everest',
             'when did the second world war end']
PASSAGES = ['paris is the capital and largest city of france .', 'hamlet is a tragedy by william shakespeare .',
            'mount everest is 8,849 metres above sea level .', 'the war in europe ended in may 1945 .',
            'bananas are berries .']


def run_script(name, *args, check=True):
  proc = subprocess.run([sys.executable, str(SCRIPTS / name), *args], capture_output=True, text=True,
                        env=dict(os.environ, JAX_PLATFORMS='cpu'), cwd=REPO, timeout=900)
  if check:
    assert proc.returncode == 0, proc.stderr[-3000:]
  return proc


def assert_user_error(proc, message):
  """Exit status 2 and one 'error: ...' line naming the problem, no traceback."""
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert 'Traceback' not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith('error: ') and message in last, last


def init(model, seed=0):
  dummy = np.zeros((1, 8), np.int32)
  return model.init(jax.random.PRNGKey(seed), dummy, dummy, np.ones_like(dummy))['params']


def save_model(directory, model, params, minilm_dir):
  """A model folder as run.py writes it: model.json, tokenizer/ and final/ params."""
  saved_model.write_spec(directory, model, tokenizer_dir=minilm_dir, max_length=64, task='wikiqa',
                         label_names=['not_answer', 'answer'])
  train.save_params(directory / 'final', params)


@pytest.fixture(scope='module')
def bert_model(tmp_path_factory, minilm_dir):
  """A saved tiny random BERT student with two heads combined by (non-uniform) learned weights."""
  directory = tmp_path_factory.mktemp('models') / 'bert'
  model = models.Classifier(TINY_BERT, num_classes=2, num_heads=2, combine='learned')
  params = {**init(model), 'combine_weights': np.array([1.5, -0.5], np.float32)}
  save_model(directory, model, params, minilm_dir)
  return directory, model, params


def pairs_tsv(path, with_groups):
  """Every question with every passage; the matching passage is the positive."""
  lines = ['\t'.join((['qid'] if with_groups else []) + ['question', 'passage', 'gold'])]
  for i, question in enumerate(QUESTIONS):
    for j, passage in enumerate(PASSAGES):
      lines.append('\t'.join(([f'q{i}'] if with_groups else []) + [question, passage, str(int(i == j))]))
  path.write_text('\n'.join(lines) + '\n')
  return path


def expected_metrics(minilm_dir, model, params, names, with_groups):
  """The task metrics computed directly from the model's logits on the pairs."""
  tokenizer = models.load_tokenizer(minilm_dir)
  pairs = [(q, p) for q in QUESTIONS for p in PASSAGES]
  encodings = tokenizer.encode_batch(pairs)
  length = max(len(e.ids) for e in encodings)
  ids, types, mask = (np.zeros((len(pairs), length), np.int32) for _ in range(3))
  for k, e in enumerate(encodings):
    ids[k, :len(e.ids)], types[k, :len(e.ids)], mask[k, :len(e.ids)] = e.ids, e.type_ids, 1
  logits = np.asarray(model.apply({'params': params}, ids, types, mask)['logits'])
  labels = np.array([int(i == j) for i in range(len(QUESTIONS)) for j in range(len(PASSAGES))])
  groups = np.repeat(np.arange(len(QUESTIONS)), len(PASSAGES)) if with_groups else None
  return metrics.compute(names, labels, train.softmax(logits), groups)


# evaluate.py

@pytest.mark.slow
@pytest.mark.parametrize('with_groups', [True, False])
def test_evaluate_tsv_file(bert_model, minilm_dir, tmp_path, with_groups):
  directory, model, params = bert_model
  path = pairs_tsv(tmp_path / 'pairs.tsv', with_groups)
  args = [f'--model={directory}', '--task=tsv', f'--eval_file={path}', '--text_a_col=question',
          '--text_b_col=passage', '--label_col=gold'] + (['--group_col=qid'] if with_groups else [])
  report = json.loads(run_script('evaluate.py', *args).stdout)
  names = ['accuracy', 'f1', 'auc'] + (['map', 'mrr'] if with_groups else [])
  assert list(report['metrics']) == names  # map/mrr only with question groups
  assert report['metrics'] == pytest.approx(expected_metrics(minilm_dir, model, params, names, with_groups),
                                            abs=1e-6)
  assert report['rows'] == report['labelled_rows'] == len(QUESTIONS) * len(PASSAGES)
  assert set(report['head_metrics']) == {f'head{h}/{m}' for h in range(2) for m in names}


@pytest.mark.parametrize('args,message', [
    (['--task=tsv'], '--task=tsv needs --eval_file'),
    (['--task=tsv', '--eval_file={tsv}', '--text_a_col=question', '--text_b_col=passage'],
     'evaluation needs gold labels: give --label_col'),
    (['--task=tsv', '--eval_file={bad}', '--text_a_col=question', '--text_b_col=passage', '--label_col=gold'],
     'bad.tsv:3: unknown label'),
    (['--task=tfds:glue/mnli'], 'task tfds:glue/mnli has 3 classes but the model'),
    (['--model={tmp}'], 'is not a saved model folder'),
])
@pytest.mark.slow
def test_evaluate_bad_input_is_one_error_line(bert_model, tmp_path, args, message):
  tsv = pairs_tsv(tmp_path / 'pairs.tsv', False)
  bad = tmp_path / 'bad.tsv'
  bad.write_text('question\tpassage\tgold\nq\tp\t1\nq\tp\tmaybe\n')
  args = [a.format(tsv=tsv, bad=bad, tmp=tmp_path) for a in args]
  assert_user_error(run_script('evaluate.py', f'--model={bert_model[0]}', *args, check=False), message)


# export.py

@pytest.mark.slow
def test_export_loads_in_transformers_with_the_same_logits(bert_model, minilm_dir, tmp_path):
  import torch
  import transformers
  directory, model, params = bert_model
  out = tmp_path / 'hf'
  run_script('export.py', f'--model={directory}', f'--out={out}')
  hf = transformers.BertForSequenceClassification.from_pretrained(str(out)).eval()
  assert hf.config.id2label == {0: 'not_answer', 1: 'answer'} and hf.config.num_hidden_layers == 2
  tokenizer = transformers.AutoTokenizer.from_pretrained(str(out))
  inputs = tokenizer(QUESTIONS, PASSAGES[:len(QUESTIONS)], padding=True, return_tensors='pt')
  with torch.no_grad():
    hf_logits = hf(**inputs).logits.numpy()
  ours = model.apply({'params': params}, *(inputs[k].numpy().astype(np.int32)
                                           for k in ('input_ids', 'token_type_ids', 'attention_mask')))
  # The learned head weights are not uniform, so a plain mean of the heads would not match.
  assert np.abs(np.asarray(ours['logits'] - ours['head_logits'].mean(1))).max() > 1e-3
  np.testing.assert_allclose(hf_logits, np.asarray(ours['logits']), atol=1e-5)


@pytest.mark.slow
def test_export_refuses_bilstm_and_non_empty_out(bert_model, minilm_dir, tmp_path):
  bilstm = tmp_path / 'bilstm'
  model = models.Classifier(models.BiLSTMConfig(embed_dim=16, hidden_size=8), num_classes=2)
  save_model(bilstm, model, init(model), minilm_dir)
  assert_user_error(run_script('export.py', f'--model={bilstm}', f'--out={tmp_path / "a"}', check=False),
                    'BiLSTM students have no Hugging Face equivalent')
  (tmp_path / 'full').mkdir()
  (tmp_path / 'full' / 'x').write_text('x')
  assert_user_error(run_script('export.py', f'--model={bert_model[0]}', f'--out={tmp_path / "full"}',
                               check=False), 'is not an empty folder')


# ablate.py

SWEEP = ['--sweep=num_teachers=1,2', '--', '--methods=mkdm', '--students=bert1']


@pytest.fixture(scope='module')
def ablation(tmp_path_factory, xla_cache):
  """ci_tiny swept over --num_teachers=1,2, distilling only mkdm into bert1."""
  root = tmp_path_factory.mktemp('ablation')
  run_script('ablate.py', f'--base_flagfile={CI_TINY}', f'--workdir={root}', *SWEEP,
             f'--compilation_cache_dir={xla_cache}')
  return root


@pytest.mark.slow
def test_ablation_writes_table_plot_and_json(ablation):
  report = json.loads((ablation / 'ablation.json').read_text())
  assert (report['metric'], report['task'], report['split']) == ('map', 'wikiqa', 'test')
  (sweep,) = report['sweeps']
  assert sweep['flag'] == 'num_teachers' and sweep['shares_teachers']
  assert sweep['columns'] == ['teacher_ensemble', 'mkdm']
  table = (ablation / 'ablation.md').read_text()
  assert '| num_teachers | teacher_ensemble | mkdm |' in table
  for variant in sweep['variants']:
    results = json.loads((Path(variant['workdir']) / 'results.json').read_text())
    by_method = {r['method']: r['metrics']['map'] for r in results['rows'] if r['method'] != 'teacher'}
    assert variant['scores'] == by_method
    row = f"| {variant['value']} | " + ' | '.join(f'{by_method[c]:.4f}' for c in sweep['columns']) + ' |'
    assert row in table
  assert [v['value'] for v in sweep['variants']] == ['1', '2']
  png = (ablation / 'ablation_num_teachers.png').read_bytes()
  assert png[:8] == b'\x89PNG\r\n\x1a\n'
  width, height = struct.unpack('>II', png[16:24])
  assert width > 300 and height > 200


@pytest.mark.slow
def test_ablation_trains_each_teacher_once(ablation):
  teachers = ablation / 'shared' / 'teachers'
  assert sorted(p.name for p in teachers.iterdir()) == ['teacher_0', 'teacher_1']
  assert not (ablation / 'num_teachers=1' / 'teachers').exists()
  (history,) = (ablation / 'num_teachers=2' / 'history').glob('*-config.json')
  second_start = history.stat().st_mtime
  # teacher_0 was trained by the first variant and left alone by the second; teacher_1 is the second's.
  assert (teachers / 'teacher_0' / 'DONE.json').stat().st_mtime < second_start
  assert (teachers / 'teacher_1' / 'DONE.json').stat().st_mtime > second_start
  log = (ablation / 'num_teachers=2' / 'run.log').read_text()
  assert 'teacher_0: already trained, skipping' in log and 'teacher_1: trained in' in log
  assert json.loads(history.read_text())['shared_dir'] == str(ablation / 'shared')


@pytest.mark.slow
def test_evaluate_reproduces_the_pipeline_metrics(ablation):
  """evaluate.py on a pipeline student and the pipeline's eval split gives the pipeline's own numbers."""
  workdir = ablation / 'num_teachers=2'
  results = json.loads((workdir / 'results.json').read_text())
  expected = next(r['metrics'] for r in results['rows'] if r['name'] == 'bert1_mkdm')
  report = json.loads(run_script('evaluate.py', f'--model={workdir / "students" / "bert1_mkdm"}',
                                 '--split=test', '--max_rows=150', '--batch_size=64').stdout)
  assert report['task'] == 'wikiqa' and report['metrics'] == pytest.approx(expected, abs=1e-6)
  assert set(report['head_metrics']) == {f'head{h}/{m}' for h in range(2) for m in expected}


@pytest.mark.slow
def test_ablate_dry_run_shares_teachers_only_for_student_flags(tmp_path):
  proc = run_script('ablate.py', f'--base_flagfile={CI_TINY}', f'--workdir={tmp_path}', '--dry_run',
                    '--sweep=alpha=0.1,0.9', '--sweep=teacher_epochs=2', '--', '--students=bert1')
  commands = [line.split() for line in proc.stdout.strip().splitlines()]
  assert len(commands) == 3 and not any(tmp_path.iterdir())
  for command, (flag, folder, own_teachers) in zip(commands, [('alpha=0.1', 'alpha=0.1', False),
                                                              ('alpha=0.9', 'alpha=0.9', False),
                                                              ('teacher_epochs=2.0', 'teacher_epochs=2', True)]):
    folder = tmp_path / folder
    shared = folder if own_teachers else tmp_path / 'shared'
    assert command[1] == str(SCRIPTS / 'run.py')
    assert {f'--{flag}', f'--workdir={folder}', f'--shared_dir={shared}', '--students=bert1'} <= set(command)


@pytest.mark.slow
@pytest.mark.parametrize('args,message', [
    (['--sweep=alpha'], 'expected FLAG=V1,V2'),
    (['--sweep=alpha=0.1', '--sweep=alpha=0.2'], 'swept twice'),
    (['--sweep=no_such_flag=1,2'], "unknown setting(s) ['no_such_flag']"),
    (['--sweep=alpha=0.1', '--', '--workdir=elsewhere'], '--workdir is set by ablate.py itself'),
])
def test_ablate_bad_input_is_one_error_line(tmp_path, args, message):
  proc = run_script('ablate.py', f'--base_flagfile={CI_TINY}', f'--workdir={tmp_path}', *args, check=False)
  assert_user_error(proc, message)


@pytest.mark.slow
def test_export_onnx_runs_in_onnxruntime_with_the_same_logits(bert_model, tmp_path):
  """--onnx: model.onnx gives the JAX model's combined logits in ONNX Runtime at two batch shapes (dynamic
  axes); --onnx_int8 adds a quantised file that runs (finite logits of the same shape)."""
  import onnxruntime
  directory, model, params = bert_model
  out = tmp_path / 'hf'
  proc = run_script('export.py', f'--model={directory}', f'--out={out}', '--onnx', '--onnx_int8')
  assert f'wrote {out / "model.onnx"}' in proc.stdout and f'wrote {out / "model.int8.onnx"}' in proc.stdout
  tokenizer = models.load_tokenizer(out)
  for batch in (1, len(QUESTIONS)):
    encodings = tokenizer.encode_batch(list(zip(QUESTIONS[:batch], PASSAGES[:batch])))
    length = max(len(e.ids) for e in encodings)
    ids, types, mask = (np.zeros((batch, length), np.int64) for _ in range(3))
    for k, e in enumerate(encodings):
      ids[k, :len(e.ids)], types[k, :len(e.ids)], mask[k, :len(e.ids)] = e.ids, e.type_ids, 1
    ours = np.asarray(model.apply({'params': params}, ids.astype(np.int32), types.astype(np.int32),
                                  mask.astype(np.int32))['logits'])
    feed = {'input_ids': ids, 'attention_mask': mask, 'token_type_ids': types}
    fp32 = onnxruntime.InferenceSession(str(out / 'model.onnx')).run(['logits'], feed)[0]
    np.testing.assert_allclose(fp32, ours, atol=1e-4)
    int8 = onnxruntime.InferenceSession(str(out / 'model.int8.onnx')).run(['logits'], feed)[0]
    assert int8.shape == fp32.shape and np.isfinite(int8).all()
  assert_user_error(run_script('export.py', f'--model={directory}', f'--out={tmp_path / "b"}', '--onnx_int8',
                               check=False), '--onnx_int8 quantises the ONNX file: add --onnx')


# compare_scores.py
@pytest.mark.slow
def test_compare_scores_prints_the_comparison_and_names_bad_files(tmp_path):
  a, b = tmp_path / 'a.tsv', tmp_path / 'b.tsv'
  a.write_text('row\tlogit_0\tlogit_1\n1\t0\t1\n2\t1\t0\n')
  b.write_text('row\tlogit_0\tlogit_1\n2\t1\t0.25\n1\t0\t1\n3\t0\t0\n')
  out = json.loads(run_script('compare_scores.py', f'--a={a}', f'--b={b}').stdout)
  assert out['common_rows'] == 2 and out['max_abs_logit_diff'] == 0.25 and out['argmax_agreement'] == 1.0
  assert_user_error(run_script('compare_scores.py', f'--a={a}', f'--b={tmp_path / "none.tsv"}', check=False),
                    'none.tsv: cannot read teacher scores')
