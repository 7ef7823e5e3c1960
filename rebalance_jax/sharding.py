"""Device mesh, batch sharding and host-to-global array assembly.

The batch axis is sharded over the mesh's 'data' axis; parameters are replicated. Every function
works unchanged with one process or many (each process passes its own slice of the global batch).
"""

from collections.abc import Callable

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from rebalance_jax.errors import InputError

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
  """1-D data-parallel mesh over all devices, with classic auto-sharded (GSPMD) axes."""
  devices = jax.devices() if devices is None else devices
  return Mesh(np.asarray(devices).reshape(len(devices)), (DATA_AXIS,),
              axis_types=(jax.sharding.AxisType.Auto,))


def batch_sharding(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  """Raises an InputError naming `field` unless batch_size splits evenly over devices and hosts."""
  devices, processes = mesh.devices.size, jax.process_count()
  if batch_size <= 0 or batch_size % devices or batch_size % processes:
    raise InputError(f"{field}={batch_size} must be a positive multiple of the device count "
                     f"({devices} devices over {processes} processes)")


def process_slice(global_size: int) -> slice:
  """This process's contiguous rows of a global batch of `global_size` rows."""
  per_process = global_size // jax.process_count()
  start = jax.process_index() * per_process
  return slice(start, start + per_process)


def to_global(local_batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
  """Assembles each process's rows into global batch-sharded arrays."""
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in local_batch.items()}


def map_in_batches(fn: Callable, num_rows: int, get_rows: Callable, batch_size: int,
                   mesh: Mesh):
  """Applies jitted `fn(**rows)` to rows 0..num_rows-1 in global batches of `batch_size`.

  `get_rows(indices)` returns the host arrays of the given rows; each process fetches only its own
  slice of each batch. The last batch is padded by repeating the last row, so every process runs
  the same number of steps; padded rows are dropped. Returns fn's output pytree with every leaf
  concatenated over rows, as numpy on every process.
  """
  check_batch_size(batch_size, mesh, "config.eval.batch_size")
  outputs = []
  for start in range(0, num_rows, batch_size):
    indices = np.minimum(np.arange(start, start + batch_size), num_rows - 1)
    out = fn(**to_global(get_rows(indices[process_slice(batch_size)]), mesh))
    outputs.append(multihost_utils.process_allgather(out, tiled=True))
  return jax.tree.map(lambda *rows: np.concatenate(rows)[:num_rows], *outputs)
