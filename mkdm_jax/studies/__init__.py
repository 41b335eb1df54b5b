"""Sweeps as library code: studies (methods over student seeds), factor analyses and ablations.

  variants.py  each run of a sweep as a typed `mkdm_jax.config.Config`
  runner.py    runs one Config (experiments/run.py in a subprocess, its log in <workdir>/run.log)
  records.py   a study run's record: settings, metrics, each question's scores; staleness
  summaries.py means and std over seeds, paired tests over questions (mkdm_jax.stats), sweep scores
  tables.py    the markdown reports;  plots.py  their figures
  sweeps.py    run what is missing, assemble the report, write it (study, factors, ablation)

experiments/study.py, factors.py and ablate.py parse their flags and call `sweeps`.
"""
