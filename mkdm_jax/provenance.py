"""Where a result came from: commit, library versions, machine and date (recorded with every result)."""
import datetime
import importlib.metadata
import os
import platform
import subprocess
from pathlib import Path

PACKAGES = ('jax', 'jaxlib', 'flax', 'optax', 'orbax-checkpoint', 'transformers', 'tokenizers', 'numpy')


def cpu_model() -> str:
  """The CPU's model name as lscpu prints it (from /proc/cpuinfo), or 'unknown'."""
  try:
    lines = Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return platform.processor() or 'unknown'
  names = [line.split(':', 1)[1].strip() for line in lines if line.startswith('model name')]
  return names[0] if names else 'unknown'


REPO = Path(__file__).resolve().parents[1]


def git_commit(repo=REPO) -> str:
  """The checked-out commit of the repository (with '+dirty' when files differ), or 'unknown'."""
  try:
    commit = subprocess.run(['git', 'rev-parse', 'HEAD'], cwd=repo, capture_output=True, text=True,
                            timeout=10).stdout.strip()
    dirty = subprocess.run(['git', 'status', '--porcelain', '--untracked-files=no'], cwd=repo,
                           capture_output=True, text=True, timeout=10).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return 'unknown'
  return (commit + ('+dirty' if dirty else '')) if commit else 'unknown'


def git_diff(repo=REPO) -> str:
  """`git diff HEAD` of the repository's tracked files (what '+dirty' in git_commit stands for)."""
  return subprocess.run(['git', 'diff', 'HEAD'], cwd=repo, capture_output=True, text=True, timeout=30).stdout


def versions() -> dict:
  out = {'python': platform.python_version()}
  for name in PACKAGES:
    try:
      out[name] = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
      out[name] = None
  return out


def record() -> dict:
  """Commit, versions, CPU, accelerator and UTC date of this process."""
  import jax  # deferred: callers may configure XLA before jax is imported
  device = jax.devices()[0]
  return {'commit': git_commit(), 'versions': versions(), 'cpu_model': cpu_model(),
          'cpu_cores': len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
          'backend': jax.default_backend(), 'device_kind': device.device_kind,
          'device_count': jax.device_count(),
          'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')}
