"""Runs one Config: experiments/run.py in its own process, its output in <workdir>/run.log.

A process per run keeps each run's memory, compiled programs and device state apart (the sweep's own process
starts JAX only for its reports, after its runs), and run.py sets up the process (allocator, XLA flags,
work-directory lock) as it does for a run started by hand. The package is installed editable from the
repository, whose experiments/run.py this is.
"""
import json
import pathlib
import subprocess
import sys
import time

from mkdm_jax import config
from mkdm_jax.errors import UserError

RUN_PY = pathlib.Path(__file__).resolve().parents[2] / 'experiments' / 'run.py'


def command(cfg: config.Config) -> list[str]:
  """run.py's command line for `cfg`: each setting that differs from its default, as a flag."""
  return [sys.executable, str(RUN_PY), *config.flag_lines(cfg)]


def run_config(cfg: config.Config, label: str) -> dict:
  """Runs `cfg` to the end; its results.json, or a UserError quoting the log's last line."""
  workdir = pathlib.Path(cfg.workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / 'run.log'
  print(f'{label}: running (log {log_path})', flush=True)
  t0 = time.perf_counter()
  with open(log_path, 'w') as log:
    returncode = subprocess.run(command(cfg), stdout=log, stderr=subprocess.STDOUT).returncode
  if returncode:
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    raise UserError(f'{label} failed (exit {returncode}): {lines[-1] if lines else "no output"} '
                    f'(full log: {log_path})')
  print(f'{label}: done in {time.perf_counter() - t0:.0f} s', flush=True)
  return json.loads((workdir / 'results.json').read_text())
