"""On-disk store of teacher logits, keyed by name and guarded by a manifest.

Layout: `<root>/<name>/{logits.npy, ids.npy, manifest.json}` for one shard, or
`<root>/<name>/shard-<i>-of-<n>/{...}` for per-process shards (merged on read). Each shard is written in a
temporary folder (manifest last) and renamed into place, so a folder without manifest.json is incomplete.
The manifest (e.g. teacher checkpoint fingerprint, data fingerprint, max_length) must equal the expected one.
Rows are identified by their ids, `Examples.ids` (`row_key`s), so any tokenization can read them back.
"""
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from mkdm_jax.errors import UserError


class StaleStoreError(UserError):
  """Stored logits were made from another teacher, data or setting."""


def _normalise(manifest: dict) -> dict:
  """The manifest as it reads back from JSON (tuples become lists, keys strings)."""
  return json.loads(json.dumps(manifest, sort_keys=True))


class LogitStore:
  """Teacher logits under `root`."""

  def __init__(self, root):
    self.root = Path(root)

  def _shard_dir(self, name, shard, num_shards) -> Path:
    base = self.root / name
    return base if num_shards == 1 else base / f"shard-{shard:05d}-of-{num_shards:05d}"

  def write(self, name: str, logits: np.ndarray, ids: np.ndarray, manifest: dict, *, shard: int = 0,
            num_shards: int = 1):
    """Writes one shard (this process's rows) of `name`, replacing an older copy."""
    logits, ids = np.asarray(logits, dtype=np.float32), np.asarray(ids, dtype=np.int64)
    if len(logits) != len(ids):
      raise ValueError(f"{len(logits)} logit rows but {len(ids)} ids")
    if not 0 <= shard < num_shards:
      raise ValueError(f"shard {shard} out of range for {num_shards} shards")
    target = self._shard_dir(name, shard, num_shards)
    target.parent.mkdir(parents=True, exist_ok=True)
    if num_shards > 1:
      self._remove_other_layouts(name, num_shards)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.tmp-"))
    np.save(tmp / "logits.npy", logits)
    np.save(tmp / "ids.npy", ids)
    record = dict(manifest=_normalise(manifest), shard=shard, num_shards=num_shards, rows=len(ids))
    (tmp / "manifest.json").write_text(json.dumps(record, indent=1, sort_keys=True))
    if target.exists():
      old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old-"))
      os.replace(target, old / "data")
      shutil.rmtree(old)
    os.replace(tmp, target)

  def _remove_other_layouts(self, name, num_shards):
    """Removes a single-shard copy or shards of another count (other processes may race: tolerated)."""
    base = self.root / name
    for file in ("manifest.json", "logits.npy", "ids.npy"):  # Manifest first: the copy turns incomplete.
      (base / file).unlink(missing_ok=True)
    for folder in base.glob("shard-*-of-*"):
      if int(folder.name.rsplit("-", 1)[1]) != num_shards:
        shutil.rmtree(folder, ignore_errors=True)

  def _shards(self, name) -> list[Path]:
    """Shard folders of `name`; raises UserError when missing or incomplete."""
    base = self.root / name
    if (base / "manifest.json").is_file():
      return [base]
    found = sorted(base.glob("shard-*-of-*")) if base.is_dir() else []
    if not found:
      raise UserError(f"{base}: no complete logits stored (missing, or the write did not finish: "
                      "delete the folder and recompute)")
    num_shards = int(found[0].name.rsplit("-", 1)[1])
    expected = [self._shard_dir(name, i, num_shards) for i in range(num_shards)]
    finished = sum((p / "manifest.json").is_file() for p in expected)
    if finished != num_shards:
      raise UserError(f"{base}: incomplete logits: {finished} of {num_shards} shards finished; "
                      "delete the folder and recompute")
    return expected

  def _check(self, name, expected_manifest) -> list[Path]:
    """The shard folders of `name`; StaleStoreError if a stored manifest differs from the expected one."""
    expected = _normalise(expected_manifest)
    folders = self._shards(name)
    for folder in folders:
      stored = json.loads((folder / "manifest.json").read_text())["manifest"]
      if stored != expected:
        diff = sorted(k for k in set(stored) | set(expected) if stored.get(k) != expected.get(k))
        details = "; ".join(f"{k}: stored {stored.get(k)!r}, expected {expected.get(k)!r}" for k in diff)
        raise StaleStoreError(f"{folder}: stored logits are stale ({details}); recompute them")
    return folders

  def read(self, name: str, expected_manifest: dict) -> tuple[np.ndarray, np.ndarray]:
    """(logits, ids) of `name` in the order written (shards in shard order); StaleStoreError if stale."""
    folders = self._check(name, expected_manifest)
    logits = np.concatenate([np.load(f / "logits.npy") for f in folders])
    ids = np.concatenate([np.load(f / "ids.npy") for f in folders])
    if len(np.unique(ids)) != len(ids):
      raise UserError(f"{self.root / name}: duplicate row ids; delete the folder and recompute")
    return logits, ids

  def read_rows(self, name: str, expected_manifest: dict, ids) -> np.ndarray:
    """[len(ids), C] logits of `name` for the rows with these ids, in this order (other stored rows are
    ignored); StaleStoreError if stale or if some rows are not stored."""
    logits, stored = self.read(name, expected_manifest)
    position = {key: i for i, key in enumerate(stored.tolist())}
    wanted = np.asarray(ids, dtype=np.int64).tolist()
    missing = [key for key in wanted if key not in position]
    if missing:
      raise StaleStoreError(f"{self.root / name}: no logits for {len(missing)} of {len(wanted)} requested rows "
                            f"(first row keys: {missing[:5]}); the store was made for other rows: rerun the "
                            "logits stage")
    return logits[[position[key] for key in wanted]]

  def has_shard(self, name: str, expected_manifest: dict, shard: int, num_shards: int) -> bool:
    """Whether shard `shard` of `num_shards` is complete with exactly this manifest (resume by shard)."""
    path = self._shard_dir(name, shard, num_shards) / "manifest.json"
    return path.is_file() and json.loads(path.read_text())["manifest"] == _normalise(expected_manifest)

  def read_shards(self, name: str, expected_manifest: dict) -> list[tuple[np.ndarray, np.ndarray]]:
    """(logits, ids) of each shard of `name` in shard order, memory-mapped (nothing is read until indexed);
    StaleStoreError if stale, UserError if incomplete."""
    return [(np.load(f / "logits.npy", mmap_mode="r"), np.load(f / "ids.npy", mmap_mode="r"))
            for f in self._check(name, expected_manifest)]

  def has(self, name: str, expected_manifest: dict) -> bool:
    """Whether complete logits with exactly this manifest are stored."""
    try:
      self._check(name, expected_manifest)
    except UserError:
      return False
    return True
