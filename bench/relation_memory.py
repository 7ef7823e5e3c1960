"""Per-device memory and time of the stage-2 relation + contrastive loss: global view vs ring.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/relation_memory.py \
      [--batches 1024 4096 16384 65536] [--dim 256] [--max_tile 2048] [--max_run_gib 12]

For each global batch B, jit-compiles value_and_grad of `itc + 2·kd + kdi + kdt` (fusion-CLS-like
student features, image and text teachers, D-dim rows batch-sharded over the "data" axis) twice:
with `losses` (global view: each device holds B/n × B matrices) and with `chunked_losses` (ring of
B/n × min(B/n, max_tile) tiles). Prints XLA's per-device temporary memory, the naive/chunked
ratio, and the wall time of one call after compilation.

The fake devices share this host's memory, so a variant whose temporaries on all devices together
exceed --max_run_gib is compiled but not run. The naive loss is compiled up to --naive_max_batch;
beyond, its memory is extrapolated ∝ B² from the largest compiled batch. Needs the package
installed (pip install -e .).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from rebalance_jax import losses
from rebalance_jax.infra import sharding
from rebalance_jax.training import chunked_losses

TEMPERATURE, RELATION_TEMPERATURE, LAM = 0.07, 0.5, 0.5
GIB = 2**30
MIB = 2**20


def stage2_loss(terms):
  """The relation + contrastive part of the stage-2 objective (docs/method.md §4.4 weights)."""

  def loss(image, text, fusion_cls, image_teacher, text_teacher, ids, tau, tau2, lam):
    itc = terms.itc_loss(image, text, ids, tau)
    kd = terms.structure_distillation([fusion_cls], image_teacher, text_teacher, lam, tau2)
    return itc + 2.0 * kd["kd"] + kd["kdi"] + kd["kdt"]

  return loss


class _Chunked:
  """`chunked_losses` with the mesh and tile size bound, shaped like the `losses` module."""

  def __init__(self, mesh, tile_size):
    self.mesh, self.tile_size = mesh, tile_size

  def itc_loss(self, *args):
    return chunked_losses.itc_loss(*args, mesh=self.mesh, tile_size=self.tile_size)

  def structure_distillation(self, *args):
    return chunked_losses.structure_distillation(*args, mesh=self.mesh,
                                                 tile_size=self.tile_size)


def make_inputs(batch, dim, mesh):
  """Random normalized rows, batch-sharded, generated on the devices; ids repeat 5 times."""
  rows = sharding.batch_sharding(mesh)

  @jax.jit
  def generate(key):
    keys = jax.random.split(key, 5)
    features = [losses.l2_normalize(jax.random.normal(k, (batch, dim))) for k in keys]
    features = [jax.lax.with_sharding_constraint(f, rows) for f in features]
    ids = jax.lax.with_sharding_constraint(jnp.arange(batch) // 5, rows)
    return (*features, ids)

  return (*generate(jax.random.key(0)), jnp.float32(TEMPERATURE),
          jnp.float32(RELATION_TEMPERATURE), jnp.float32(LAM))


def compile_loss(loss, inputs):
  """Compiles value_and_grad w.r.t. the student embeddings and the three scalars, as in training."""
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 6, 7, 8)))
  return grad_fn.lower(*inputs).compile()


def timed_call(compiled, inputs):
  start = time.perf_counter()
  jax.block_until_ready(compiled(*inputs))
  return time.perf_counter() - start


def measure(name, loss, inputs, num_devices, max_run_bytes):
  """(per-device temp bytes, call time or why it was not run)."""
  start = time.perf_counter()
  compiled = compile_loss(loss, inputs)
  temp_bytes = compiled.memory_analysis().temp_size_in_bytes
  compile_s = time.perf_counter() - start
  if temp_bytes * num_devices > max_run_bytes:
    wall = f"skipped ({temp_bytes * num_devices / GIB:.1f} GiB)"
  else:
    wall = f"{timed_call(compiled, inputs):.2f} s"
  print(f"    {name}: temp {temp_bytes / MIB:.1f} MiB/device, compile {compile_s:.1f} s, "
        f"call {wall}", flush=True)
  return temp_bytes, wall


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batches", type=int, nargs="+", default=[1024, 4096, 16384, 65536])
  parser.add_argument("--dim", type=int, default=256)
  parser.add_argument("--max_tile", type=int, default=2048,
                      help="chunked: at most this many columns per tile")
  parser.add_argument("--max_run_gib", type=float, default=12.0,
                      help="do not run a variant whose temporaries on all devices exceed this")
  parser.add_argument("--naive_max_batch", type=int, default=16384,
                      help="extrapolate the naive memory beyond this batch instead of compiling")
  args = parser.parse_args()

  mesh = sharding.make_mesh()
  num_devices = mesh.devices.size
  max_run_bytes = args.max_run_gib * GIB
  print(f"{num_devices} devices, D={args.dim}: value_and_grad of itc + 2·kd + kdi + kdt")
  rows, compiled_naive = [], None
  for batch in args.batches:
    tile = min(batch // num_devices, args.max_tile)
    print(f"  B={batch}, chunked tiles {batch // num_devices}×{tile}", flush=True)
    inputs = make_inputs(batch, args.dim, mesh)
    if batch <= args.naive_max_batch or compiled_naive is None:
      naive = measure("naive  ", stage2_loss(losses), inputs, num_devices, max_run_bytes)
      compiled_naive = (batch, naive[0])
    else:
      known_batch, known_bytes = compiled_naive
      estimate = known_bytes * (batch / known_batch)**2
      naive = (estimate, f"skipped (est. {estimate * num_devices / GIB:.0f} GiB)")
      print(f"    naive  : temp ~{estimate / MIB:.0f} MiB/device (extrapolated), not compiled")
    chunked = measure("chunked", stage2_loss(_Chunked(mesh, tile)), inputs, num_devices,
                      max_run_bytes)
    rows.append((batch, tile, naive, chunked))
    del inputs

  print("\n| global B | tile | naive temp/device | chunked temp/device | ratio | naive call | "
        "chunked call |\n|---:|---:|---:|---:|---:|---:|---:|")
  for batch, tile, (naive_bytes, naive_wall), (chunked_bytes, chunked_wall) in rows:
    approx = "~" if batch > args.naive_max_batch else ""
    print(f"| {batch} | {batch // num_devices}×{tile} | {approx}{naive_bytes / MIB:.1f} MiB | "
          f"{chunked_bytes / MIB:.1f} MiB | {approx}{naive_bytes / chunked_bytes:.1f}x | "
          f"{naive_wall} | {chunked_wall} |")


if __name__ == "__main__":
  main()
