"""Teachers: one class per kind, built once from the run's teacher specs (--teacher_checkpoints).

  CHECKPOINT           `FineTuned`: a checkpoint name/folder (or 'random') fine-tuned here as a cross-encoder
  biencoder:CHECKPOINT `BiEncoder`: the zero-shot cosine of its mean-pooled embeddings, calibrated on dev
  overlap:count|idf    `WordOverlap`: the question's words found in the passage, calibrated on dev
  scores:FILE          `ImportedScores`: per-row scores or logits from a file (teachers/scores.py)

Each gives per-row logits for the logit store and says what it can do (`trains`, `runs_online`,
`scores_corpus`, `calibrated`); the pipeline asks and never branches on a kind.
"""
import functools

from mkdm_jax import distill
from mkdm_jax.errors import UserError
from mkdm_jax.teachers.base import Teacher
from mkdm_jax.teachers.biencoder import BiEncoder
from mkdm_jax.teachers.finetuned import FineTuned
from mkdm_jax.teachers.overlap import WEIGHTS as OVERLAP_WEIGHTS
from mkdm_jax.teachers.overlap import WordOverlap
from mkdm_jax.teachers.scores import ImportedScores

__all__ = ['Teacher', 'FineTuned', 'BiEncoder', 'WordOverlap', 'ImportedScores', 'parse_spec', 'build']


def parse_spec(spec: str) -> tuple[str, str]:
  """(kind, source) of a teacher spec: 'biencoder:NAME', 'scores:FILE', 'overlap:count|idf', else a checkpoint
  to fine-tune."""
  kind, sep, source = spec.partition(':')
  if sep and kind in ('biencoder', 'scores'):
    if not source:
      raise UserError(f'teacher {spec!r}: give a checkpoint or file after {kind}:')
    return kind, source
  if kind == 'overlap':
    if source not in OVERLAP_WEIGHTS:
      raise UserError(f'teacher {spec!r}: expected overlap:count or overlap:idf')
    return kind, source
  return 'checkpoint', spec


def build(cfg, shared_dir, options, tokenizer_dir_of) -> tuple[Teacher, ...]:
  """The run's teachers, teacher i in `<shared_dir>/teachers/teacher_<i>` with its own settings of the per-teacher
  lists. options: the models' `factory.ModelOptions`; tokenizer_dir_of(checkpoint) -> its tokenizer folder."""
  out = []
  for i in range(cfg.num_teachers):
    kind, source = parse_spec(distill.per_teacher(cfg.teacher_checkpoints, i))
    directory = shared_dir / 'teachers' / f'teacher_{i}'
    if kind == 'checkpoint':
      out.append(FineTuned(i, source, directory, functools.partial(tokenizer_dir_of, source),
                           seed=distill.per_teacher(cfg.teacher_seeds, i, default=i),
                           learning_rate=distill.per_teacher(cfg.teacher_learning_rates, i),
                           batch_size=distill.per_teacher(cfg.teacher_batch_sizes, i)))
    elif kind == 'biencoder':
      out.append(BiEncoder(i, source, directory, functools.partial(tokenizer_dir_of, source), options=options))
    elif kind == 'overlap':
      out.append(WordOverlap(i, source, directory))
    else:
      out.append(ImportedScores(i, source, directory))
  return tuple(out)
