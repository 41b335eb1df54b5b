"""Orbax checkpointing: the last K full train states for resume, plus the best params by a dev metric; and a
finished run's outputs: its params (`save_params`, `load_params`) and its summary (DONE.json).

Orbax writes each step into a temporary folder and renames it only once complete, so a step that
`all_steps()` lists was fully written. A finished step that still fails to restore (a truncated file,
disk trouble) is skipped with a warning naming it, and the previous one is used.
"""
import json
import logging
from pathlib import Path

import jax
import orbax.checkpoint as ocp

from mkdm_jax import paths
from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)
DONE_FILE = 'DONE.json'


def save_params(path, params):
  """Atomically save a params tree (Orbax writes to a temporary folder and renames)."""
  with ocp.StandardCheckpointer() as ckptr:
    ckptr.save(Path(path).absolute(), params, force=True)


def load_params(path, abstract=None):
  """Load a params tree saved by `save_params` onto `abstract`'s shardings, by default onto this process's
  first device (not the saving run's devices, which another process of a multi-process run cannot address).

  In a multi-process run every process must call this together (Orbax synchronises them).
  """
  path = Path(path).absolute()
  if not path.exists():
    raise UserError(f'no saved parameters at {path}')
  with ocp.StandardCheckpointer() as ckptr:
    if abstract is None:
      device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
      abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
                              ckptr.metadata(path).item_metadata.tree)
    return ckptr.restore(path, abstract)


def is_complete(workdir):
  return (Path(workdir) / DONE_FILE).exists()


def write_summary(workdir, summary):
  """Marks `workdir` complete with its DONE.json `summary` (written to a temporary file, then renamed)."""
  paths.write_text_atomic(Path(workdir) / DONE_FILE, json.dumps(summary, indent=1))


def read_summary(workdir):
  """The DONE.json summary of a finished `fit`: steps, best_score, last_eval."""
  return json.loads((Path(workdir) / DONE_FILE).read_text())


def load_final(workdir):
  """Params and summary of a finished `fit` in `workdir`."""
  return load_params(Path(workdir) / 'final'), read_summary(workdir)


def _shapes_by_name(tree):
  return {'/'.join(str(getattr(k, 'key', k)) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def shape_mismatches(saved_params, expected_params):
  """Lines naming every parameter whose saved shape differs from the model's (or is missing)."""
  saved, expected = _shapes_by_name(saved_params), _shapes_by_name(expected_params)
  lines = [f'  {name}: checkpoint {saved.get(name, "missing")}, model {expected.get(name, "missing")}'
           for name in sorted(set(saved) | set(expected)) if saved.get(name) != expected.get(name)]
  return lines


def abstract_like(tree, shardings):
  """Shape/dtype/sharding skeleton used as the restore target (places arrays on the current mesh)."""
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


class Checkpointer:
  """`<dir>/ckpt`: last `keep` train states + JSON metadata; `<dir>/best`: params of the best eval."""

  def __init__(self, directory, keep=2, best_mode='max', async_save=True):
    options = dict(create=True, cleanup_tmp_directories=True, enable_async_checkpointing=async_save)
    self.states = ocp.CheckpointManager(
        directory / 'ckpt', options=ocp.CheckpointManagerOptions(max_to_keep=keep, **options),
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'meta': ocp.JsonCheckpointHandler()})
    self.best = ocp.CheckpointManager(
        directory / 'best', options=ocp.CheckpointManagerOptions(
            max_to_keep=1, best_fn=lambda m: m['score'], best_mode=best_mode, **options),
        item_handlers={'params': ocp.StandardCheckpointHandler()})

  def save(self, step, state, meta, force=False):
    self.states.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta)), force=force)

  def save_best(self, step, params, score):
    self.best.save(step, args=ocp.args.Composite(params=ocp.args.StandardSave(params)),
                   metrics={'score': float(score)}, force=True)

  def restore_latest(self, abstract_state):
    """(state, meta) of the newest checkpoint that restores, or None when there is none at all.

    A checkpoint of a different model (parameter shapes differ from `abstract_state.params`) is an
    error naming the parameters, not a reason to start over: the flags changed under the same work dir.
    """
    for step in sorted(self.states.all_steps(), reverse=True):
      try:
        saved = self.states.item_metadata(step)['state'].tree['params']
      except Exception:  # noqa: BLE001 - unreadable metadata: the restore below reports it
        saved = None
      if saved is not None and (mismatches := shape_mismatches(saved, abstract_state.params)):
        raise UserError(f'checkpoint {self.states.directory / str(step)} does not match the model '
                        f'(flags changed under the same work directory?):\n' + '\n'.join(mismatches[:20])
                        + '\nUse a new --workdir, or restore the original flags.')
      try:
        restored = self.states.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
        return restored['state'], restored['meta']
      except Exception as e:  # noqa: BLE001 - any failure means this step is unusable
        log.warning('checkpoint %s is unreadable (%s: %s); falling back to the previous one',
                    self.states.directory / str(step), type(e).__name__, str(e)[:200])
    if self.states.all_steps():
      raise UserError(f'none of the checkpoints in {self.states.directory} could be restored (see the '
                      'warnings above); move that folder away to start this run over')
    return None

  def restore_best(self, abstract_params):
    step = self.best.best_step()
    if step is None:
      return None
    return self.best.restore(step, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(abstract_params)))['params']

  def wait(self):
    self.states.wait_until_finished()
    self.best.wait_until_finished()

  def close(self):
    self.states.close()
    self.best.close()
