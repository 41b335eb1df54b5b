"""What every stage reads: the run `Context` (config, folders, task, rows, teachers, mesh) and the data loading
behind it."""
import dataclasses
import logging
import pathlib
from typing import Any

import jax
import numpy as np

from mkdm_jax import config, distill, train
from mkdm_jax import data as data_lib
from mkdm_jax import metrics as metrics_lib
from mkdm_jax import teachers as teachers_lib
from mkdm_jax.errors import UserError
from mkdm_jax.models import load_tokenizer

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Context:
  """What every stage reads: the config, folders, task, data, teachers and device mesh."""
  cfg: config.Config
  workdir: pathlib.Path
  shared: pathlib.Path
  task: data_lib.TaskSpec
  buckets: tuple[int, ...]
  examples: dict
  teachers: tuple[teachers_lib.Teacher, ...]
  mesh: Any
  metrics: list
  primary: str
  extra_eval: dict = dataclasses.field(default_factory=dict)  # --extra_eval name ('squad_dev') -> (task, Examples)
  encodings: dict = dataclasses.field(default_factory=dict)  # (tokenizer dir, dataset) -> Encoded; the corpus index

  def encoded(self, tokenizer_dir, dataset):
    """`dataset` encoded with a model's tokenizer (once per tokenizer; cached on disk too); with
    --unlabelled_corpus, 'unlabelled' is the corpus's `CorpusRows` (streamed)."""
    key = (str(tokenizer_dir), dataset)
    if key not in self.encodings and dataset == 'unlabelled' and self.cfg.unlabelled_corpus:
      self.encodings[key] = corpus_rows(self.cfg, load_tokenizer(tokenizer_dir))
    if key not in self.encodings:
      rows = self.examples[dataset] if dataset in self.examples else self.extra_eval[dataset][1]
      self.encodings[key] = data_lib.encode(load_tokenizer(tokenizer_dir), rows, self.cfg.max_length,
                                            cache_dir=self.shared / 'cache' / 'tokens')
    return self.encodings[key]

  def teacher_corpus(self, teacher):
    """The --unlabelled_corpus as `teacher` reads it: encoded with its tokenizer, or only its row keys
    (`CorpusIndex`) for a teacher that reads no tokens (imported scores)."""
    if teacher.tokenizer_dir is not None:
      return self.encoded(teacher.tokenizer_dir, 'unlabelled')
    if 'corpus index' not in self.encodings:
      self.encodings['corpus index'] = data_lib.corpus.CorpusIndex(self.cfg.unlabelled_corpus)
    return self.encodings['corpus index']

  def student_dir(self, arch, method):
    return self.workdir / 'students' / f'{arch}_{method}'

  def student_tokenizer_dir(self, arch):
    return config.tokenizer_dir_of(self.cfg, distill.student_checkpoint(self.cfg.student_checkpoint, arch))


def corpus_rows(cfg: config.Config, tokenizer):
  """The --unlabelled_corpus encoded with `tokenizer` (each process encodes its share of missing shards)."""
  index, count = jax.process_index(), jax.process_count()
  shards = data_lib.corpus.read_manifest(cfg.unlabelled_corpus)['shards']
  data_lib.corpus.encode_shards(cfg.unlabelled_corpus, tokenizer, cfg.max_length, range(index, shards, count),
                                progress=cfg.progress)
  sync_processes('corpus encoded')
  if index == 0:
    data_lib.corpus.finish_encoding(cfg.unlabelled_corpus, tokenizer, cfg.max_length)
  sync_processes('corpus encoding finished')
  return data_lib.corpus.CorpusRows(cfg.unlabelled_corpus, tokenizer, cfg.max_length)


def sync_processes(name):
  """Waits for every process to get here (nothing to wait for in a single process)."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def subsample_negatives(examples, per_positive, seed):
  """All positives plus `per_positive` times as many negatives, sampled with `seed`, in file order."""
  positives = np.flatnonzero(examples.labels == 1)
  negatives = np.flatnonzero(examples.labels == 0)
  rng = np.random.default_rng(seed)
  keep = rng.choice(negatives, min(len(negatives), per_positive * len(positives)), replace=False)
  return examples.select(np.sort(np.concatenate([positives, keep])))


def load_split_rows(cfg: config.Config, split, max_rows=0):
  """One split (a file path for tsv/jsonl tasks) read with the run's data settings."""
  is_file = cfg.task in ('tsv', 'jsonl')
  return data_lib.load_split(cfg.task, None if is_file else split, cfg.data_dir, path=split if is_file else None,
                             skip_bad_rows=cfg.skip_bad_rows, max_rows=max_rows or None, text_a_col=cfg.text_a_col,
                             text_b_col=cfg.text_b_col, label_col=cfg.label_col, group_col=cfg.group_col)


