"""Task registry, data-folder resolution, `load_split` and TMKD stage-1 unlabelled pairs.

Tasks (label orders; f1/auc/map/mrr score class 1):
  wikiqa          local WikiQA-{train,dev,test}.tsv; 0 not_answer, 1 answer; groups = questions.
  squad           local squad/squad-v1.1-{train,dev}-pairs.tsv.gz: SQuAD v1.1 questions with every sentence of their
                  paragraph (label 1: the sentence holds an answer string, a weak label); as wikiqa.
  rte, qnli       local GLUE TSVs {train,dev,test}.tsv; 0 entailment, 1 not_entailment (GLUE/tfds order).
  tsv, jsonl      a user file given by `path` and column arguments; binary labels 0/1 (optional).
  tfds:glue/mnli  tfds; 0 entailment, 1 neutral, 2 contradiction; splits train, validation_matched,
                  validation_mismatched, test_matched, test_mismatched.
  tfds:glue/qnli, tfds:glue/rte   tfds; as rte/qnli; splits train, validation, test.
  tfds:snli       tfds; as mnli; splits train, validation, test (rows without a gold label dropped).
Split `dev` is accepted everywhere (tfds: `validation`, MNLI: `validation_matched`).
"""
import dataclasses
import hashlib
import os
from pathlib import Path
from typing import Callable

import numpy as np

from mkdm_jax.data import readers, tfds_source
from mkdm_jax.data.readers import Examples
from mkdm_jax.errors import UserError

WIKIQA_HINT = ("WikiQA is a manual download from Microsoft Research "
               "(https://www.microsoft.com/en-us/download/details.aspx?id=52419): unzip it and put "
               "WikiQA-{train,dev,test}.tsv in <data_dir>/wikiqa/.")
SQUAD_HINT = ("SQuAD v1.1 question-sentence pairs: put squad-v1.1-{train,dev}-pairs.tsv.gz (columns qid, question, "
              "sentence, label, title, paragraph) in <data_dir>/squad/.")
GLUE_HINT = ("GLUE TSVs come from https://gluebenchmark.com/tasks: put {train,dev,test}.tsv in "
             "<data_dir>/{task}/, or use the tfds:glue/{task} task.")


@dataclasses.dataclass(frozen=True)
class TaskSpec:
  """A task: label set, metrics and a loader `(spec, split, **options) -> Examples`."""
  name: str
  num_classes: int
  label_names: list[str]
  metrics: list[str]
  primary_metric: str
  loader: Callable[..., Examples]

  def metrics_for(self, examples: Examples) -> tuple[list[str], str]:
    """(metrics, primary metric) computable on `examples`: MAP/MRR need question groups."""
    if examples.groups is not None:
      return self.metrics, self.primary_metric
    names = [m for m in self.metrics if m not in ("map", "mrr")]
    return names, self.primary_metric if self.primary_metric in names else names[-1]


def resolve_data_dir(flag_value=None) -> Path:
  """The data folder: the flag, else $MKDM_DATA_DIR, else an existing ../shared/data beside the
  repository root or the working directory, else ~/.cache/mkdm_jax/data."""
  if flag_value:
    return Path(flag_value).expanduser()
  if os.environ.get("MKDM_DATA_DIR"):
    return Path(os.environ["MKDM_DATA_DIR"]).expanduser()
  repo_root = Path(__file__).resolve().parents[2]
  for candidate in (repo_root.parent / "shared" / "data", Path.cwd().parent / "shared" / "data"):
    if candidate.is_dir():
      return candidate.resolve()
  return Path.home() / ".cache" / "mkdm_jax" / "data"


def _find_file(task, split, data_dir, subdir, filename, hint) -> Path:
  root = resolve_data_dir(data_dir)
  tried = [root / subdir / filename, root / filename]
  for candidate in tried:
    if candidate.is_file():
      return candidate
  raise UserError(f"{task} {split}: file not found; tried {tried[0]} and {tried[1]}. {hint} "
                  "Choose the data folder with the data_dir option or $MKDM_DATA_DIR.")


def _no_columns(spec, columns):
  given = [k for k, v in columns.items() if v is not None]
  if given:
    raise UserError(f"task {spec.name}: {given} only apply to the tsv and jsonl tasks")


