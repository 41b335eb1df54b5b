"""The evaluate and report stages: every teacher's, the ensemble's and every student's metrics on the eval split (and
at a dev-tuned threshold) and on dev, measured inference speed, `eval/rows.json`, `results.json` and `results.md`."""
import dataclasses
import json
import statistics
import time

import numpy as np

from mkdm_jax import context, distill, provenance, saved_model, teacher_logits, train
from mkdm_jax import data as data_lib
from mkdm_jax import metrics as metrics_lib
from mkdm_jax.errors import UserError
from mkdm_jax.models import count_params
from mkdm_jax.models.classifier import combination_weights


def predict(ctx, model, params, encoded):
  return train.predict(model, params, encoded, mesh=ctx.mesh, batch_size=ctx.cfg.eval_batch_size)


def speed_rows(ctx, tokenizer_dir):
  return ctx.encoded(tokenizer_dir, 'eval').select(np.arange(min(ctx.cfg.speed_rows, len(ctx.examples['eval']))))


def examples_per_sec(ctx, runs):
  """Inference examples/s of running every `run()` of `runs` (each scoring the first --speed_rows eval rows):
  one warm-up pass, then the median of --speed_repeats timed passes."""
  def one_pass():
    for run in runs:
      run()

  one_pass()
  times = []
  for _ in range(ctx.cfg.speed_repeats):
    t0 = time.perf_counter()
    one_pass()
    times.append(time.perf_counter() - t0)
  return min(ctx.cfg.speed_rows, len(ctx.examples['eval'])) / statistics.median(times)


def timed_model(ctx, model, params, tokenizer_dir):
  rows = speed_rows(ctx, tokenizer_dir)
  return lambda: predict(ctx, model, params, rows)


def threshold_of(ctx, dev_probs):
  """The F1-best threshold on dev (binary tasks with a dev split), else None."""
  labels = ctx.examples['dev'].labels if 'dev' in ctx.examples else None
  if dev_probs is None or labels is None or ctx.task.num_classes != 2 or not (labels == 1).any():
    return None
  return metrics_lib.best_f1_threshold(labels, dev_probs[:, 1])


def scores(ctx, probs, threshold, dataset='eval'):
  examples = ctx.examples[dataset]
  return metrics_lib.compute(ctx.metrics, examples.labels, probs, examples.groups, threshold=threshold)


def _row(ctx, name, eval_probs, dev_probs, saved, **fields):
  """A results row: metrics on eval (at the dev-tuned threshold too) and dev; `saved` collects the
  probabilities for eval/probabilities.npz."""
  threshold = threshold_of(ctx, dev_probs)
  saved[f'eval/{name}'] = eval_probs
  row = {'name': name, **fields, 'threshold': threshold, 'metrics': scores(ctx, eval_probs, threshold)}
  if dev_probs is not None:
    saved[f'dev/{name}'] = dev_probs
    row['dev_metrics'] = scores(ctx, dev_probs, threshold, 'dev')
  return row


def _teacher_row(ctx, teacher, eval_logits, dev_logits, saved):
  """A teacher's results row and its timed inference (None where nothing runs: imported scores)."""
  row = _row(ctx, teacher.name, train.softmax(eval_logits), None if dev_logits is None else train.softmax(dev_logits),
             saved, method='teacher', student=None, kind=teacher.kind, checkpoint=teacher.source, params=None)
  row.update(teacher.report_fields())
  teacher.save_threshold(row['threshold'])
  return row, teacher.scorer(ctx, min(ctx.cfg.speed_rows, len(ctx.examples['eval'])))


