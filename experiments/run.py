"""MKDM / TMKD pipeline from the command line: every field of `mkdm_jax.config.Config` is a flag.

  python experiments/run.py --flagfile=experiments/configs/quickstart.flags --workdir=runs/quickstart

`--export_teacher_logits=DIR` also writes the teachers' logits on every row as `scores:` teacher files.

The stages, methods and their checks live in the library (mkdm_jax/pipeline.py, mkdm_jax/distill.py);
this script parses flags, sets up the process (XLA CPU flags, allocator, multi-host) and calls
`pipeline.run`. `--helpfull` lists every flag.
"""
import contextlib
import dataclasses
import pathlib
import typing

from mkdm_jax import cli  # first: sets the XLA CPU flags before jax is imported

import jax
from absl import flags, logging

from mkdm_jax import config, pipeline, report
from mkdm_jax.allocator import keep_freed_memory
from mkdm_jax.errors import UserError
from mkdm_jax.workdir import WorkdirLock

FLAGS = flags.FLAGS
flags.DEFINE_enum('malloc', 'keep', ['keep', 'default'],
                  "Host allocator: 'keep' tells glibc to keep freed memory (no page faults on every step's "
                  "buffers: a MiniLM train step on a 2-core CPU ran 25% faster; the process keeps its peak "
                  "heap); 'default' leaves glibc as it is.")
flags.DEFINE_string('coordinator_address', None, 'With --distributed: HOST:PORT of process 0 (default: '
                    'auto-detected on TPU pods, SLURM and the other clusters jax.distributed knows).')
flags.DEFINE_integer('num_processes', None, 'With --distributed: how many processes join (default: auto-detected).')
flags.DEFINE_integer('process_id', None, "With --distributed: this process's index (default: auto-detected).")
flags.DEFINE_string('export_teacher_logits', None,
                    'After the stages, write every teacher\'s stored logits to DIR/teacher_<i>.tsv.gz: files that '
                    'later runs read as --teacher_checkpoints=scores:FILE, without the teachers\' weights.')


def define_config_flags():
  """One absl flag per Config field, with the field's default, help and choices."""
  for field in dataclasses.fields(config.Config):
    kind, help_text = config.config_types()[field.name], field.metadata['help']
    choices = field.metadata['choices']
    if choices:
      flags.DEFINE_enum(field.name, field.default, list(choices), help_text)
    elif typing.get_origin(kind) is tuple:
      flags.DEFINE_list(field.name, [str(v) for v in field.default], help_text)
    elif kind is bool:
      flags.DEFINE_boolean(field.name, field.default, help_text)
    elif kind is int:
      flags.DEFINE_integer(field.name, field.default, help_text)
    elif kind in (float, float | None):
      flags.DEFINE_float(field.name, field.default, help_text)
    else:
      flags.DEFINE_string(field.name, field.default, help_text)


define_config_flags()
flags.mark_flag_as_required('workdir')


def main(argv):
  if len(argv) > 1:
    raise UserError(f'unexpected arguments: {argv[1:]} (flags must start with --)')
  if FLAGS.malloc == 'keep':
    if keep_freed_memory():
      logging.info('host allocator: glibc keeps freed memory (--malloc=keep)')
    else:
      logging.warning('--malloc=keep needs glibc; using the default allocator')
  cfg = config.config_from_strings({f.name: FLAGS[f.name].value for f in dataclasses.fields(config.Config)})
  cluster = dict(coordinator_address=FLAGS.coordinator_address, num_processes=FLAGS.num_processes,
                 process_id=FLAGS.process_id)
  if not cfg.distributed and any(v is not None for v in cluster.values()):
    raise UserError(f'--{"/--".join(k for k, v in cluster.items() if v is not None)} apply to multi-process runs: '
                    'add --distributed')
  if cfg.distributed:  # before anything asks JAX for its devices (validate does)
    jax.distributed.initialize(**cluster)
  config.validate(cfg)  # before anything is created (pipeline.run checks again)
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  with WorkdirLock(workdir) if jax.process_index() == 0 else contextlib.nullcontext():
    results = pipeline.run(cfg, export_teacher_logits_to=FLAGS.export_teacher_logits)
  if results is not None:
    print(report.results_markdown(results))


if __name__ == '__main__':
  cli.main(main)
