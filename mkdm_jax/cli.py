"""The one preamble of every entry point (experiments/, benchmarks/).

  from mkdm_jax import cli  # first: sets the XLA CPU flags before anything imports jax
  ...
  if __name__ == '__main__':
    cli.main(main)

Importing this module calls `runtime.configure_xla_cpu()` (XLA reads its flags when jax creates its backends,
so the entry point imports this before jax); `main` runs an absl `main(argv)` so that user errors and
preemption end with one clear line and no traceback.
"""
import logging
import sys

from mkdm_jax import runtime
from mkdm_jax.errors import UserError

runtime.configure_xla_cpu()

EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, the conventional status of a job stopped by SIGTERM


class QuietLibraries(logging.Filter):
  """Drops INFO chatter of Orbax (several lines per checkpoint); its warnings still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def guarded(run):
  """Runs `run()`; user errors and preemption end with one clear line and no traceback."""
  from absl import logging as absl_logging
  from mkdm_jax.train import Preempted  # deferred: the flags above must be set before jax is imported
  absl_logging.get_absl_handler().addFilter(QuietLibraries())
  try:
    run()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)


def main(absl_main):
  """absl's `app.run(absl_main)` inside `guarded`."""
  from absl import app
  guarded(lambda: app.run(absl_main))
