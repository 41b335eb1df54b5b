"""A sweep end to end: run what is missing (one run per Config, `runner`), assemble the report, write it.

  study:    <root>/study.json, study.md, study_<metric>.png  (from the records alone: a study spans sessions)
  factors:  one study per variant in <root>/<variant>/, then <root>/factors.json and factors.md, and with study
            pairs one study of every variant's methods side by side in <root>/merged/ (`merged_study`)
  ablation: <root>/ablation.json, ablation.md, ablation_<flag>.png
"""
import dataclasses
import json

from mkdm_jax import distill, paths, provenance
from mkdm_jax.data import corpus as data_corpus
from mkdm_jax.errors import UserError
from mkdm_jax.studies import plots, records, runner, summaries, tables, variants
from mkdm_jax.workdir import WorkdirLock


def question_examples(cfg, metric):
  """The eval split, which must group rows into questions (the study scores each question)."""
  examples = records.eval_examples(cfg)
  if examples.groups is None:
    raise UserError(f'--metric={metric} scores questions, and the eval split of task {cfg.task} has no '
                    'question groups')
  return examples


def study_records(study: variants.Study, report_only):
  """Each run's record, running the runs without one (in order; none with `report_only`; interrupted ones resume
  in their work directories), and the (arch, seed) of those still missing. Every existing record is checked
  against its run's settings before any run starts."""
  runs = variants.study_runs(study)
  paths = [records.record_path(study.records, run.students[0], run.student_seed) for run in runs]
  recorded = {path: records.read_record(path, records.run_settings(run))
              for run, path in zip(runs, paths) if path.exists()}
  to_run = not report_only and len(recorded) < len(runs)
  if to_run:
    records.work_tree(study.allow_dirty)  # a modified tree is refused before any run, not after the first
  examples = question_examples(study.cfg, study.metric) if to_run else None
  found, missing = [], []
  study.root.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(study.root):
    for i, (run, path) in enumerate(zip(runs, paths)):
      label = f'[{i + 1}/{len(runs)}] {run.students[0]} seed {run.student_seed}'
      if path in recorded:
        found.append(recorded[path])
        print(f'{label}: recorded in {path}', flush=True)
      elif report_only:
        missing.append((run.students[0], run.student_seed))
      else:
        code = records.work_tree(study.allow_dirty)  # when the run starts: the tree may change while it trains
        found.append(records.make_record(run, runner.run_config(run, label), examples, code))
        records.write_record(path, found[-1])
  return found, missing


def study_report(study: variants.Study, found, missing, methods=None, extra=None):
  """The report of the records found: per architecture and method the mean and std over seeds, and the paired
  tests of each pair whose methods the study runs (others are skipped with a note); written to <root>/study.json,
  study.md and study_<metric>.png. `methods`: the methods the records' rows carry (default the Config's; a merged
  study's are named `method@variant`); `extra`: more report fields."""
  cfg = study.cfg
  methods = list(methods or cfg.methods)
  if not found:
    raise UserError(f'no finished run is recorded in {study.records} for --seeds={",".join(map(str, study.seeds))} '
                    f'and --students={",".join(cfg.students)}; run the study without --report_only')
  tested = [(a, b) for a, b in study.pairs if a in methods and b in methods]
  skipped = [f"{a}:{b} ({', '.join(m for m in (a, b) if m not in methods)} not in --methods)"
             for a, b in study.pairs if (a, b) not in tested]
  for note in skipped:
    print(f'skipping pair {note}', flush=True)
  report = {'base_flagfile': study.flagfile, 'extra_flags': list(study.flags), 'seeds': list(study.seeds),
            'metric': study.metric, 'task': cfg.task, 'split': cfg.eval_split, 'students': list(cfg.students),
            'methods': methods, **(extra or {}),
            'config': {k: v for k, v in dataclasses.asdict(cfg).items() if k not in variants.STUDY_RESERVED},
            'provenance': provenance.record(), 'records': str(study.records),
            'runs': [{k: r[k] for k in ('student', 'seed', 'provenance', 'rows')} for r in found],
            'missing': missing, 'teacher_diversity': found[0]['teacher_diversity'],
            'summary': summaries.summarise(found, cfg.students),
            'seeds_random': study.seeds_random,
            'tests': summaries.paired_tests(tested, cfg.students, found, study.metric, study.seeds_random),
            'skipped_pairs': skipped}
  study.root.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(study.root):
    (study.root / 'study.json').write_text(json.dumps(report, indent=1))
    (study.root / 'study.md').write_text(tables.study_markdown(report))
    plots.study_plot(report, found, study.root / f'study_{study.metric}.png')
  return report