def stage_evaluate(ctx: context.Context):
  """Metrics on the eval split (and at a dev-tuned threshold) and on dev, the measured speed of every model,
  every model's positive-class probabilities by row (eval/probabilities.npz, for paired tests), and how much
  the teachers differ (metrics.teacher_diversity) on dev and eval."""
  cfg = ctx.cfg
  out_dir = ctx.workdir / 'eval'
  out_dir.mkdir(parents=True, exist_ok=True)
  eval_logits = teacher_logits.read(ctx, 'eval')
  dev_logits = teacher_logits.read(ctx, 'dev') if 'dev' in ctx.examples else None
  rows, timed, saved = [], [], {}
  for i, teacher in enumerate(ctx.teachers):
    row, run = _teacher_row(ctx, teacher, eval_logits[:, i], None if dev_logits is None else dev_logits[:, i], saved)
    row['examples_per_sec'] = examples_per_sec(ctx, [run]) if run else None
    rows.append(row)
    timed.append(run)
  ensemble = lambda logits: np.mean([train.softmax(logits[:, i]) for i in range(len(ctx.teachers))], 0)
  runnable = all(timed)
  rows.append(_row(ctx, 'teacher_ensemble', ensemble(eval_logits), None if dev_logits is None else ensemble(dev_logits),
                   saved, method='teacher_ensemble', student=None,
                   params=sum(r['params'] for r in rows) if runnable else None,
                   examples_per_sec=examples_per_sec(ctx, timed) if runnable else None))
  for arch in cfg.students:
    for method in cfg.methods:
      directory = ctx.student_dir(arch, method)
      model, params, spec = saved_model.load(directory)
      tokenizer_dir = ctx.student_tokenizer_dir(arch)
      dev = predict(ctx, model, params, ctx.encoded(tokenizer_dir, 'dev')) if 'dev' in ctx.examples else None
      out = predict(ctx, model, params, ctx.encoded(tokenizer_dir, 'eval'))
      row = _row(ctx, f'{arch}_{method}', train.softmax(out['logits']),
                 None if dev is None else train.softmax(dev['logits']), saved, method=method, student=arch,
                 params=count_params(params),
                 examples_per_sec=examples_per_sec(ctx, [timed_model(ctx, model, params, tokenizer_dir)]),
                 combine_weights=np.asarray(combination_weights(model, params)).tolist(),
                 train_seconds=spec.get('train_seconds'), train_examples_per_sec=spec.get('train_examples_per_sec'))
      if distill.METHODS[method].pretrain:
        stage1 = saved_model.read_spec(ctx.student_dir(arch, distill.stage1_run(method)))
        row['pretrain_seconds'] = stage1.get('train_seconds')
        row['pretrain_examples_per_sec'] = stage1.get('train_examples_per_sec')
      saved_model.update_spec(directory, threshold=row['threshold'])
      heads = train.scores(out, ctx.examples['eval'], ctx.metrics, threshold=row['threshold'])
      row['head_metrics'] = {k: v for k, v in heads.items() if '/' in k}
      if ctx.extra_eval:  # out-of-domain sets (--extra_eval), at the dev-tuned threshold
        row['extra_metrics'] = {
            name: train.scores(predict(ctx, model, params, ctx.encoded(tokenizer_dir, name)), rows,
                               data_lib.get_task(task).metrics_for(rows)[0], threshold=row['threshold'])
            for name, (task, rows) in ctx.extra_eval.items()}
      if model.num_heads > 1 and dev is not None and ctx.examples['dev'].groups is not None:
        # Collapse: heads that rank alike although their teachers do not (issue 31).
        groups = ctx.examples['dev'].groups
        row['head_agreement'] = metrics_lib.ranking_agreement(dev['head_logits'], groups)
        row['teacher_agreement'] = metrics_lib.ranking_agreement(dev_logits, groups)
      rows.append(row)
  np.savez(out_dir / 'probabilities.npz', **{f'{d}/ids': ctx.examples[d].ids for d in ('eval', 'dev')
                                            if d in ctx.examples}, **saved)
  diversity = {name: metrics_lib.teacher_diversity(logits)
               for name, logits in (('dev', dev_logits), ('eval', eval_logits))
               if logits is not None and len(ctx.teachers) > 1}
  (out_dir / 'rows.json').write_text(json.dumps({'provenance': provenance.record(), 'rows': rows,
                                                 'teacher_diversity': diversity}, indent=1))


def stage_report(ctx: context.Context):
  path = ctx.workdir / 'eval' / 'rows.json'
  if not path.exists():
    raise UserError(f'{path} is missing: run the evaluate stage first')
  evaluated = json.loads(path.read_text())
  results = {'task': ctx.cfg.task, 'split': ctx.cfg.eval_split, 'primary_metric': ctx.primary,
             'provenance': evaluated['provenance'], 'config': dataclasses.asdict(ctx.cfg),
             'speed': {'rows': min(ctx.cfg.speed_rows, len(ctx.examples['eval'])),
                       'batch_size': ctx.cfg.eval_batch_size, 'buckets': list(ctx.buckets),
                       'timing': f'median of {ctx.cfg.speed_repeats} passes after a warm-up pass'},
             'teacher_diversity': evaluated.get('teacher_diversity', {}), 'rows': evaluated['rows']}
  (ctx.workdir / 'results.json').write_text(json.dumps(results, indent=1))
  (ctx.workdir / 'results.md').write_text(results_markdown(results))
  return results


def results_markdown(results):
  rows = results['rows']
  names = list(rows[0]['metrics'])
  speeds = [r['examples_per_sec'] for r in rows if r['method'] == 'teacher' and r['examples_per_sec']]
  teacher_speed = max(speeds) if speeds else None
  p, s = results['provenance'], results['speed']
  number = lambda x, fmt: '-' if x is None else format(x, fmt)
  lines = [f"Task `{results['task']}`, split `{results['split']}`. {p['date']}, {p['cpu_model']} "
           f"({p['backend']}), commit {p['commit'][:12]}. ex/s: inference on {s['rows']} eval rows, batch "
           f"{s['batch_size']}, {s['timing']}; speedup against the fastest teacher.", '',
           '| model | method | student | params | ex/s | speedup vs teacher | ' + ' | '.join(names) + ' |',
           '|' + '---|' * (6 + len(names))]
  for r in rows:
    speed = r['examples_per_sec']
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | "
                 f"{number(r['params'] and r['params'] / 1e6, '.2f')}M | {number(speed, '.0f')} | "
                 f"{number(speed and teacher_speed and speed / teacher_speed, '.1f')}x | "
                 + ' | '.join(f"{r['metrics'][n]:.4f}" for n in names) + ' |')
  return '\n'.join(lines) + '\n'
