"""Every run of a sweep as a typed `mkdm_jax.config.Config`, built from a base flagfile and run.py flags.

A study runs each student architecture of its Config with each seed; a factor analysis is one study per variant
of the flags; an ablation changes one setting of the base per variant. run.py flags (those given after `--` and
a variant's) are Config settings `--name=value`, typed and checked by `config.config_from_flagfile`.
"""
import dataclasses
import pathlib
import re

from mkdm_jax import config, distill
from mkdm_jax.errors import UserError
from mkdm_jax.studies import records as records_lib

STUDY_RESERVED = ('workdir', 'shared_dir', 'flagfile', 'student_seed')  # set per run by the study
ABLATION_RESERVED = ('workdir', 'shared_dir', 'flagfile')


def flag_overrides(args, reserved, tool) -> dict[str, str]:
  """{name: value} of run.py settings given as flags (`--name=value`, `--name` / `--noname` for booleans); none may
  be one that `tool` sets itself."""
  overrides = config.flag_values(args, f'{tool}: the flags after --')
  for name in overrides:
    if name in reserved:
      raise UserError(f'--{name} is set by {tool} itself')
  return overrides


def base_config(flagfile, flags, reserved, tool) -> config.Config:
  """The Config of run.py flagfile `flagfile` with the run.py `flags` over it (later flags win)."""
  if not pathlib.Path(flagfile).is_file():
    raise UserError(f'--base_flagfile={flagfile}: no such file')
  return config.config_from_flagfile(flagfile, **flag_overrides(flags, reserved, tool))


def parse_seeds(values) -> tuple[int, ...]:
  try:
    seeds = tuple(int(v) for v in values)
  except ValueError:
    seeds = ()
  if not seeds or min(seeds) < 0 or len(set(seeds)) != len(seeds):
    raise UserError(f'--seeds={",".join(values)}: expected distinct non-negative integers, e.g. --seeds=0,1,2')
  return seeds


def parse_pairs(specs, flag='pairs', known=True) -> tuple[tuple[str, str], ...]:
  """((a, b), ...) from --<flag> values 'a:b', each a method of mkdm_jax.distill.METHODS (with `known`; else
  checked by the caller, e.g. a merged study's method@variant names)."""
  pairs = []
  for spec in specs:
    pair = tuple(spec.split(':'))
    if len(pair) != 2 or pair[0] == pair[1] or not all(pair):
      raise UserError(f'--{flag}: {spec!r}: expected A:B with two different methods, e.g. mkdm:kd_single')
    unknown = [m for m in pair if known and m not in distill.METHODS]
    if unknown:
      raise UserError(f'--{flag}: {spec!r}: unknown method {unknown[0]!r}; choose from {tuple(distill.METHODS)}')
    pairs.append(pair)
  if not pairs or len(set(pairs)) != len(pairs):
    raise UserError(f'--{flag}={",".join(specs)}: give at least one pair, each once')
  return tuple(pairs)


@dataclasses.dataclass(frozen=True)
class Study:
  """cfg's methods for each of its student architectures and `seeds`: one run each in <root>/<arch>/seed_<s>,
  teachers shared in <root>/shared, records in `records`; `flagfile` and `flags` made cfg (for the report)."""
  cfg: config.Config
  seeds: tuple[int, ...]
  root: pathlib.Path
  records: pathlib.Path
  pairs: tuple[tuple[str, str], ...]
  metric: str
  flagfile: str
  flags: tuple[str, ...]
  seeds_random: bool = True  # paired tests resample seeds as well as questions (mkdm_jax.studies.summaries)
  allow_dirty: bool = False  # run from a modified work tree, storing its diff in each record


def study(flagfile, flags, *, seeds, root, records, pairs, metric, tool='study.py', seeds_random=True,
          allow_dirty=False) -> Study:
  """The study of run.py flagfile `flagfile` with `flags` over it (the flags given after `--`)."""
  if metric not in records_lib.METRICS:
    raise UserError(f'--metric={metric}: choose from {records_lib.METRICS}')
  cfg = base_config(flagfile, flags, STUDY_RESERVED, tool)
  if not cfg.students:
    raise UserError('--students is empty: the study compares student methods; give at least one architecture')
  return Study(cfg, tuple(seeds), pathlib.Path(root).absolute(), pathlib.Path(records).absolute(), tuple(pairs),
               metric, str(pathlib.Path(flagfile).absolute()), tuple(flags), seeds_random, allow_dirty)


def study_runs(s: Study) -> list[config.Config]:
  """One Config per student architecture and seed, in that order."""
  return [dataclasses.replace(s.cfg, students=(arch,), student_seed=seed, workdir=str(s.root / arch / f'seed_{seed}'),
                              shared_dir=str(s.root / 'shared'))
          for arch in s.cfg.students for seed in s.seeds]


@dataclasses.dataclass(frozen=True)
class FactorVariant:
  name: str
  flags: tuple[str, ...]  # its run.py flags, over the analysis' own
  study: Study


def factor_variants(flagfile, flags, variants, *, student, seeds, root, records, pairs, metric, seeds_random=True,
                    allow_dirty=False):
  """One Study per (name, run.py flags) of `variants`, of `student` only, in <root>/<name> with its records in
  records(index, name): one first-stage cache for all (<root>/stage1, unless the flags name another), the base
  flags, then --students, then the variant's flags."""
  cache = f'--stage1_cache={pathlib.Path(root).absolute() / "stage1"}'
  return [FactorVariant(name, tuple(variant_flags),
                        study(flagfile, [cache, *flags, f'--students={student}', *variant_flags], seeds=seeds,
                              root=pathlib.Path(root) / name, records=records(i, name), pairs=pairs, metric=metric,
                              tool='factors.py', seeds_random=seeds_random, allow_dirty=allow_dirty))
          for i, (name, variant_flags) in enumerate(variants)]


@dataclasses.dataclass(frozen=True)
class AblationVariant:
  flag: str
  value: str
  cfg: config.Config


def variant_dir(root, flag, value) -> pathlib.Path:
  return pathlib.Path(root) / f"{flag}={re.sub(r'[^A-Za-z0-9._+-]', '_', value)}"


def ablation_variants(flagfile, flags, sweeps, root) -> list[AblationVariant]:
  """One variant per value of each (flag, values) of `sweeps`: the base with that one setting changed, in
  <root>/<flag>=<value>. Teachers live in <root>/shared unless the setting changes them
  (mkdm_jax.distill.changes_teachers): then in the variant's own folder."""
  out = []
  for flag, values in sweeps:
    for value in values:
      workdir = variant_dir(root, flag, value)
      shared = workdir if distill.changes_teachers(flag) else pathlib.Path(root) / 'shared'
      cfg = base_config(flagfile, [*flags, f'--{flag}={value}'], ABLATION_RESERVED, 'ablate.py')
      out.append(AblationVariant(flag, value, dataclasses.replace(cfg, workdir=str(workdir), shared_dir=str(shared))))
  if len({v.cfg.workdir for v in out}) != len(out):
    raise UserError('two swept values map to the same variant folder; make them differ in letters or digits')
  return out
