"""The markdown reports of a study, a factor analysis and an ablation, from their report dicts."""
from mkdm_jax.studies.summaries import ALPHA, POWER


def provenance_line(p) -> str:
  return f"{p['date']}, {p['cpu_model']} ({p['backend']}), commit {p['commit'][:12]}"


def mean_std_cell(s) -> str:
  return f"{s['mean']:.4f}" + ('' if s['std'] is None else f" ± {s['std']:.4f}")


def study_markdown(report) -> str:
  summary = report['summary']
  names = list(summary[0]['metrics'])
  lines = [f"# Study: {report['task']} ({report['split']}), seeds {', '.join(map(str, report['seeds']))}", '',
           f"`{report['base_flagfile']}`" + (f" with `{' '.join(report['extra_flags'])}`" if report['extra_flags']
                                            else '') + f". Report: {provenance_line(report['provenance'])}.", '',
           'Runs: ' + '; '.join(f"{arch} seeds {', '.join(map(str, seeds))}"
                                for arch in report['students']
                                if (seeds := [r['seed'] for r in report['runs'] if r['student'] == arch]))
           + '.' + (f" Not yet run: {', '.join(f'{a} seed {s}' for a, s in report['missing'])}." if report['missing']
                    else ''), '',
           *(['Variants (their methods, but the first\'s, named `method@variant`): ' + '; '.join(
               f"`{v['name']}` `{' '.join(v['flags']) or '-'}`" for v in report['variants']) + '.', '']
             if report.get('variants') else []),
           *(['Teacher diversity (mkdm_jax.metrics.teacher_diversity): ' + '; '.join(
               f"{split}: disagreement {d['disagreement']:.4f}, symmetric KL {d['symmetric_kl']:.4f}"
               for split, d in report['teacher_diversity'].items()) + '.', ''] if report['teacher_diversity'] else []),
           f"## Mean ± std over seeds ({report['split']}; teachers are fixed, seeds '-')", '',
           '| model | method | student | seeds | ' + ' | '.join(names) + ' |', '|' + '---|' * (4 + len(names))]
  for r in summary:
    lines.append(f"| {r['name']} | {r['method']} | {r['student'] or '-'} | {r['seeds'] or '-'} | "
                 + ' | '.join(mean_std_cell(r['metrics'][n]) for n in names) + ' |')
  extra = [(r, name, scores) for r in summary for name, scores in r.get('extra_metrics', {}).items()]
  if extra:
    metrics = list(extra[0][2])
    lines += ['', '## Out of domain (--extra_eval; mean ± std over seeds)', '',
              '| model | set | ' + ' | '.join(metrics) + ' |', '|' + '---|' * (2 + len(metrics))]
    lines += [f"| {r['name']} | {name} | " + ' | '.join(mean_std_cell(scores[m]) if m in scores else '-'
                                                      for m in metrics) + ' |' for r, name, scores in extra]
  costly = [r for r in summary if 'cost' in r]
  if costly:
    cells = lambda cost, key, fmt: fmt.format(cost[key]['mean']) if key in cost else '-'
    lines += ['', '## Cost (mean over seeds): wall time of each stage (a resumed run: its last part) and median '
              'logged training examples/s', '',
              '| model | stage 2 s | stage 2 ex/s | stage 1 s | stage 1 ex/s |', '|---|---|---|---|---|']
    lines += [f"| {r['name']} | {cells(r['cost'], 'train_seconds', '{:.0f}')} | "
              f"{cells(r['cost'], 'train_examples_per_sec', '{:.1f}')} | {cells(r['cost'], 'pretrain_seconds', '{:.0f}')} | "
              f"{cells(r['cost'], 'pretrain_examples_per_sec', '{:.1f}')} |" for r in costly]
  collapse = [r for r in summary if 'head_agreement' in r]
  if collapse:
    lines += ['', '## Head agreement (dev): do the per-teacher heads rank like their teachers?', '',
              "Mean per-question Kendall tau between each pair of heads' scores, beside the same between their "
              'teachers (mean ± std over seeds); heads that agree more than their teachers have collapsed to one '
              'ranking.', '', '| model | heads | teachers |', '|---|---|---|']
    lines += [f"| {r['name']} | {mean_std_cell(r['head_agreement'])} | {mean_std_cell(r['teacher_agreement'])} |"
              for r in collapse]
  if report.get('seeds_random'):
    lines += ['', f"## Paired tests: `{report['metric']}` per seed and question, seeds and questions random", '',
              "A - B over seeds and questions, with its 95% two-level bootstrap interval (seeds and questions both "
              "resampled: seed-to-seed variance included), the two-sided p-value read off the same resamples, "
              "Holm-corrected over each student's pairs, and the minimal detectable difference (power "
              f"{POWER} at the first Holm step's level, {ALPHA} / pairs, with the bootstrap standard error).", '']
  else:
    lines += ['', f"## Paired tests: `{report['metric']}` per question, averaged over seeds", '',
              f"A - B over the questions, with its 95% bootstrap interval (questions resampled), the two-sided "
              f"sign-flip p-value, Holm-corrected over each student's pairs, and the minimal detectable difference "
              f"(power {POWER} at level {ALPHA}).", '']
  lines += ['| student | A - B | seeds | questions | mean diff | 95% CI | p | Holm p | MDE |', '|' + '---|' * 9]
  for t in report['tests']:
    lines.append(f"| {t['student']} | {t['a']} - {t['b']} | {t['seeds']} | {t['questions']} | "
                 f"{t['mean_difference']:+.4f} | [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}] | {t['p_value']:.4f} | "
                 f"{t['p_holm']:.4f} | {t['mde']:.4f} |")
  if report['skipped_pairs']:
    lines += ['', 'Skipped: ' + '; '.join(report['skipped_pairs']) + '.']
  lines += ['', 'Run provenance: ' + '; '.join(f"{r['student']} seed {r['seed']}: {provenance_line(r['provenance'])}"
                                             for r in report['runs']) + '.']
  return '\n'.join(lines) + '\n'


