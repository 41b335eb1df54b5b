"""Running experiments/run.py as a subprocess per variant or seed (shared by ablate.py, study.py and factors.py)."""
import json
import pathlib
import subprocess
import sys
import time

from mkdm_jax.errors import UserError

RUN_PY = pathlib.Path(__file__).with_name('run.py')


def parse_extra_flags(args, reserved, tool):
  """run.py flags given after `--`: each must be --name[=value] and not one that `tool` sets itself."""
  for arg in args:
    name = arg[2:].split('=')[0] if arg.startswith('--') else None
    if name is None:
      raise UserError(f'unexpected argument {arg!r}: run.py flags after -- must start with --')
    if name in reserved:
      raise UserError(f'{arg}: --{name} is set by {tool} itself')
  return list(args)


def record_path(records_dir, student, seed):
  """Where study.py keeps the record of one student architecture and seed (factors.py reads them there)."""
  return pathlib.Path(records_dir) / f'{student}_seed{seed}.json'


def command(base, extra, *flags):
  """run.py's command line: the base flagfile, the extra flags, then `flags` (which win)."""
  return [sys.executable, str(RUN_PY), f'--flagfile={base}', *extra, *flags]


def check_command(cmd, label):
  """Lets run.py's flag parser reject a bad flag name or value before anything is trained."""
  proc = subprocess.run(cmd + ['--only_check_args'], capture_output=True, text=True)
  if proc.returncode:
    message = next((line for line in proc.stderr.splitlines() if line.strip()), f'exit {proc.returncode}')
    raise UserError(f'{label}: run.py rejects its flags: {message}')


def run_logged(cmd, workdir, label):
  """Runs run.py with its output in <workdir>/run.log; returns results.json, or a UserError quoting the
  log's last line."""
  workdir.mkdir(parents=True, exist_ok=True)
  log_path = workdir / 'run.log'
  print(f'{label}: running (log {log_path})', flush=True)
  t0 = time.perf_counter()
  with open(log_path, 'w') as log:
    returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
  if returncode:
    lines = [line for line in log_path.read_text().splitlines() if line.strip()]
    raise UserError(f'{label} failed (exit {returncode}): {lines[-1] if lines else "no output"} '
                    f'(full log: {log_path})')
  print(f'{label}: done in {time.perf_counter() - t0:.0f} s', flush=True)
  return json.loads((workdir / 'results.json').read_text())
