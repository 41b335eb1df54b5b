"""Device mesh and sharding rules (jit + NamedSharding; pmap is in maintenance mode in current JAX).

Mesh axes: 'data' (batch split) and 'fsdp' (parameters split; the batch is split over it too).
"""
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

BATCH_AXES = ('data', 'fsdp')
# Parameters smaller than this stay replicated: splitting them saves little memory and adds collectives.
MIN_SHARDED_SIZE = 2**16


def local_mesh():
  """A ('data', 'fsdp') mesh over this process's devices only: for work each process does on its own (e.g.
  scoring its shards of a corpus), with no collective between processes."""
  devices = np.asarray(jax.local_devices())
  return Mesh(devices.reshape(devices.size, 1), ('data', 'fsdp'))


def is_local(mesh) -> bool:
  return all(d.process_index == jax.process_index() for d in mesh.devices.flat)


def make_mesh(fsdp=1):
  """A ('data', 'fsdp') mesh over all devices of all processes.

  Built with jax.sharding.Mesh (Auto axis types): jax.make_mesh defaults to Explicit axes in this
  JAX, which breaks plain jit code on embedding gathers.
  """
  devices = np.asarray(jax.devices())
  if devices.size % fsdp:
    raise ValueError(f'--fsdp={fsdp} does not divide the {devices.size} devices')
  return Mesh(devices.reshape(devices.size // fsdp, fsdp), ('data', 'fsdp'))


def param_spec(shape, fsdp_size):
  """Split the largest dimension divisible by the fsdp size of a large array; replicate the rest."""
  if fsdp_size == 1 or int(np.prod(shape)) < MIN_SHARDED_SIZE:
    return P()
  for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
    if shape[dim] % fsdp_size == 0:
      spec = [None] * len(shape)
      spec[dim] = 'fsdp'
      return P(*spec)
  return P()


def state_shardings(mesh, abstract_state):
  """NamedShardings for a pytree of (abstract) arrays by the rule above."""
  fsdp_size = mesh.shape['fsdp']
  return jax.tree.map(lambda x: NamedSharding(mesh, param_spec(x.shape, fsdp_size)), abstract_state)


def batch_sharding(mesh):
  """Leading (batch) axis split over every device."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh):
  return NamedSharding(mesh, P())


def put_batch(mesh, local_batch):
  """Host-local numpy batch slice -> global jax.Arrays split over the batch axes (multi-process safe)."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def to_host(x):
  """Global (possibly multi-process) array -> full numpy array on every process (an array on this process's
  devices only is copied without a collective)."""
  if jax.process_count() == 1 or x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))