def _local_tsv(subdir, files, columns, hint, whole_groups=False):
  """Loader of a local TSV task with fixed header columns (text_a, text_b, label, group)."""
  def load(spec, split, *, data_dir, path, columns_given, skip_bad_rows, max_rows):
    _no_columns(spec, columns_given)
    if path is None:
      if split not in files:
        raise UserError(f"task {spec.name}: unknown split {split!r}; known: {sorted(files)}")
      path = _find_file(spec.name, split, data_dir, subdir, files[split], hint)
    text_a, text_b, label, group = columns
    return readers.read_tsv(path, text_a_col=text_a, text_b_col=text_b, label_col=label, group_col=group,
                            label_names=spec.label_names, optional_label=split == "test",
                            skip_bad_rows=skip_bad_rows, max_rows=max_rows, whole_groups=whole_groups)
  return load


def _user_file(read):
  """Loader of a user TSV/JSONL file (`path` and the column arguments)."""
  def load(spec, split, *, data_dir, path, columns_given, skip_bad_rows, max_rows):
    del split, data_dir
    if path is None:
      raise UserError(f"task {spec.name} needs a file path (path=...)")
    return read(path, **columns_given, label_names=spec.label_names, skip_bad_rows=skip_bad_rows,
                max_rows=max_rows, whole_groups=True)
  return load


def _tfds(name, splits, dev_split):
  """Loader of a tfds dataset; `path` overrides tfds's data folder."""
  def load(spec, split, *, data_dir, path, columns_given, skip_bad_rows, max_rows):
    del data_dir, skip_bad_rows
    _no_columns(spec, columns_given)
    split = dev_split if split == "dev" else split
    if split not in splits:
      raise UserError(f"task {spec.name}: unknown split {split!r}; known: {splits} (or dev)")
    return tfds_source.load_tfds(name, split, data_dir=path, max_rows=max_rows)
  return load


_BINARY = ["accuracy", "f1", "auc"]
_RANKING = ["accuracy", "f1", "auc", "map", "mrr"]
_NLI = ["entailment", "not_entailment"]
_NLI3 = ["entailment", "neutral", "contradiction"]
_GLUE_FILES = {"train": "train.tsv", "dev": "dev.tsv", "test": "test.tsv"}
_TFDS_SPLITS = ["train", "validation", "test"]

