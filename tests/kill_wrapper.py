"""Runs experiments/run.py and interrupts it for real at a chosen point (reliability tests).

  python tests/kill_wrapper.py POINT COUNT experiments/run.py --flags...

POINT is where the COUNT-th event sends the signal to this very process:
  batch        SIGKILL when training/inference takes its COUNT-th batch of the run
  logit_write  SIGKILL right after the COUNT-th teacher-logit store write
  ckpt_save    SIGKILL right after the COUNT-th checkpoint save was started (the asynchronous
               write is in flight: a kill during a checkpoint write)
  sigterm      SIGTERM at the COUNT-th batch (preemption: the run must save and exit 143)
"""
import os
import runpy
import signal
import sys

point, count, script, *rest = sys.argv[1:]
count = int(count)
seen = [0]


def hit(sig=signal.SIGKILL):
  seen[0] += 1
  if seen[0] == count:
    os.kill(os.getpid(), sig)


from mkdm_jax.data import LogitStore  # noqa: E402
from mkdm_jax.train import checkpoint, inference, loop  # noqa: E402

if point in ('batch', 'sigterm'):
  # Counted where the loop and inference take them from their prefetch thread, not where that thread builds
  # them (ahead): the COUNT-th batch is the one the run is about to step on.
  real_prefetch = loop.prefetch

  def counted_batches(*a, **kw):
    for batch in real_prefetch(*a, **kw):
      hit(signal.SIGTERM if point == 'sigterm' else signal.SIGKILL)
      yield batch
  loop.prefetch = inference.prefetch = counted_batches
elif point == 'logit_write':
  real_write = LogitStore.write
  LogitStore.write = lambda self, *a, **kw: (real_write(self, *a, **kw), hit())[0]
elif point == 'ckpt_save':
  real_save = checkpoint.Checkpointer.save
  checkpoint.Checkpointer.save = lambda self, *a, **kw: (real_save(self, *a, **kw), hit())[0]
else:
  raise SystemExit(f'unknown point {point}')

sys.argv = [script, *rest]
runpy.run_path(script, run_name='__main__')
