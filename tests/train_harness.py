"""Subprocess harness for engine tests: trains a tiny BERT (or MPNet) on synthetic pairs and saves its params.

  python tests/train_harness.py --workdir=W --out=params.npz [--devices=8 --fsdp=2 --kill_after=7]

Runs in its own process so that tests can simulate devices (XLA_FLAGS must precede jax's import),
join several processes with jax.distributed, and kill it for real (SIGKILL) part-way through training.
"""
import argparse
import logging
import os
import signal
import time

parser = argparse.ArgumentParser()
parser.add_argument('--workdir', required=True)
parser.add_argument('--out', required=True)
parser.add_argument('--devices', type=int, default=1, help='simulated CPU devices per process')
parser.add_argument('--fsdp', type=int, default=1)
parser.add_argument('--steps', type=int, default=10)
parser.add_argument('--checkpoint_every', type=int, default=3)
parser.add_argument('--kill_after', type=int, default=0, help='SIGKILL self after this many batches')
parser.add_argument('--dropout', type=float, default=0.1)
parser.add_argument('--hidden', type=int, default=32)
parser.add_argument('--family', choices=('bert', 'mpnet'), default='bert')
parser.add_argument('--nan_row', type=int, default=-1, help='put NaN into this row\'s teacher logits')
parser.add_argument('--num_processes', type=int, default=1)
parser.add_argument('--process_id', type=int, default=0)
parser.add_argument('--port', type=int, default=0)
args = parser.parse_args()
logging.basicConfig(level=logging.INFO)
os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           f' --xla_force_host_platform_device_count={args.devices}')
from mkdm_jax import cli  # noqa: E402  (after XLA_FLAGS above; sets the XLA CPU flags before jax)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from mkdm_jax import losses, models, train  # noqa: E402
from mkdm_jax.train import loop  # noqa: E402
from synthetic import synthetic_data  # noqa: E402


def install_kill():
  # Counts the batches the loop takes from its prefetch thread (which builds them ahead).
  real_prefetch, seen = loop.prefetch, [0]

  def killing_batches(*a, **kw):
    for batch in real_prefetch(*a, **kw):
      if seen[0] == args.kill_after:
        time.sleep(1.0)  # let the asynchronous checkpoint writer get somewhere (or not)
        os.kill(os.getpid(), signal.SIGKILL)
      seen[0] += 1
      yield batch
  loop.prefetch = killing_batches


def main():
  if args.num_processes > 1:
    jax.distributed.initialize(coordinator_address=f'127.0.0.1:{args.port}',
                               num_processes=args.num_processes, process_id=args.process_id,
                               initialization_timeout=60)
  if args.kill_after:
    install_kill()
  family = models.BertConfig if args.family == 'bert' else models.MPNetConfig
  config = family(vocab_size=128, hidden_size=args.hidden, num_layers=2, num_attention_heads=2,
                  intermediate_size=64, max_position_embeddings=32 if args.family == 'bert' else 34,
                  hidden_dropout=args.dropout, attention_dropout=args.dropout)
  model = models.Classifier(config, num_classes=2, num_heads=2)
  data = synthetic_data()
  teacher_logits = np.random.default_rng(1).normal(size=(len(data), 2, 2)).astype(np.float32)
  if args.nan_row >= 0:
    teacher_logits[args.nan_row] = np.nan
  cfg = train.TrainConfig(batch_size=16, max_steps=args.steps, learning_rate=1e-3, warmup_ratio=0.2,
                          buckets=(8, 16), checkpoint_every=args.checkpoint_every, progress=False, seed=3)
  params = train.fit(args.workdir, model, data, cfg,
                     losses.LossConfig(teacher_mode='per_head', temperature=2.0),
                     mesh=train.make_mesh(args.fsdp), teacher_logits=teacher_logits)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): np.asarray(train.sharding.to_host(v))
          for path, v in jax.tree_util.tree_leaves_with_path(params)}
  if jax.process_index() == 0:
    np.savez(args.out, **flat)


cli.guarded(main)