def interval(t) -> str:
  return f"{t['mean_difference']:+.4f} [{t['ci_low']:+.4f}, {t['ci_high']:+.4f}]"


def factors_markdown(report) -> str:
  lines = [f"# Factors: {report['student']}, seeds {', '.join(report['seeds'])}, `{report['metric']}` per question",
           '', f"`{report['base_flagfile']}`; reference variant `{report['variants'][0]['name']}`. "
           f"{report['provenance']['date']}, {report['provenance']['cpu_model']}, commit "
           f"{report['provenance']['commit'][:12]}.", '',
           ('A - B: mean over seeds and questions, 95% two-level bootstrap interval (seeds and questions resampled). '
            'Change: the variant\'s A - B minus the reference\'s, per seed and question, with its interval and '
            'bootstrap p-value (not corrected for the number of variants).' if report.get('seeds_random') else
            'A - B: mean over questions of the seed-averaged difference, 95% bootstrap interval. Change: the '
            'variant\'s A - B minus the reference\'s, per question, with its interval and sign-flip p-value '
            '(not corrected for the number of variants).'), '',
           '| variant | flags | seeds | teacher disagreement (dev) | A | B | mean A | mean B | A - B [95% CI] | '
           'change vs reference [95% CI] | p |', '|' + '---|' * 11]
  for v in report['variants']:
    for t in v['pairs']:
      change = t.get('change')
      lines.append(f"| {v['name']} | `{' '.join(v['flags']) or '-'}` | {v['seeds']} | "
                   f"{v['teacher_disagreement']:.4f} | {t['a']} | {t['b']} | {t['mean_a']:.4f} | {t['mean_b']:.4f} | "
                   f"{interval(t)} | " + (f"{interval(change)} | {change['p_value']:.4f} |" if change else '- | - |'))
  effects = {(v['name'], t[m]): t[f'change_{side}'] for v in report['variants'] for t in v['pairs']
             for side, m in (('a', 'a'), ('b', 'b')) if f'change_{side}' in t}
  if effects:
    lines += ['', "Each method's own score, the variant's minus the reference's (same seeds, per question):", '',
              '| variant | method | change vs reference [95% CI] | p |', '|---|---|---|---|']
    lines += [f'| {name} | {method} | {interval(change)} | {change["p_value"]:.4f} |'
              for (name, method), change in effects.items()]
  if report['not_run']:
    lines += ['', 'Not run yet (no records): ' + ', '.join(f'`{name}`' for name in report['not_run']) + '.']
  return '\n'.join(lines) + '\n'


def ablation_markdown(report) -> str:
  lines = [f"# Ablation: `{report['metric']}` on {report['task']} ({report['split']})", '',
           f"Base: `{report['base_flagfile']}`" + (f" with `{' '.join(report['extra_flags'])}`"
                                                   if report['extra_flags'] else '') + '.']
  for sweep in report['sweeps']:
    columns = sweep['columns']
    shared = 'shared by all variants' if sweep['shares_teachers'] else 'trained per variant'
    lines += ['', f"## {sweep['flag']} (teachers {shared})", '',
              f"| {sweep['flag']} | " + ' | '.join(columns) + ' |', '|' + '---|' * (len(columns) + 1)]
    for v in sweep['variants']:
      cells = [f"{v['scores'][c]:.4f}" if c in v['scores'] else '-' for c in columns]
      lines.append(f"| {v['value']} | " + ' | '.join(cells) + ' |')
  return '\n'.join(lines) + '\n'
