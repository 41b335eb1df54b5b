"""Saved runs and the settings they were trained with: a rerun under other settings is stale.

Each training run records, before it trains, the settings it depends on (`settings.json`; which settings a
run depends on is `mkdm_jax.distill.SETTINGS`). A rerun whose settings differ stops before any work and names
the changed settings, unless --overwrite deletes and retrains exactly the stale runs.
"""
import dataclasses
import json
import logging
import pathlib
import shutil

from mkdm_jax import config, distill, paths
from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)
SETTINGS_FILE = 'settings.json'


def recorded_settings(directory):
  path = pathlib.Path(directory) / SETTINGS_FILE
  return json.loads(path.read_text()) if path.exists() else None


def with_new_defaults(recorded: dict, current: dict) -> dict:
  """`recorded` settings plus, for each setting in `current` that they lack (one added to the pipeline after
  they were recorded), its default value: a new option left at its default does not make old runs stale."""
  defaults = json.loads(json.dumps({f.name: f.default for f in dataclasses.fields(config.Config)}))
  return {**{k: defaults[k] for k in current if k in defaults and k not in recorded}, **recorded}


def stale_changes(directory, settings):
  """The changed settings of a saved run (empty when it matches or was never started)."""
  recorded = recorded_settings(directory)
  if recorded is None:
    return []
  recorded = with_new_defaults(recorded, settings)
  if 'teachers' not in settings:  # up-front check: the teachers' fingerprints are compared at fit time
    recorded = {k: v for k, v in recorded.items() if k != 'teachers'}
  return distill.changed_settings(recorded, settings)


def _stale_message(stale):
  lines = [f'  {directory}: ' + '; '.join(changes) for directory, changes in stale]
  return ('saved runs were trained with other settings, so their results would be stale:\n' + '\n'.join(lines)
          + '\nUse a new --workdir (and --shared_dir), put the old values back, or pass --overwrite to delete '
          'and retrain exactly these runs.')


def check(planned, overwrite):
  """Before any work: each planned (directory, settings) run that is saved must have been trained with its
  settings; with `overwrite`, stale runs are deleted (to be retrained), else UserError lists them all."""
  stale = [(d, changes) for d, settings in planned for changes in [stale_changes(d, settings)] if changes]
  if stale and not overwrite:
    raise UserError(_stale_message(stale))
  for directory, changes in stale:
    log.warning('--overwrite: deleting %s (changed: %s)', directory, '; '.join(changes))
    shutil.rmtree(directory)


def claim_run(directory, settings, overwrite):
  """Records a run's settings before it trains; a run saved under other settings is stale (see `check`)."""
  check([(directory, settings)], overwrite)
  directory.mkdir(parents=True, exist_ok=True)
  if recorded_settings(directory) is None:
    # Atomic: the other processes of a multi-process run check (read) it while this one writes it.
    paths.write_text_atomic(directory / SETTINGS_FILE, json.dumps(settings, indent=1))
