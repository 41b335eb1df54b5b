"""paths.write_atomic: a reader sees the old file or the new one; a failed write changes nothing."""
import os

import pytest

from mkdm_jax import paths


def test_write_text_atomic_replaces_the_file_whole(tmp_path):
  target = tmp_path / 'settings.json'
  target.write_text('old')
  paths.write_text_atomic(target, 'new')
  assert target.read_text() == 'new' and os.listdir(tmp_path) == ['settings.json']


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
  target = tmp_path / 'DONE.json'
  target.write_text('old')

  def half_write(tmp):
    tmp.write_text('ha')
    raise OSError('disk full')

  with pytest.raises(OSError, match='disk full'):
    paths.write_atomic(target, half_write)
  assert target.read_text() == 'old' and os.listdir(tmp_path) == ['DONE.json']


def test_each_process_writes_its_own_temporary(tmp_path):
  """Two processes writing the same file never share a temporary (a shared one could be renamed away)."""
  seen = []
  paths.write_atomic(tmp_path / 'model.json', lambda tmp: (seen.append(tmp.name), tmp.write_text('{}')))
  assert seen == [f'.model.json.tmp-{os.getpid()}']
