"""Reproduces the CPU abort of executables with collectives loaded from the persistent cache.

One jitted shard_map program on 8 fake CPU devices holds two collectives that do not depend on each
other: an all-to-all, and a ring of ppermutes inside a fori_loop. Run it in a fresh process per try:

  JAX_COMPILATION_CACHE_DIR=/tmp/abort_cache_repro python bench/cpu_cache_collectives_repro.py

The first run compiles and writes the cache; later runs load the executable from it. Freshly
compiled, every device runs the collectives in one order; loaded from the cache, a device can reach
the all-to-all while the others are in the ppermute loop, and the in-process rendezvous never
completes (XLA aborts the process after --xla_cpu_collective_call_terminate_timeout_seconds).
`--tries N` repeats the call N times in one process (each call is a new chance of a bad order).
"""

import argparse
import os
import sys
import time

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P  # noqa: E402


def build(steps, unroll=False):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  ring = [(i, (i + 1) % 8) for i in range(8)]

  def local(x, y):
    # Collectives at the top level and inside while loops, with no data dependence between them:
    # a freshly compiled executable still runs them one at a time per device (they share the
    # communicator resource), a deserialized one does not.
    outs = []
    for k in range(4):
      xk = jnp.tanh((x * (k + 1)) @ x.T) @ x  # similar work before either collective, so
      # which one a device reaches first varies from device to device
      outs.append(jax.lax.all_to_all(xk, "data", 0, 0, tiled=True).sum(keepdims=True))

      def body(_, carry, k=k):
        acc, blk = carry
        blk = jax.lax.ppermute(blk, "data", ring)
        return acc + jnp.tanh(blk * (k + 1)).sum(), blk

      yk = jnp.tanh((y * (k + 1)) @ y.T) @ y
      carry = (jnp.zeros_like(y[0, 0]), yk)
      if unroll:  # the same ppermutes at the top level: a deserialized executable is fine
        for i in range(steps):
          carry = body(i, carry)
      else:
        carry = jax.lax.fori_loop(0, steps, body, carry)
      acc, _ = carry
      outs.append(acc[None])
    return tuple(outs[0::2]), tuple(outs[1::2])

  fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")),
                     out_specs=P("data"))
  shard = NamedSharding(mesh, P("data"))
  return jax.jit(fn, in_shardings=(shard, shard), out_shardings=shard), shard


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--tries", type=int, default=20)
  parser.add_argument("--steps", type=int, default=8)
  parser.add_argument("--unroll", action="store_true",
                      help="no while loop: every collective at the top level")
  args = parser.parse_args()
  fn, shard = build(args.steps, args.unroll)
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.normal(size=(8 * 64, 64)).astype(np.float32), shard)
  y = jax.device_put(rng.normal(size=(8 * 64, 64)).astype(np.float32), shard)
  start = time.time()
  compiled = fn.lower(x, y).compile()
  print(f"compile/load {time.time() - start:.2f}s  cache_dir={jax.config.jax_compilation_cache_dir}"
        f"  enabled={jax.config.jax_enable_compilation_cache}", flush=True)
  expected = None
  for i in range(args.tries):
    out = jax.device_get(compiled(x, y))
    if expected is None:
      expected = out
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5)
  print(f"ok: {args.tries} calls", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
