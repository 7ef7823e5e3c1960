"""Device mesh, sharding rules, and host-to-global array assembly.

The mesh has a 'data' axis and optionally an 'fsdp' axis, both classic auto-sharded (GSPMD) axes.
The batch is sharded over every mesh axis. Parameters are placed by regex rules over their
'/'-joined paths (first match wins): "replicate", or "fsdp" (split the largest dimension divisible
by the fsdp axis, for parameters of at least `min_size` elements); a parameter that matches no rule
is an error. Optimizer-state leaves follow the parameter they belong to. Every function works
unchanged with one process or many (each process passes its own slice of the global batch).
"""

import dataclasses

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from rebalance_jax.infra import tree_rules
from rebalance_jax.infra.errors import InputError

DATA_AXIS = "data"
FSDP_AXIS = "fsdp"
PLACEMENTS = ("replicate", "fsdp")


def make_mesh(devices=None, fsdp: int = 1) -> Mesh:
  """A ('data',) mesh over all devices, or ('data', 'fsdp') with an fsdp axis of size `fsdp`."""
  devices = np.asarray(jax.devices() if devices is None else devices)
  if fsdp < 1 or devices.size % fsdp:
    raise InputError(f"config.mesh.fsdp={fsdp} must divide the device count ({devices.size})")
  if fsdp == 1:
    return Mesh(devices.reshape(-1), (DATA_AXIS,), axis_types=(jax.sharding.AxisType.Auto,))
  return Mesh(devices.reshape(-1, fsdp), (DATA_AXIS, FSDP_AXIS),
              axis_types=(jax.sharding.AxisType.Auto,) * 2)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over every mesh axis."""
  return NamedSharding(mesh, P(mesh.axis_names))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


@dataclasses.dataclass(frozen=True)
class ParamRules:
  """Regex rules placing parameters on the mesh (config.sharding.rules / .fsdp_min_size)."""
  rules: tuple[tuple[str, str], ...]
  min_size: int = 2**14

  def __post_init__(self):
    for pattern, placement in self.rules:
      if placement not in PLACEMENTS:
        raise InputError(f"config.sharding.rules: {pattern!r} -> {placement!r} is not one of "
                         f"{PLACEMENTS}")

  def spec(self, path: str, shape: tuple[int, ...], mesh: Mesh) -> P:
    placement = tree_rules.first_match(path, self.rules)
    if placement is None:
      raise InputError(f"parameter {path} matches no rule in config.sharding.rules")
    fsdp = mesh.shape.get(FSDP_AXIS, 1)
    if placement == "replicate" or fsdp == 1 or int(np.prod(shape)) < self.min_size:
      return P()
    divisible = [d for d, n in enumerate(shape) if n % fsdp == 0]
    if not divisible:
      return P()
    axis = max(divisible, key=lambda d: shape[d])
    return P(*[FSDP_AXIS if d == axis else None for d in range(len(shape))])

  def param_shardings(self, params, mesh: Mesh):
    spec = lambda path, x: self.spec(tree_rules.path_string(path), x.shape, mesh)
    return jax.tree_util.tree_map_with_path(lambda p, x: NamedSharding(mesh, spec(p, x)), params)

  def state_shardings(self, state, mesh: Mesh):
    """Shardings of a train state {step, params, opt_state}: optimizer leaves follow the
    parameter whose path ends theirs (Adam's moments), everything else is replicated."""
    params = self.param_shardings(state["params"], mesh)
    by_path = {tree_rules.path_string(p): (s, leaf.shape) for (p, s), leaf in zip(
        jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(state["params"]))}

    def follow(path, leaf):
      keys = tree_rules.path_string(path).split("/")
      for start in range(len(keys)):
        match = by_path.get("/".join(keys[start:]))
        if match and match[1] == leaf.shape:
          return match[0]
      return replicated(mesh)

    return {**jax.tree.map(lambda _: replicated(mesh), {k: v for k, v in state.items()
                                                         if k not in ("params", "opt_state")}),
            "params": params,
            "opt_state": jax.tree_util.tree_map_with_path(follow, state["opt_state"])}


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
