"""SIGTERM as a flag checked between steps: training saves a checkpoint and stops; inference stops."""
import contextlib
import signal


class Preempted(Exception):
  """SIGTERM arrived; training saved a checkpoint of `step` first (inference has nothing to save)."""

  def __init__(self, step=None):
    saved = f'saved a checkpoint at step {step}' if step is not None else 'stopped during inference'
    super().__init__(f'preempted by SIGTERM: {saved}; rerun the same command to resume')
    self.step = step


_SIGTERM = {'depth': 0, 'seen': False}


@contextlib.contextmanager
def sigterm_guard():
  """While active, SIGTERM only raises a flag (`preempted()`), checked between steps.

  Nested guards (an evaluation inside `fit`) share the outermost one; yields True when outermost.
  """
  outermost = _SIGTERM['depth'] == 0
  if outermost:
    _SIGTERM['seen'] = False
    previous = signal.signal(signal.SIGTERM, lambda *_: _SIGTERM.update(seen=True))
  _SIGTERM['depth'] += 1
  try:
    yield outermost
  finally:
    _SIGTERM['depth'] -= 1
    if outermost:
      signal.signal(signal.SIGTERM, previous)


def preempted():
  return _SIGTERM['seen']
