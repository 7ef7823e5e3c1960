"""Calls the 8-device ring-chunked stage-2 loss and gradient (the [device-1-True] case of
tests/test_sharding.py) many times in one process, to measure how often it aborts.

  JAX_COMPILATION_CACHE_DIR=/tmp/abort_cache_x python bench/sharded_stage2_cache_repro.py --calls 20

Uses tests/conftest.py for the environment (8 fake CPU devices, persistent cache settings).
"""

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests"))
import conftest  # noqa: E402  (sets XLA_FLAGS and the cache before jax loads)

import jax  # noqa: E402
import numpy as np  # noqa: E402

from rebalance_jax import objective, sharding  # noqa: E402
from rebalance_jax.experiment import student_model  # noqa: E402
from rebalance_jax.models.student import init_student  # noqa: E402
from test_sharding import _batch  # noqa: E402


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--calls", type=int, default=20)
  args = parser.parse_args()
  config = conftest.load_config("configs/demo.py:tiny")
  config.data.cache_dir = "/tmp/abort_data_cache"
  model = student_model(config, vocab_size=50)
  params = init_student(model, jax.random.key(0))
  batch, teacher = _batch(config, 50)
  mesh = sharding.make_mesh(jax.devices(), fsdp=1)
  loss_config = config.loss.copy_and_resolve_references()
  loss_config.chunked = True
  loss_fn = functools.partial(
      objective.stage_loss, model=model, weights=dict(config.stage2.loss_weights),
      dual_relation="image", num_negative_groups=8, loss_config=loss_config, mesh=mesh)
  rules = sharding.ParamRules(tuple(map(tuple, config.sharding.rules)), min_size=256)
  rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  param_shardings = rules.param_shardings(params, mesh)
  fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True),
               in_shardings=(param_shardings, rows, rows, rep),
               out_shardings=((rep, rep), param_shardings))
  inputs = (jax.device_put(params, param_shardings), jax.device_put(batch, rows),
            jax.device_put(teacher, rows), jax.random.key(1))
  start = time.time()
  compiled = fn.lower(*inputs).compile()
  print(f"compile/load {time.time() - start:.2f}s cache={jax.config.jax_compilation_cache_dir} "
        f"enabled={jax.config.jax_enable_compilation_cache}", flush=True)
  first = None
  for i in range(args.calls):
    (loss, _), _ = jax.device_get(compiled(*inputs))
    first = loss if first is None else first
    np.testing.assert_allclose(loss, first, rtol=1e-6)
    print(f"call {i} ok", flush=True)
  print(f"ok: {args.calls} calls", flush=True)


if __name__ == "__main__":
  main()
