"""The figures of a study (a metric over seeds) and of an ablation sweep (a metric against the swept setting)."""
import json

import numpy as np

from mkdm_jax.studies.summaries import records_of
from mkdm_jax.studies.tables import provenance_line


def _pyplot():
  import matplotlib  # deferred: only reports draw
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def study_plot(report, records, path):
  """Per student architecture: each method's metric per seed (points) and its mean (bar), teachers as lines."""
  plt = _pyplot()
  metric, summary = report['metric'], report['summary']
  students = [a for a in report['students'] if records_of(records, a)]
  fig, axes = plt.subplots(1, len(students), figsize=(1.5 + 3 * len(students), 4.5), sharey=True, squeeze=False)
  for ax, arch in zip(axes[0], students):
    per_seed = [{r['name']: r['metrics'][metric] for r in record['rows']} for record in records_of(records, arch)]
    rows = [r for r in summary if r['student'] == arch]
    for i, row in enumerate(rows):
      values = [seed[row['name']] for seed in per_seed]
      xs = i + np.linspace(-0.15, 0.15, len(values)) if len(values) > 1 else [i]
      ax.scatter(xs, values, s=16, color='C0', zorder=3, label='seed' if i == 0 else None)
      ax.hlines(row['metrics'][metric]['mean'], i - 0.3, i + 0.3, color='black', label='mean' if i == 0 else None)
    for j, row in enumerate(r for r in summary if r['student'] is None):
      ax.axhline(row['metrics'][metric]['mean'], color=f'C{j + 1}', alpha=0.7,
                 linestyle='--' if row['method'] == 'teacher_ensemble' else ':', label=row['name'])
    ax.set_xticks(range(len(rows)), [r['method'] for r in rows], rotation=30, ha='right')
    ax.set_title(f'{arch} ({len(per_seed)} seeds)')
    ax.grid(alpha=0.3, axis='y')
  axes[0][0].set_ylabel(f"{metric} ({report['split']})")
  axes[0][-1].legend(fontsize='small', loc='best')
  fig.suptitle(f"{report['task']}: {metric} over seeds {', '.join(map(str, report['seeds']))}")
  fig.text(0.01, 0.01, provenance_line(report['provenance']), fontsize=6, color='gray')
  fig.tight_layout(rect=(0, 0.03, 1, 1))
  fig.savefig(path, dpi=120, metadata={'Description': json.dumps(report['provenance'])})
  plt.close(fig)


def curve_plot(rows, teachers, metric, path):
  """A stage-1 size curve: per student and method its metric (mean, std as error bars) against the stage-1
  pairs; methods without a first stage as horizontal lines; teachers as dotted lines."""
  plt = _pyplot()
  fig, ax = plt.subplots(figsize=(7, 4.5))
  series = {}
  for r in rows:
    series.setdefault((r['student'], r['method']), []).append(r)
  for i, ((student, method), points) in enumerate(series.items()):
    label, color = f'{student} {method}', f'C{i}'
    if all(p['pairs'] == 0 for p in points):
      ax.axhline(points[0][f'{metric}_mean'], color=color, linestyle='--', label=f'{label} (no stage 1)')
      continue
    ax.errorbar([p['pairs'] for p in points], [p[f'{metric}_mean'] for p in points], marker='o', color=color,
                yerr=[p[f'{metric}_std'] or 0.0 for p in points], capsize=3, label=label)
  for j, t in enumerate(teachers):
    ax.axhline(t[metric], color='gray', alpha=0.3 + 0.5 * j / max(len(teachers), 1), linestyle=':', label=t['name'])
  if any(r['pairs'] for r in rows):
    ax.set_xscale('log')
  ax.set_xlabel('stage-1 pairs')
  ax.set_ylabel(metric)
  ax.set_title(f'{metric} against stage-1 size (mean ± std over seeds)')
  ax.grid(alpha=0.3)
  ax.legend(fontsize='x-small', loc='best')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def sweep_plot(sweep, metric, path):
  """Metric vs setting, one line per method; numeric settings on a numeric axis."""
  plt = _pyplot()
  values = [v['value'] for v in sweep['variants']]
  try:
    xs = [float(v) for v in values]
  except ValueError:
    xs = values
  fig, ax = plt.subplots(figsize=(6, 4))
  for column in sweep['columns']:
    points = [(x, v['scores'][column]) for x, v in zip(xs, sweep['variants']) if column in v['scores']]
    style = '--' if column.endswith('teacher_ensemble') else '-'
    ax.plot([p[0] for p in points], [p[1] for p in points], style, marker='o', label=column)
  if xs != values:  # numeric: ticks at the settings, a log axis when they span two decades
    if min(xs) > 0 and max(xs) >= 100 * min(xs):
      ax.set_xscale('log')
    ax.set_xticks(xs, values)
    ax.minorticks_off()
  ax.set_xlabel(f"--{sweep['flag']}")
  ax.set_ylabel(metric)
  ax.set_title(f"{metric} vs --{sweep['flag']}")
  ax.grid(alpha=0.3)
  ax.legend(fontsize='small')
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)