TASKS = {spec.name: spec for spec in [
    TaskSpec("wikiqa", 2, ["not_answer", "answer"], _RANKING, "map", _local_tsv(
        "wikiqa", {s: f"WikiQA-{s}.tsv" for s in ("train", "dev", "test")},
        ("Question", "Sentence", "Label", "QuestionID"), WIKIQA_HINT, whole_groups=True)),
    TaskSpec("squad", 2, ["not_answer", "answer"], _RANKING, "map", _local_tsv(
        "squad", {s: f"squad-v1.1-{s}-pairs.tsv.gz" for s in ("train", "dev")},
        ("question", "sentence", "label", "qid"), SQUAD_HINT, whole_groups=True)),
    TaskSpec("rte", 2, _NLI, _BINARY, "accuracy", _local_tsv(
        "rte", _GLUE_FILES, ("sentence1", "sentence2", "label", None), GLUE_HINT.replace("{task}", "rte"))),
    TaskSpec("qnli", 2, _NLI, _BINARY, "accuracy", _local_tsv(
        "qnli", _GLUE_FILES, ("question", "sentence", "label", None), GLUE_HINT.replace("{task}", "qnli"))),
    TaskSpec("tsv", 2, ["0", "1"], _RANKING, "map", _user_file(readers.read_tsv)),
    TaskSpec("jsonl", 2, ["0", "1"], _RANKING, "map", _user_file(readers.read_jsonl)),
    TaskSpec("tfds:glue/mnli", 3, _NLI3, ["accuracy"], "accuracy", _tfds(
        "glue/mnli", ["train", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched"],
        "validation_matched")),
    TaskSpec("tfds:glue/qnli", 2, _NLI, _BINARY, "accuracy", _tfds("glue/qnli", _TFDS_SPLITS, "validation")),
    TaskSpec("tfds:glue/rte", 2, _NLI, _BINARY, "accuracy", _tfds("glue/rte", _TFDS_SPLITS, "validation")),
    TaskSpec("tfds:snli", 3, _NLI3, ["accuracy"], "accuracy", _tfds("snli", _TFDS_SPLITS, "validation")),
]}


def get_task(name: str) -> TaskSpec:
  """The task called `name`."""
  if name not in TASKS:
    raise UserError(f"unknown task {name!r}; known tasks: {', '.join(TASKS)}")
  return TASKS[name]


def load_split(task, split, data_dir=None, *, path=None, text_a_col=None, text_b_col=None, label_col=None,
               group_col=None, skip_bad_rows=False, max_rows=None) -> Examples:
  """Loads one split of `task` (a name or TaskSpec).

  `path` replaces the task's file (tsv/jsonl: required; tfds: tfds's data folder). `max_rows` keeps the
  first rows; for grouped data (wikiqa, or tsv/jsonl with group_col) it is rounded up to finish the last
  question. The column arguments apply to tsv/jsonl only (tsv: header names, or indices for no header);
  without `label_col` labels are -1, without `group_col` groups are None.
  """
  spec = get_task(task) if isinstance(task, str) else task
  columns = dict(text_a_col=text_a_col, text_b_col=text_b_col, label_col=label_col, group_col=group_col)
  return spec.loader(spec, split, data_dir=data_dir, path=path, columns_given=columns,
                     skip_bad_rows=skip_bad_rows, max_rows=max_rows)


def make_unlabelled_pairs(examples: Examples, num_extra: int, seed: int) -> Examples:
  """TMKD stage-1 data: `examples` with labels dropped (-1) plus `num_extra` new pairs.

  A new pair joins a question (uniform over groups; rows when there are no groups) with a second text of
  a row from another group, never repeating an existing pair. Deterministic given `seed`. Existing rows
  keep their ids; a new row gets the question's group and the id `row_key(question, text_b, raw group)`.
  """
  n = len(examples)
  groups = examples.groups if examples.groups is not None else np.arange(n)
  firsts = np.unique(groups, return_index=True)[1]
  seen = set(zip(examples.text_a, examples.text_b))
  rng = np.random.default_rng(seed)
  new = []
  budget = 20 * num_extra + 1000
  while len(new) < num_extra and budget > 0:
    draws = 2 * (num_extra - len(new)) + 16
    budget -= draws
    for q, j in zip(firsts[rng.integers(len(firsts), size=draws)], rng.integers(n, size=draws)):
      pair = (examples.text_a[q], examples.text_b[j])
      if groups[q] != groups[j] and pair not in seen and len(new) < num_extra:
        seen.add(pair)
        new.append((q, j))
  if len(new) < num_extra:
    raise UserError(f"{examples.source}: found only {len(new)} of {num_extra} new question-passage pairs; "
                    "ask for fewer")
  q_rows = np.array([q for q, _ in new], dtype=np.int64)
  q_groups = [None] * num_extra if examples.groups is None else [examples.group_names[g] for g in groups[q_rows]]
  new_ids = [readers.row_key(examples.text_a[q], examples.text_b[j], g) for (q, j), g in zip(new, q_groups)]
  ids = np.concatenate([examples.ids, np.array(new_ids, dtype=np.int64)])
  readers.check_unique_ids(ids, examples.source)
  return dataclasses.replace(
      examples,
      text_a=examples.text_a + [examples.text_a[q] for q, _ in new],
      text_b=examples.text_b + [examples.text_b[j] for _, j in new],
      labels=np.full(n + num_extra, -1, dtype=np.int32),
      groups=None if examples.groups is None else np.concatenate([examples.groups, examples.groups[q_rows]]),
      ids=ids,
      fingerprint=hashlib.sha256(f"{examples.fingerprint}:unlabelled:{num_extra}:{seed}".encode()).hexdigest())


def add_unlabelled_rows(unlabelled: Examples, extra: list[Examples]) -> Examples:
  """TMKD stage-1 data `unlabelled` plus the rows of other sets (labels dropped), each row key once.

  Rows already present (same row key: e.g. the train rows when all of a task's train split is added) are
  kept once. Groups are dropped (stage 1 never uses them)."""
  seen = set(unlabelled.ids.tolist())
  text_a, text_b, ids = list(unlabelled.text_a), list(unlabelled.text_b), [unlabelled.ids]
  parts = [unlabelled.fingerprint]
  for examples in extra:
    new = [i for i, key in enumerate(examples.ids.tolist()) if key not in seen]
    seen.update(examples.ids[new].tolist())
    text_a += [examples.text_a[i] for i in new]
    text_b += [examples.text_b[i] for i in new]
    ids.append(examples.ids[new])
    parts.append(examples.fingerprint)
  return dataclasses.replace(
      unlabelled, text_a=text_a, text_b=text_b, labels=np.full(len(text_a), -1, dtype=np.int32), groups=None,
      group_names=None, ids=np.concatenate(ids),
      source=' + '.join([unlabelled.source] + [e.source for e in extra]),
      fingerprint=hashlib.sha256(':'.join(parts).encode()).hexdigest())