def run_study(study: variants.Study, report_only=False):
  """The study's missing runs, then its report; returns (report, records)."""
  found, missing = study_records(study, report_only)
  return study_report(study, found, missing), found


VARIANT_MARK = '@'  # a variant's method in a merged study: method@variant


def merged_records(ran):
  """Per seed recorded by every variant of `ran` [(variant, records, missing)], the first (reference) variant's
  record with every other variant's student rows and question scores added under `method@variant`; returns
  (records, the method names in order, the seeds left out as [(student, seed)])."""
  reference, others = ran[0][0], ran[1:]
  by_seed = [{r['seed']: r for r in found} for _, found, _ in ran]
  seeds = [s for s in by_seed[0] if all(s in other for other in by_seed[1:])]
  methods = list(reference.study.cfg.methods)
  methods += [f'{m}{VARIANT_MARK}{v.name}' for v, _, _ in others for m in v.study.cfg.methods]
  merged = []
  for seed in seeds:
    record = {**by_seed[0][seed], 'rows': list(by_seed[0][seed]['rows']),
              'question_scores': {k: dict(v) for k, v in by_seed[0][seed]['question_scores'].items()}}
    for (variant, _, _), found in zip(others, by_seed[1:]):
      other = found[seed]
      if other['questions'] != record['questions']:
        raise UserError(f"variant {variant.name} seed {seed} scored other questions than variant {reference.name}: "
                        'a merged study compares variants of the same eval split only')
      for row in other['rows']:
        if row['student'] is not None:  # teachers once, the reference's
          name = f"{row['name']}{VARIANT_MARK}{variant.name}"
          record['rows'].append({**row, 'name': name, 'method': f"{row['method']}{VARIANT_MARK}{variant.name}"})
          for metric, scores in other['question_scores'].items():
            record['question_scores'][metric][name] = scores[row['name']]
    merged.append(record)
  left_out = sorted({(r['student'], r['seed']) for _, found, _ in ran for r in found if r['seed'] not in seeds})
  return merged, methods, left_out


def merged_study(ran, pairs, root, not_run=()):
  """One study report of every variant's methods side by side (`merged_records`): the reference's methods keep
  their names, another variant's are `method@variant`, and `pairs` may test any two of them (e.g.
  mkdm@head_layers1:kd_single); a pair with a method of a variant in `not_run` (no records yet) is skipped with a
  note. Written to <root>/study.json, study.md and study_<metric>.png; returns it."""
  merged, methods, left_out = merged_records(ran)
  pending = [(a, b) for a, b in pairs if {a.partition('@')[2], b.partition('@')[2]} & set(not_run)]
  for a, b in pending:
    print(f'skipping study pair {a}:{b}: its variant has no records yet', flush=True)
  pairs = [pair for pair in pairs if pair not in pending]
  unknown = sorted({m for pair in pairs for m in pair} - set(methods))
  if unknown:
    raise UserError(f'--study_pairs: {", ".join(unknown)} is not a method of the merged study; choose from '
                    f'{", ".join(methods)}')
  study = dataclasses.replace(ran[0][0].study, root=root, pairs=tuple(pairs))
  extra = {'variants': [{'name': v.name, 'flags': list(v.flags), 'records': str(v.study.records)} for v, _, _ in ran]}
  return study_report(study, merged, [*ran[0][2], *left_out], methods=methods, extra=extra)


def size_curve(reports, metric, root):
  """The stage-1 size curve of variant study reports that differ in --unlabelled_corpus: per student and method,
  its `metric` against the stage-1 pairs (the corpus's rows; 0 for a method without a first stage), with the
  out-of-domain SQuAD dev mean where --extra_eval has it. Rows of two-stage methods without a prepared corpus (an
  in-memory stage 1 of unrecorded size) are left out; a one-stage method belongs in one variant (it would appear
  once per variant that runs it). Writes <root>/curve.json and curve_<metric>.png."""
  rows = []
  for report in reports:
    corpus_dir = report['config']['unlabelled_corpus']
    corpus_rows = data_corpus.read_manifest(corpus_dir)['rows'] if corpus_dir else None
    for r in report['summary']:
      if r['student'] is None or (distill.METHODS[r['method']].pretrain and corpus_rows is None):
        continue
      squad = r.get('extra_metrics', {}).get('squad_dev', {}).get(metric)
      rows.append({'student': r['student'], 'method': r['method'], 'seeds': r['seeds'],
                   'pairs': corpus_rows if distill.METHODS[r['method']].pretrain else 0,
                   f'{metric}_mean': r['metrics'][metric]['mean'], f'{metric}_std': r['metrics'][metric]['std'],
                   f'squad_dev_{metric}_mean': None if squad is None else squad['mean']})
  rows.sort(key=lambda r: (r['student'], r['method'], r['pairs']))
  teachers = [{'name': r['name'], metric: r['metrics'][metric]['mean']}
              for r in reports[0]['summary'] if r['student'] is None]
  root.mkdir(parents=True, exist_ok=True)
  paths.write_text_atomic(root / 'curve.json', json.dumps(rows, indent=1))
  plots.curve_plot(rows, teachers, metric, root / f'curve_{metric}.png')
  return rows


