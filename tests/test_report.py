"""The report's parts in process: timing passes, thresholds, teacher rows from teacher objects, the results table."""
import types

import numpy as np
import pytest

from mkdm_jax import pipeline, report
from mkdm_jax.data.readers import Examples
from mkdm_jax.teachers import base


def ctx_with(eval_rows=10, speed_rows=4, speed_repeats=3, dev_labels=None):
  text = ['x'] * eval_rows
  make = lambda labels: Examples(text, text, np.asarray(labels, np.int32), None, np.arange(len(labels)), 's', 'f')
  examples = {'eval': make([0] * eval_rows)}
  if dev_labels is not None:
    examples['dev'] = make(dev_labels)
  cfg = types.SimpleNamespace(speed_rows=speed_rows, speed_repeats=speed_repeats)
  return types.SimpleNamespace(cfg=cfg, examples=examples, task=types.SimpleNamespace(num_classes=2),
                               metrics=['accuracy'])


def test_examples_per_sec_warms_up_then_times_the_median_pass(monkeypatch):
  clock = iter([0.0, 2.0, 10.0, 11.0, 20.0, 24.0])  # passes of 2, 1 and 4 seconds
  monkeypatch.setattr(report.time, 'perf_counter', lambda: next(clock))
  calls = []
  speed = report.examples_per_sec(ctx_with(), [lambda: calls.append('a'), lambda: calls.append('b')])
  assert calls == ['a', 'b'] * 4  # one warm-up pass and three timed ones
  assert speed == pytest.approx(4 / 2.0)  # 4 rows (--speed_rows) over the median pass


def test_threshold_is_tuned_on_dev_for_binary_tasks_only():
  probs = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
  assert report.threshold_of(ctx_with(), probs) is None  # no dev split
  ctx = ctx_with(dev_labels=[0, 1, 1])
  assert report.threshold_of(ctx, None) is None
  threshold = report.threshold_of(ctx, probs)
  assert 0.1 < threshold <= 0.4  # both positives above it, the negative below


def test_teacher_row_takes_its_fields_and_scorer_from_the_teacher(tmp_path):
  class Stub(base.Teacher):
    kind = 'stub'
    saved = None

    def report_fields(self):
      return {'params': 5, 'train_seconds': 1.5}

    def scorer(self, ctx, count):
      return ('scorer', count)

    def save_threshold(self, threshold):
      Stub.saved = threshold

  ctx = ctx_with(eval_rows=10, speed_rows=64, dev_labels=[0, 1])
  logits = np.log(np.array([[0.5, 0.5]] * 10))
  row, timed = report._teacher_row(ctx, Stub(3, 'src', tmp_path / 'teacher_3'), logits, logits[:2], {})
  assert (row['name'], row['kind'], row['checkpoint'], row['params'], row['train_seconds']) == (
      'teacher_3', 'stub', 'src', 5, 1.5)
  assert timed == ('scorer', 10) and Stub.saved == row['threshold']  # capped at the eval rows


def test_results_markdown_gives_speedups_against_the_fastest_teacher():
  row = lambda name, method, speed, params: {'name': name, 'method': method, 'student': None, 'params': params,
                                             'examples_per_sec': speed, 'metrics': {'map': 0.5}}
  results = {'task': 't', 'split': 'test', 'rows': [row('teacher_0', 'teacher', 100.0, 2e6),
                                                     row('teacher_1', 'teacher', 50.0, None),
                                                     row('s', 'kd_single', 400.0, 1e6)],
             'provenance': {'date': 'd', 'cpu_model': 'cpu', 'backend': 'cpu', 'commit': '0123456789abcdef'},
             'speed': {'rows': 4, 'batch_size': 8, 'timing': 'median'}}
  table = report.results_markdown(results).splitlines()
  assert '0123456789ab' in table[0]
  assert table[4] == '| teacher_0 | teacher | - | 2.00M | 100 | 1.0x | 0.5000 |'
  assert table[5] == '| teacher_1 | teacher | - | -M | 50 | 0.5x | 0.5000 |'
  assert table[6] == '| s | kd_single | - | 1.00M | 400 | 4.0x | 0.5000 |'


def test_planned_runs_are_the_trained_teachers_and_every_run_of_every_method(tmp_path):
  from mkdm_jax import config, context
  cfg = config.Config(workdir=str(tmp_path), num_teachers=2, teacher_checkpoints=('random', 'overlap:idf'),
                      students=('bert1',), methods=('kd_single', 'tkd'))
  ctx = types.SimpleNamespace(cfg=cfg, teachers=context.build_teachers(cfg, tmp_path),
                              student_dir=lambda arch, run: tmp_path / f'{arch}_{run}')
  planned = pipeline.planned_runs(ctx)
  assert [d.name for d, _ in planned] == ['teacher_0', 'bert1_kd_single', 'bert1_tkd_stage1', 'bert1_tkd']
  assert [s.get('method') for _, s in planned[1:]] == ['kd_single', 'tkd_stage1', 'tkd']
