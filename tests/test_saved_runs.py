"""Saved runs' recorded settings: staleness, new defaults, the up-front check and --overwrite, in process."""
import json

import pytest

from mkdm_jax import saved_runs
from mkdm_jax.errors import UserError


def test_claim_records_once_and_a_changed_setting_is_stale(tmp_path):
  run = tmp_path / 'run'
  saved_runs.claim_run(run, {'alpha': 0.5, 'buckets': [32]}, overwrite=False)
  assert json.loads((run / saved_runs.SETTINGS_FILE).read_text()) == {'alpha': 0.5, 'buckets': [32]}
  saved_runs.claim_run(run, {'alpha': 0.5, 'buckets': [32]}, overwrite=False)  # same settings: reused
  (run / 'kept').write_text('x')
  with pytest.raises(UserError, match=r"(?s)alpha: 0.5 -> 0.7.*--overwrite"):
    saved_runs.claim_run(run, {'alpha': 0.7, 'buckets': [32]}, overwrite=False)
  assert (run / 'kept').exists()  # nothing deleted without --overwrite
  saved_runs.claim_run(run, {'alpha': 0.7, 'buckets': [32]}, overwrite=True)
  assert not (run / 'kept').exists()
  assert saved_runs.recorded_settings(run) == {'alpha': 0.7, 'buckets': [32]}


def test_check_lists_every_stale_run_before_any_work(tmp_path):
  a, b, never = tmp_path / 'a', tmp_path / 'b', tmp_path / 'never'
  saved_runs.claim_run(a, {'x': 1}, overwrite=False)
  saved_runs.claim_run(b, {'x': 1}, overwrite=False)
  with pytest.raises(UserError) as error:
    saved_runs.check([(a, {'x': 2}), (b, {'x': 3}), (never, {'x': 4})], overwrite=False)
  assert f'{a}: x: 1 -> 2' in str(error.value) and f'{b}: x: 1 -> 3' in str(error.value)
  assert str(never) not in str(error.value)
  saved_runs.check([(a, {'x': 2}), (b, {'x': 1})], overwrite=True)
  assert not a.exists() and b.exists()


def test_a_new_setting_at_its_default_does_not_make_old_runs_stale(tmp_path):
  run = tmp_path / 'run'
  saved_runs.claim_run(run, {'alpha': 0.5}, overwrite=False)  # recorded before 'soft_loss' existed
  assert saved_runs.stale_changes(run, {'alpha': 0.5, 'soft_loss': 'kl'}) == []  # kl is the default
  assert saved_runs.stale_changes(run, {'alpha': 0.5, 'soft_loss': 'mse'}) == ["soft_loss: 'kl' -> 'mse'"]
  assert saved_runs.stale_changes(tmp_path / 'none', {'alpha': 1.0}) == []


def test_teacher_fingerprints_are_compared_only_when_given(tmp_path):
  run = tmp_path / 'run'
  saved_runs.claim_run(run, {'alpha': 0.5, 'teachers': ['abc']}, overwrite=False)
  assert saved_runs.stale_changes(run, {'alpha': 0.5}) == []  # the up-front check: fingerprints not known yet
  assert saved_runs.stale_changes(run, {'alpha': 0.5, 'teachers': ['def']}) == ["teachers: ['abc'] -> ['def']"]
