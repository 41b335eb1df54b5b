"""Filesystem locations shared by every layer (no imports from the rest of the package)."""
import os
from pathlib import Path


def cache_dir() -> Path:
  """Converted checkpoints and built kernels: $MKDM_CACHE_DIR, default ~/.cache/mkdm_jax."""
  return Path(os.environ.get('MKDM_CACHE_DIR', '~/.cache/mkdm_jax')).expanduser()
