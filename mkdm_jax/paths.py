"""Filesystem locations shared by every layer (no imports from the rest of the package)."""
import os
from pathlib import Path


def cache_dir() -> Path:
  """Converted checkpoints and built kernels: $MKDM_CACHE_DIR, default ~/.cache/mkdm_jax."""
  return Path(os.environ.get('MKDM_CACHE_DIR', '~/.cache/mkdm_jax')).expanduser()


def write_atomic(path: Path, write):
  """Calls write(tmp_path), then renames the result to `path`: readers (other processes of a multi-process run
  included) see the old file or the new one, never half of one; a failed write leaves no temporary file."""
  path = Path(path)
  tmp = path.with_name(f'.{path.name}.tmp-{os.getpid()}')  # one per process: concurrent writers never clash
  try:
    write(tmp)
    os.replace(tmp, path)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def write_text_atomic(path: Path, text: str):
  write_atomic(path, lambda tmp: tmp.write_text(text))
