"""One run per work directory: an OS file lock."""
import os
import socket
from pathlib import Path

import filelock

from mkdm_jax.errors import UserError

LOCK_FILE = '.lock'
OWNER_FILE = '.lock.owner'


class WorkdirLock:
  """One run per work directory: an OS file lock (filelock) on `<workdir>/.lock`.

  The OS releases the lock when its process dies, so a crashed or killed run never blocks the next one.
  The holder writes its host and pid to `<workdir>/.lock.owner`, which names it when another run is refused.
  """

  def __init__(self, workdir):
    self.path = Path(workdir) / LOCK_FILE
    self.owner_path = Path(workdir) / OWNER_FILE
    self._lock = filelock.FileLock(self.path)

  def __enter__(self):
    try:
      self._lock.acquire(blocking=False)
    except filelock.Timeout:
      raise UserError(f'work directory {self.path.parent} is in use by {self._owner()} (lock file '
                      f'{self.path}); wait for that run to finish') from None
    self.owner_path.write_text(f'{socket.gethostname()} {os.getpid()}')
    return self

  def _owner(self):
    try:
      host, pid = self.owner_path.read_text().split()
    except (FileNotFoundError, ValueError):  # the holder has not written it yet
      return 'another process'
    return f'process {pid} on {host}'

  def __exit__(self, *exc):
    self.owner_path.unlink(missing_ok=True)
    self._lock.release()
