"""Orbax checkpointing: the last K full train states for resume, plus the best params by a dev metric.

Orbax writes each step into a temporary folder and renames it only once complete, so a step that
`all_steps()` lists was fully written. A finished step that still fails to restore (a truncated file,
disk trouble) is skipped with a warning naming it, and the previous one is used.
"""
import logging

import jax
import orbax.checkpoint as ocp

from mkdm_jax.errors import UserError

log = logging.getLogger(__name__)


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
