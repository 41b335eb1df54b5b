"""Tests of the teacher-logit store: round trips, shards, staleness and incomplete writes."""
import numpy as np
import pytest

from mkdm_jax.data import LogitStore, StaleStoreError
from mkdm_jax.errors import UserError

MANIFEST = {"teacher": "sha-abc", "data": "sha-def", "max_length": 64, "layers": (1, 2)}


def logits(n, offset=0):
  return np.arange(offset * 2, (offset + n) * 2, dtype=np.float32).reshape(n, 2)


def test_round_trip_and_overwrite(tmp_path):
  store = LogitStore(tmp_path)
  assert not store.has("t0", MANIFEST)
  store.write("t0", logits(5), np.arange(5), MANIFEST)
  assert sorted(p.name for p in (tmp_path / "t0").iterdir()) == ["ids.npy", "logits.npy", "manifest.json"]
  assert store.has("t0", MANIFEST)
  got, ids = store.read("t0", dict(MANIFEST, layers=[1, 2]))
  np.testing.assert_array_equal(got, logits(5))
  assert got.dtype == np.float32 and ids.dtype == np.int64 and ids.tolist() == [0, 1, 2, 3, 4]
  store.write("t1", logits(3), [7, 2, 5], MANIFEST)  # Rows come back in the order written.
  assert store.read("t1", MANIFEST)[1].tolist() == [7, 2, 5]
  store.write("t0", logits(3), np.arange(3), MANIFEST)
  assert len(store.read("t0", MANIFEST)[0]) == 3
  assert sorted(p.name for p in tmp_path.iterdir()) == ["t0", "t1"]  # No temporary folders left.


def test_stale_manifest_is_rejected(tmp_path):
  store = LogitStore(tmp_path)
  store.write("t0", logits(2), np.arange(2), MANIFEST)
  other = dict(MANIFEST, data="sha-xyz")
  assert not store.has("t0", other)
  with pytest.raises(StaleStoreError, match="data: stored 'sha-def', expected 'sha-xyz'"):
    store.read("t0", other)
  assert issubclass(StaleStoreError, UserError)
  with pytest.raises(StaleStoreError, match="extra: stored None, expected 1"):
    store.read("t0", dict(MANIFEST, extra=1))


def test_shards_merge_on_read(tmp_path):
  store = LogitStore(tmp_path)
  store.write("t0", logits(4), np.arange(4), MANIFEST)  # An older single-shard copy is replaced.
  store.write("t0", logits(3, 3), np.arange(3, 6), MANIFEST, shard=1, num_shards=2)
  with pytest.raises(UserError, match="incomplete logits: 1 of 2 shards finished"):
    store.read("t0", MANIFEST)
  assert not store.has("t0", MANIFEST)
  store.write("t0", logits(3), np.arange(3), MANIFEST, shard=0, num_shards=2)
  got, ids = store.read("t0", MANIFEST)
  np.testing.assert_array_equal(got, logits(6))
  assert ids.tolist() == list(range(6))
  store.write("t0", logits(3), np.arange(3), MANIFEST, shard=0, num_shards=3)  # Another count: restart.
  assert not store.has("t0", MANIFEST)


def test_incomplete_write_is_detected(tmp_path):
  store = LogitStore(tmp_path)
  folder = tmp_path / "t0"
  folder.mkdir()
  np.save(folder / "logits.npy", logits(2))  # A write that stopped before its manifest.
  assert not store.has("t0", MANIFEST)
  with pytest.raises(UserError, match="no complete logits stored"):
    store.read("t0", MANIFEST)
  with pytest.raises(UserError, match="no complete logits stored"):
    store.read("missing", MANIFEST)


def test_duplicate_ids_across_shards(tmp_path):
  store = LogitStore(tmp_path)
  for shard in range(2):
    store.write("t0", logits(2), np.arange(2), MANIFEST, shard=shard, num_shards=2)
  with pytest.raises(UserError, match="duplicate row ids"):
    store.read("t0", MANIFEST)


def test_read_rows_by_row_key(tmp_path):
  store = LogitStore(tmp_path)
  keys = np.array([-9, 2**62, 5, -2**63, 0], dtype=np.int64)  # Row keys are any int64s.
  store.write("t0", logits(3), keys[:3], MANIFEST, shard=0, num_shards=2)
  store.write("t0", logits(2, 3), keys[3:], MANIFEST, shard=1, num_shards=2)
  got = store.read_rows("t0", MANIFEST, keys[[4, 0, 3]])  # Other stored rows are left out.
  np.testing.assert_array_equal(got, logits(5)[[4, 0, 3]])
  assert got.dtype == np.float32 and store.read_rows("t0", MANIFEST, []).shape == (0, 2)
  with pytest.raises(StaleStoreError, match=r"t0: no logits for 2 of 3 requested rows \(first row keys: \[7, 8\]\)"
                                            r".*rerun the logits stage"):
    store.read_rows("t0", MANIFEST, [7, 5, 8])
  with pytest.raises(StaleStoreError, match="data: stored 'sha-def'"):
    store.read_rows("t0", dict(MANIFEST, data="sha-xyz"), keys)