def run_factors(factor_variants, *, flagfile, flags, root, report_only=False, study_pairs=(), curve=False):
  """Each variant's study (in its own folder), then how each variant moves the difference of each method pair
  against the first variant, the reference. With `report_only`, a variant other than the reference without any
  record is listed as not run. Writes <root>/factors.json and factors.md, with `study_pairs` the merged study
  of every variant run (`merged_study`) in <root>/merged, and with `curve` the stage-1 size curve of variants that
  differ in --unlabelled_corpus (`size_curve`); returns the factors report.

  Every variant's runs come before the first report: a report starts JAX in this process (its provenance), which
  then must not hold an accelerator that the runs' processes need."""
  first = factor_variants[0].study
  (student,) = first.cfg.students
  ran, not_run = [], []
  for i, variant in enumerate(factor_variants):
    study = variant.study
    if report_only and i and not any(records.record_path(study.records, student, seed).exists()
                                     for seed in study.seeds):
      print(f'variant {variant.name}: no records in {study.records} yet: listed as not run', flush=True)
      not_run.append(variant.name)
    else:
      print(f'variant {variant.name}: {" ".join(variant.flags) or "the base flags"}', flush=True)
      ran.append((variant, *study_records(study, report_only)))
  reference, entries = None, []
  studies = []
  for variant, found, missing in ran:
    report = study_report(variant.study, found, missing)
    studies.append(report)
    tests, differences = summaries.factor_tests(report, found, variant.study.pairs, reference,
                                                variant.study.seeds_random)
    if reference is None:
      reference = differences
    dev = found[0]['teacher_diversity']['dev']
    entries.append({'name': variant.name, 'flags': list(variant.flags), 'seeds': len(found),
                    'teacher_disagreement': dev['disagreement'], 'teacher_symmetric_kl': dev['symmetric_kl'],
                    'pairs': tests})
  report = {'base_flagfile': flagfile, 'extra_flags': list(flags), 'student': student,
            'seeds': [str(s) for s in first.seeds], 'metric': first.metric, 'seeds_random': first.seeds_random,
            'provenance': provenance.record(),
            'variants': entries, 'not_run': not_run}
  (root / 'factors.json').write_text(json.dumps(report, indent=1))
  (root / 'factors.md').write_text(tables.factors_markdown(report))
  if study_pairs:
    merged_study(ran, study_pairs, root / 'merged', not_run)
  if curve:
    size_curve(studies, first.metric, root)
  return report


def run_ablation(ablation_variants, *, flagfile, flags, root, metric=None):
  """Runs every variant (finished stages are skipped, interrupted training resumes), then tabulates and plots
  `metric` (default: the task's primary metric) per sweep. Writes <root>/ablation.json, ablation.md and
  ablation_<flag>.png; returns the report."""
  root.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(root):
    results = [runner.run_config(v.cfg, f'[{i + 1}/{len(ablation_variants)}] {v.flag}={v.value}')
               for i, v in enumerate(ablation_variants)]
    metric = metric or results[0]['primary_metric']
    sweeps = []
    for flag in dict.fromkeys(v.flag for v in ablation_variants):
      chosen = [(v, res) for v, res in zip(ablation_variants, results) if v.flag == flag]
      sweeps.append(summaries.sweep_scores(flag, not distill.changes_teachers(flag), [v.value for v, _ in chosen],
                                           [res for _, res in chosen], metric, [v.cfg.workdir for v, _ in chosen]))
    report = {'base_flagfile': flagfile, 'extra_flags': list(flags), 'metric': metric, 'task': results[0]['task'],
              'split': results[0]['split'], 'sweeps': sweeps}
    (root / 'ablation.json').write_text(json.dumps(report, indent=1))
    (root / 'ablation.md').write_text(tables.ablation_markdown(report))
    for sweep in sweeps:
      plots.sweep_plot(sweep, metric, root / f"ablation_{sweep['flag']}.png")
  return report
