"""Work-directory lock, the user cache directory and the command-line error boundary of the scripts."""
import logging
import os
import socket
import sys
from pathlib import Path

from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)
LOCK_FILE = '.lock'
EXIT_USER_ERROR = 2
EXIT_PREEMPTED = 143  # 128 + SIGTERM, the conventional status of a job stopped by SIGTERM


def cache_dir() -> Path:
  """Converted checkpoints and built kernels: $MKDM_CACHE_DIR, default ~/.cache/mkdm_jax."""
  return Path(os.environ.get('MKDM_CACHE_DIR', '~/.cache/mkdm_jax')).expanduser()


def _pid_alive(pid):
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """One run per work directory: `<workdir>/.lock` holds the owner's host and pid.

  A lock left by a dead process on this host is taken over with a warning; a live owner (or one on
  another host, whose liveness cannot be checked) makes the new run refuse with a clear message.
  """

  def __init__(self, workdir):
    self.path = Path(workdir) / LOCK_FILE
    self.owner = f'{socket.gethostname()} {os.getpid()}'

  def __enter__(self):
    while True:
      try:
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
      except FileExistsError:
        self._check_existing()
        continue
      with os.fdopen(fd, 'w') as f:
        f.write(self.owner)
      return self

  def _check_existing(self):
    try:
      host, pid = self.path.read_text().split()
      pid = int(pid)
    except (FileNotFoundError, ValueError):
      host, pid = socket.gethostname(), -1  # vanished or half-written: treat as stale
    if host != socket.gethostname() or (pid > 0 and _pid_alive(pid)):
      raise UserError(f'work directory {self.path.parent} is in use by process {pid} on {host} '
                      f'(lock file {self.path}); wait for that run to finish, or delete the lock '
                      'file if that process is gone')
    log.warning('taking over the stale lock %s of dead process %s', self.path, pid)
    self.path.unlink(missing_ok=True)

  def __exit__(self, *exc):
    if self.path.exists() and self.path.read_text() == self.owner:
      self.path.unlink()


class QuietLibraries(logging.Filter):
  """Drops INFO chatter of Orbax (several lines per checkpoint); its warnings still show."""

  def filter(self, record):
    return record.levelno >= logging.WARNING or '/orbax/' not in record.pathname


def run_cli(main):
  """Runs `main()`; user errors and preemption end with one clear line and no traceback."""
  from absl import logging as absl_logging
  from mkdm_jax.train import Preempted  # deferred: importing jax here would precede XLA flag setup
  absl_logging.get_absl_handler().addFilter(QuietLibraries())
  try:
    main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(EXIT_USER_ERROR)
  except Preempted as e:
    print(str(e), file=sys.stderr)
    sys.exit(EXIT_PREEMPTED)
