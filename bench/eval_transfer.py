"""Counts the host<->device bytes of evaluating a trained run's checkpoints, and prints them.

  python bench/eval_transfer.py --workdir=runs/demo [--config=configs/demo.py] [--stages=stage2]

Runs `evaluate_run` (every protocol on the test split, ITM re-ranking included) on the run's
checkpoints and counts the bytes of every array sent to the devices
(`jax.make_array_from_process_local_data`, `jax.device_put`) and gathered back to the host
(`multihost_utils.process_allgather`), by the caller's source line. It uses only those entry points,
so the same script measures older commits of the repository too (run it from their checkout).
"""

import argparse
import collections
import importlib.util
import os
import sys
import time
import traceback

import jax
import numpy as np
from absl import flags
from jax.experimental import multihost_utils


def load_config(spec: str):
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


def caller() -> str:
  for frame in reversed(traceback.extract_stack()[:-2]):
    if "/rebalance_jax/" in frame.filename and "/site-packages/" not in frame.filename:
      return f"{os.path.relpath(frame.filename)}:{frame.lineno}"
  return "?"


def count_bytes(module, name: str, counter: collections.Counter, nbytes):
  original = getattr(module, name)

  def counted(*args, **kwargs):
    out = original(*args, **kwargs)
    counter[caller()] += nbytes(args, out)
    return out

  setattr(module, name, counted)


def tree_bytes(tree) -> int:
  return sum(np.asarray(x).nbytes if not isinstance(x, jax.Array) else x.nbytes
             for x in jax.tree.leaves(tree))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--workdir", required=True)
  parser.add_argument("--config", default="configs/demo.py")
  parser.add_argument("--stages", default="stage2")
  args = parser.parse_args()
  flags.FLAGS(sys.argv[:1])
  sys.path.insert(0, os.getcwd())
  from rebalance_jax.config import spec  # noqa: E402  (after the flags)
  from rebalance_jax.recipe.evaluation import evaluate_run  # noqa: E402

  to_device, to_host = collections.Counter(), collections.Counter()
  count_bytes(jax, "make_array_from_process_local_data", to_device,
              lambda a, out: tree_bytes(a[1]))
  count_bytes(jax, "device_put", to_device, lambda a, out: tree_bytes(a[0]))
  count_bytes(multihost_utils, "process_allgather", to_host, lambda a, out: tree_bytes(out))
  start = time.perf_counter()
  rows = evaluate_run(spec.from_config(load_config(args.config)), args.workdir,
                      args.stages.split(","))
  seconds = time.perf_counter() - start
  for name, metrics in rows.items():
    print(f"{name}: rsum {metrics['rsum']:.2f}, i2i NDCG@10 {metrics['i2i_ndcg@10']:.2f}")
  for label, counter in (("host -> device", to_device), ("device -> host", to_host)):
    print(f"{label}: {sum(counter.values()) / 2**20:10.1f} MiB")
    for where, n in counter.most_common(6):
      print(f"  {n / 2**20:10.1f} MiB  {where}")
  print(f"evaluation wall time: {seconds:.1f} s (compilation included)")


if __name__ == "__main__":
  main()