def load_train_rows(cfg: config.Config):
  """The training split: its first --max_train_rows rows, in file order or --train_order_seed's order."""
  if cfg.train_order_seed < 0:
    return load_split_rows(cfg, cfg.train_split, cfg.max_train_rows)
  train = load_split_rows(cfg, cfg.train_split)
  groups = [None] * len(train) if train.groups is None else train.groups.tolist()
  return train.select(data_lib.corpus.seeded_order(groups, cfg.train_order_seed, cfg.max_train_rows or None))


def load_unlabelled_split(cfg: config.Config, spec):
  """The rows of one --unlabelled_splits entry TASK:SPLIT (the task's own files; labels are dropped later)."""
  task, _, split = spec.rpartition(':')
  if not task or not split:
    raise UserError(f'--unlabelled_splits: {spec!r}: expected TASK:SPLIT, e.g. qnli:dev')
  if task not in data_lib.TASKS or task in ('tsv', 'jsonl'):
    raise UserError(f'--unlabelled_splits: {spec!r}: unknown task {task!r}; choose a registered task with its '
                    f'own files: {sorted(t for t in data_lib.TASKS if t not in ("tsv", "jsonl"))}')
  return data_lib.load_split(task, split, cfg.data_dir, skip_bad_rows=cfg.skip_bad_rows)


def load_extra_eval(cfg: config.Config):
  """{TASK_SPLIT: (task, rows)} of --extra_eval's TASK:SPLIT[:MAX_ROWS] entries (students are evaluated on them
  too)."""
  out = {}
  for spec in cfg.extra_eval:
    task, split, max_rows = config.parse_extra_eval(spec)
    out[f'{task}_{split}'] = task, data_lib.load_split(task, split, cfg.data_dir, skip_bad_rows=cfg.skip_bad_rows,
                                                       max_rows=max_rows or None)
  return out


def load_examples(cfg: config.Config, task):
  """The train, unlabelled, dev and eval rows."""
  load = lambda split, max_rows: load_split_rows(cfg, split, max_rows)
  examples = {'train': load_train_rows(cfg), 'eval': load(cfg.eval_split, cfg.max_eval_rows)}
  if cfg.dev_split != 'none':
    examples['dev'] = load(cfg.dev_split, cfg.max_eval_rows)
  for name, flag in (('eval', 'eval_split'), ('dev', 'dev_split')):
    if name in examples and not (examples[name].labels >= 0).any():
      raise UserError(f'--{flag}={getattr(cfg, flag)}: {examples[name].source} has no labels, so nothing can be '
                      f'{"evaluated" if name == "eval" else "selected"} on it; choose a labelled split (score '
                      'unlabelled pairs with experiments/evaluate.py --predictions on a trained model)')
  if cfg.train_questions == 'with_both':
    train = examples['train']
    if train.groups is None:
      raise UserError(f'--train_questions=with_both needs question groups, and {train.source} has none')
    examples['train'] = train.select(np.flatnonzero(np.isin(
        train.groups, metrics_lib.evaluated_groups(train.labels, train.groups))))
  if cfg.negatives_per_positive:
    examples['train'] = subsample_negatives(examples['train'], cfg.negatives_per_positive, cfg.data_seed)
  if distill.where(cfg.methods, lambda m: m.pretrain) and not cfg.unlabelled_corpus:  # a corpus is streamed
    examples['unlabelled'] = data_lib.add_unlabelled_rows(
        data_lib.make_unlabelled_pairs(examples['train'], cfg.unlabelled_extra, cfg.data_seed),
        [load_unlabelled_split(cfg, spec) for spec in cfg.unlabelled_splits])
  for name, e in examples.items():
    log.info('%s: %d rows (%d labelled) from %s', name, len(e), int((e.labels >= 0).sum()), e.source)
  return examples


def make_context(cfg: config.Config) -> Context:
  """The validated config's Context: folders (the work directory is created), task, rows, teachers, mesh."""
  config.validate(cfg)
  workdir = pathlib.Path(cfg.workdir).absolute()
  shared = pathlib.Path(cfg.shared_dir).absolute() if cfg.shared_dir else workdir
  workdir.mkdir(parents=True, exist_ok=True)
  train.enable_compilation_cache(cfg.compilation_cache_dir or shared / 'cache' / 'xla')
  task = data_lib.get_task(cfg.task)
  examples = load_examples(cfg, task)
  metric_names, primary = task.metrics_for(examples['eval'])
  return Context(cfg=cfg, workdir=workdir, shared=shared, task=task, buckets=config.buckets_of(cfg), examples=examples,
                 teachers=build_teachers(cfg, shared), mesh=train.make_mesh(cfg.fsdp), metrics=metric_names,
                 primary=primary, extra_eval=load_extra_eval(cfg))


def build_teachers(cfg: config.Config, shared: pathlib.Path):
  """The run's teacher objects (mkdm_jax.teachers), each reading its own checkpoint's tokenizer."""
  return teachers_lib.build(cfg, shared, config.model_options(cfg), lambda source: config.tokenizer_dir_of(cfg, source))
