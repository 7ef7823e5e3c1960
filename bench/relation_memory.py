"""Per-device memory and time of the stage-2 relation + contrastive loss: global view vs ring.

  XLA_FLAGS=--xla_force_host_platform_device_count=8 python bench/relation_memory.py \
      [--batches 1024 4096 16384 65536] [--dim 256] [--max_run_gib 12]

For each global batch B, jit-compiles value_and_grad of `itc + 2·kd + kdi + kdt` (fusion-CLS-like
student features, image and text teachers, D-dim rows batch-sharded over the "data" axis) twice:
with `losses` (global view: each device holds B/n × B matrices) and with `chunked_losses` (ring:
B/n × B/n blocks). Prints XLA's per-device temporary memory, the naive/chunked ratio, and the wall
time of one call after compilation. A variant whose temporaries on all devices together exceed
--max_run_gib is compiled but not run (the fake devices share this host's memory).
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from rebalance_jax import chunked_losses, losses, sharding  # noqa: E402

TEMPERATURE, RELATION_TEMPERATURE, LAM = 0.07, 0.5, 0.5
GIB = 2**30
MIB = 2**20


def stage2_loss(terms):
  """The relation + contrastive part of the stage-2 objective (METHOD.md §4.4 weights)."""

  def loss(image, text, fusion_cls, image_teacher, text_teacher, ids, tau, tau2, lam):
    itc = terms.itc_loss(image, text, ids, tau)
    kd = terms.structure_distillation([fusion_cls], image_teacher, text_teacher, lam, tau2)
    return itc + 2.0 * kd["kd"] + kd["kdi"] + kd["kdt"]

  return loss


class _Chunked:
  """`chunked_losses` with the mesh bound, shaped like the `losses` module."""

  def __init__(self, mesh):
    self.mesh = mesh

  def itc_loss(self, *args):
    return chunked_losses.itc_loss(*args, mesh=self.mesh)

  def structure_distillation(self, *args):
    return chunked_losses.structure_distillation(*args, mesh=self.mesh)


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
  # Gradients w.r.t. the student embeddings and the three scalars, as in training.
  grad_fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 6, 7, 8)))
  start = time.perf_counter()
  compiled = grad_fn.lower(*inputs).compile()
  return compiled, compiled.memory_analysis().temp_size_in_bytes, time.perf_counter() - start


def timed_call(compiled, inputs):
  start = time.perf_counter()
  jax.block_until_ready(compiled(*inputs))
  return time.perf_counter() - start


def measure(name, loss, inputs, num_devices, max_run_bytes):
  compiled, temp_bytes, compile_s = compile_loss(loss, inputs)
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
  parser.add_argument("--max_run_gib", type=float, default=12.0,
                      help="do not run a variant whose temporaries on all devices exceed this")
  args = parser.parse_args()

  mesh = sharding.make_mesh()
  num_devices = mesh.devices.size
  print(f"{num_devices} devices, D={args.dim}: value_and_grad of itc + 2·kd + kdi + kdt")
  rows = []
  for batch in args.batches:
    print(f"  B={batch}", flush=True)
    inputs = make_inputs(batch, args.dim, mesh)
    naive = measure("naive  ", stage2_loss(losses), inputs, num_devices, args.max_run_gib * GIB)
    chunked = measure("chunked", stage2_loss(_Chunked(mesh)), inputs, num_devices,
                      args.max_run_gib * GIB)
    rows.append((batch, naive, chunked))
    del inputs

  print(f"\n| global B | naive temp/device | chunked temp/device | ratio | naive call | "
        f"chunked call |\n|---:|---:|---:|---:|---:|---:|")
  for batch, (naive_bytes, naive_wall), (chunked_bytes, chunked_wall) in rows:
    print(f"| {batch} | {naive_bytes / MIB:.1f} MiB | {chunked_bytes / MIB:.1f} MiB | "
          f"{naive_bytes / chunked_bytes:.1f}x | {naive_wall} | {chunked_wall} |")


if __name__ == "__main__":
  main()
