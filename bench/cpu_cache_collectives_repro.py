"""Minimal reproduction: an XLA:CPU executable loaded from the persistent compilation cache aborts.

A shard_map program on 8 fake CPU devices has top-level all-to-alls and ppermute rings inside
fori_loops (while loops), with no data dependence between the two. Run it in fresh processes:

  export JAX_COMPILATION_CACHE_DIR=/tmp/abort_cache_repro
  python bench/cpu_cache_collectives_repro.py           # compiles, writes the cache: passes
  python bench/cpu_cache_collectives_repro.py           # loads it: SIGABRT within a few calls
  JAX_ENABLE_COMPILATION_CACHE=false python bench/cpu_cache_collectives_repro.py  # passes
  python bench/cpu_cache_collectives_repro.py --unroll  # no loop: passes warm too
  python bench/cpu_cache_collectives_repro.py --guard   # infra/compilation_cache.py's guard

Cause (jaxlib 0.10.2): a compiled XLA:CPU program gives every collective one shared communicator
resource, so each device runs its collectives one at a time and in the same order. Deserializing
the thunks of a while/conditional/call body creates a new resource for the collectives inside it,
so after a cache load a device can run a loop's ppermute and a top-level all-to-all at once.
Devices then block in different rendezvous, the CPU client's worker threads run out, and XLA's
rendezvous terminate timeout (--xla_cpu_collective_call_terminate_timeout_seconds; about a minute
here) aborts the process. Under pytest the stderr message is captured and lost, so only
"Fatal Python error: Aborted" is seen. To fail faster and see XLA's "may be stuck" lines (one
device rank waiting in an all-to-all and in a collective-permute at once), add
  XLA_FLAGS="--xla_cpu_collective_call_terminate_timeout_seconds=10
             --xla_cpu_collective_call_warn_stuck_timeout_seconds=5"
"""

import argparse
import os
import time

_PARSER = argparse.ArgumentParser(description=__doc__.split("\n")[0])
_PARSER.add_argument("--tries", type=int, default=100, help="calls of the compiled program")
_PARSER.add_argument("--steps", type=int, default=8, help="ring steps per loop")
_PARSER.add_argument("--unroll", action="store_true",
                     help="Python loop instead of fori_loop: every collective at the top level")
_PARSER.add_argument("--guard", action="store_true",
                     help="install rebalance_jax.infra.compilation_cache's guard first")
ARGS = _PARSER.parse_args()

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import Mesh, NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from rebalance_jax.infra import compilation_cache  # noqa: E402

if ARGS.guard:
  compilation_cache.guard_cpu_collectives()


def build(steps: int, unroll: bool):
  mesh = Mesh(np.array(jax.devices()), ("data",))
  ring = [(i, (i + 1) % 8) for i in range(8)]

  def local(x, y):
    outs = []
    for k in range(4):
      # Similar work before either collective, so which one a device reaches first varies.
      xk = jnp.tanh((x * (k + 1)) @ x.T) @ x
      outs.append(jax.lax.all_to_all(xk, "data", 0, 0, tiled=True).sum(keepdims=True))

      def body(_, carry, k=k):
        acc, blk = carry
        blk = jax.lax.ppermute(blk, "data", ring)
        return acc + jnp.tanh(blk * (k + 1)).sum(), blk

      carry = (jnp.zeros_like(y[0, 0]), jnp.tanh((y * (k + 1)) @ y.T) @ y)
      if unroll:
        for i in range(steps):
          carry = body(i, carry)
      else:
        carry = jax.lax.fori_loop(0, steps, body, carry)
      outs.append(carry[0][None])
    return tuple(outs[0::2]), tuple(outs[1::2])

  shard = NamedSharding(mesh, P("data"))
  fn = jax.shard_map(local, mesh=mesh, in_specs=(P("data"), P("data")), out_specs=P("data"))
  return jax.jit(fn, in_shardings=(shard, shard), out_shardings=shard), shard


def main():
  fn, shard = build(ARGS.steps, ARGS.unroll)
  rng = np.random.default_rng(0)
  x, y = (jax.device_put(rng.normal(size=(8 * 64, 64)).astype(np.float32), shard) for _ in "xy")
  start = time.time()
  compiled = fn.lower(x, y).compile()
  print(f"compile or cache load: {time.time() - start:.2f}s "
        f"(cache dir {jax.config.jax_compilation_cache_dir}, "
        f"enabled {jax.config.jax_enable_compilation_cache})", flush=True)
  expected = jax.device_get(compiled(x, y))
  for _ in range(ARGS.tries - 1):
    for a, b in zip(jax.tree.leaves(jax.device_get(compiled(x, y))), jax.tree.leaves(expected)):
      np.testing.assert_allclose(a, b, rtol=1e-5)
  print(f"ok: {ARGS.tries} calls", flush=True)


if __name__ == "__main__":
  main()
