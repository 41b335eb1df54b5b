"""A sweep end to end: run what is missing (one run per Config, `runner`), assemble the report, write it.

  study:    <root>/study.json, study.md, study_<metric>.png  (from the records alone: a study spans sessions)
  factors:  one study per variant in <root>/<variant>/, then <root>/factors.json and factors.md
  ablation: <root>/ablation.json, ablation.md, ablation_<flag>.png
"""
import dataclasses
import json

from mkdm_jax import distill, provenance
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


def study_report(study: variants.Study, found, missing):
  """The report of the records found: per architecture and method the mean and std over seeds, and the paired
  tests of each pair whose methods the study runs (others are skipped with a note); written to <root>/study.json,
  study.md and study_<metric>.png."""
  cfg = study.cfg
  if not found:
    raise UserError(f'no finished run is recorded in {study.records} for --seeds={",".join(map(str, study.seeds))} '
                    f'and --students={",".join(cfg.students)}; run the study without --report_only')
  tested = [(a, b) for a, b in study.pairs if a in cfg.methods and b in cfg.methods]
  skipped = [f"{a}:{b} ({', '.join(m for m in (a, b) if m not in cfg.methods)} not in --methods)"
             for a, b in study.pairs if (a, b) not in tested]
  for note in skipped:
    print(f'skipping pair {note}', flush=True)
  report = {'base_flagfile': study.flagfile, 'extra_flags': list(study.flags), 'seeds': list(study.seeds),
            'metric': study.metric, 'task': cfg.task, 'split': cfg.eval_split, 'students': list(cfg.students),
            'methods': list(cfg.methods),
            'config': {k: v for k, v in dataclasses.asdict(cfg).items() if k not in variants.STUDY_RESERVED},
            'provenance': provenance.record(), 'records': str(study.records),
            'runs': [{k: r[k] for k in ('student', 'seed', 'provenance', 'rows')} for r in found],
            'missing': missing, 'teacher_diversity': found[0]['teacher_diversity'],
            'summary': summaries.summarise(found, cfg.students),
            'seeds_random': study.seeds_random,
            'tests': summaries.paired_tests(tested, cfg.students, found, study.metric, study.seeds_random),
            'skipped_pairs': skipped}
  with WorkdirLock(study.root):
    (study.root / 'study.json').write_text(json.dumps(report, indent=1))
    (study.root / 'study.md').write_text(tables.study_markdown(report))
    plots.study_plot(report, found, study.root / f'study_{study.metric}.png')
  return report


def run_study(study: variants.Study, report_only=False):
  """The study's missing runs, then its report; returns (report, records)."""
  found, missing = study_records(study, report_only)
  return study_report(study, found, missing), found


def run_factors(factor_variants, *, flagfile, flags, root, report_only=False):
  """Each variant's study (in its own folder), then how each variant moves the difference of each method pair
  against the first variant, the reference. With `report_only`, a variant other than the reference without any
  record is listed as not run. Writes <root>/factors.json and factors.md; returns the report.

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
  for variant, found, missing in ran:
    report = study_report(variant.study, found, missing)
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
