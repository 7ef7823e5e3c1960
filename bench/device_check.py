"""The accelerator check: the paper's stage-2 train step in bfloat16 on one device, at the
reference's per-GPU batch and at the largest batch that fits, remat off and on; then one ITM
re-ranking block. Meant to finish in under 8 minutes on one H100.

  python bench/device_check.py                  # the paper's student (configs/flickr.py)
  python bench/device_check.py --small          # configs/bench_tiny.py (the default on a CPU)

For each remat setting (every tower and the fusion encoder): the step at --batch (18: the
reference's 36 over 2 GPUs) and at the largest batch whose compiled step (arguments and
temporaries, XLA's memory analysis) fits in 90% of the device's memory, estimated from the first
compile and checked by compiling it (a quarter less until it fits; on a CPU at most 4x --batch).
Each prints the compile time, the median step over --steps steps after one warm-up, examples/s,
the step's model FLOPs (XLA's cost analysis), MFU against the card's dense bf16 peak (--peak_tflops,
else known from the device name) and the device's peak memory. Then the fusion encoder and ITM
head score one block of --itm_block pairs (one image, its captions) at the paper's shapes, as
`retrieval.itm_score_fn` does in re-ranking.

Random parameters and batches, text padded to --tokens (the reference pads to each batch's
longest caption: Flickr30K's are mostly 10-20 words).
"""

import argparse
import functools
import os
import resource
import sys
import time

sys.path.insert(0, os.getcwd())  # configs/, run from the repository's root

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import stage_step  # noqa: E402

from configs import bench_tiny, flickr  # noqa: E402
from rebalance_jax.evaluators import predict, retrieval  # noqa: E402
from rebalance_jax.infra import host_memory, sharding  # noqa: E402
from rebalance_jax.models.student import Student, init_student  # noqa: E402

# Dense bf16 peaks (no sparsity), FLOP/s, by a substring of jax's device_kind.
PEAKS = (("H100 PCIe", 756e12), ("H100", 989e12), ("H200", 989e12), ("GH200", 989e12),
         ("A100", 312e12), ("L40S", 362e12), ("L4", 121e12), ("A10", 125e12))
GIB = 2**30


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--small", action="store_true", help="configs/bench_tiny.py, batch 8")
  parser.add_argument("--batch", type=int, default=0, help="the first batch (0: 18, or 8 small)")
  parser.add_argument("--tokens", type=int, default=24, help="caption length the batch pads to")
  parser.add_argument("--steps", type=int, default=10, help="timed steps per setting")
  parser.add_argument("--peak_tflops", type=float, default=0.0,
                      help="the device's dense bf16 peak (0: from its name)")
  parser.add_argument("--itm_block", type=int, default=64, help="pairs in the ITM block")
  return parser.parse_args()


def device_peak(device, override: float) -> float | None:
  if override:
    return override * 1e12
  return next((peak for name, peak in PEAKS if name in device.device_kind), None)


def config_for(small: bool, batch: int, tokens: int, remat: bool):
  config = bench_tiny.get_config() if small else flickr.get_config()
  config.stages.stage2.batch_size = batch
  config.data.max_tokens = tokens
  for part in (config.model.image, config.model.text, config.model.fusion):
    part.dtype = "bfloat16"
    part.remat = remat
  return config


def compiled_step(args, batch: int, remat: bool, vocab: int):
  built = stage_step.build(config_for(args.small, batch, args.tokens, remat), "stage2", vocab)
  start = time.perf_counter()
  compiled = built.lower().compile()
  host_memory.release_free_heap()
  memory = compiled.memory_analysis()
  need = memory.argument_size_in_bytes + memory.temp_size_in_bytes if memory else 0
  return built, compiled, need, time.perf_counter() - start


def largest_batch(args, first: int, need_first: int, limit: float | None, remat: bool, vocab: int):
  """The largest batch (a multiple of 2) estimated to fit `limit` bytes from the first compile
  (memory taken as proportional to the batch: an underestimate of what fits), then compiled and
  shrunk by a quarter until it does."""
  if limit is None:
    batch = 4 * first
  else:
    batch = max(first, int(limit / need_first * first) // 2 * 2)
  while True:
    built, compiled, need, seconds = compiled_step(args, batch, remat, vocab)
    if limit is None or need <= limit or batch <= first:
      return batch, built, compiled, need, seconds
    batch = max(first, int(batch * 0.75) // 2 * 2)


def time_step(built, compiled, steps: int) -> list[float]:
  state = built.fresh_state()
  state, metrics = compiled(state, *built.args)
  jax.block_until_ready((state, metrics))
  seconds = []
  for _ in range(steps):
    start = time.perf_counter()
    state, metrics = compiled(state, *built.args)
    jax.block_until_ready((state, metrics))
    seconds.append(time.perf_counter() - start)
  if not np.isfinite(float(metrics["loss/total"])):
    sys.exit("device check: non-finite loss")
  return seconds


def peak_memory(device) -> str:
  stats = device.memory_stats() or {}
  if "peak_bytes_in_use" in stats:
    return f"{stats['peak_bytes_in_use'] / GIB:.1f} GiB on the device"
  return f"host RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.1f} GiB"


def report(label, batch, built, compiled, need, compile_s, seconds, peak):
  flops = stage_step.flops(compiled)
  median = float(np.median(seconds))
  mfu = f"{flops / median / peak:.1%}" if peak and flops else "n/a"
  print(f"  {label:<22s} batch {batch:4d}: compile {compile_s:5.1f} s, step {median * 1e3:8.1f} ms "
        f"(min {min(seconds) * 1e3:.1f}), {batch / median:7.1f} examples/s, "
        f"{flops / 1e9:.1f} GFLOP/step, MFU {mfu}, compiled {need / GIB:.1f} GiB, peak "
        f"{peak_memory(built.mesh.devices.flat[0])}", flush=True)


def itm_block(args, vocab: int, peak):
  """One re-ranking block: one image's tokens, args.itm_block captions (40 tokens: configs/coco.py's
  max_tokens, or --tokens small), the fusion encoder and ITM head in bf16, as re-ranking runs it."""
  config = config_for(args.small, 8, args.tokens if args.small else 40, False)
  built = stage_step.build(config, "stage2", vocab)
  model, mesh = built.model, built.mesh
  params = jax.jit(functools.partial(init_student, model))(jax.random.key(0))
  size = config.data.image_size
  _, image_tokens, image_width = jax.eval_shape(
      lambda p: model.apply({"params": p}, jnp.zeros((1, size, size, 3)),
                            method=Student.encode_image)[0].tokens, params).shape
  text_len, width = config.data.max_tokens, model.config.text.config.width
  rows, devices = sharding.batch_sharding(mesh), mesh.devices.size
  put = lambda x: jax.device_put(x, rows)
  images = {"tokens": put(jnp.ones((devices, image_tokens, image_width))),
            "mask": put(np.ones((devices, image_tokens), np.int32))}
  texts = {"tokens": put(jnp.ones((args.itm_block, text_len, width))),
           "mask": put(np.ones((args.itm_block, text_len), np.int32))}
  inputs = (params, images, texts, put(np.arange(devices, dtype=np.int32)),
            put(np.arange(args.itm_block, dtype=np.int32)))
  compiled = retrieval.itm_score_fn(predict.student_predictor(model, None), mesh).lower(
      *inputs).compile()
  jax.block_until_ready(compiled(*inputs))
  seconds = []
  for _ in range(args.steps):
    start = time.perf_counter()
    jax.block_until_ready(compiled(*inputs))
    seconds.append(time.perf_counter() - start)
  median, flops = float(np.median(seconds)), stage_step.flops(compiled)
  mfu = f", MFU {flops / median / peak:.1%}" if peak and flops else ""
  print(f"ITM re-ranking block: {args.itm_block} pairs of one {image_tokens} x {image_width} image"
        f" and {text_len}-token captions: {median * 1e3:.1f} ms, "
        f"{args.itm_block / median:.0f} pairs/s, {flops / 1e9:.1f} GFLOP{mfu}", flush=True)


def main():
  args = parse_args()
  host_memory.set_up_process(__file__)  # as the entry points (before JAX starts its backends)
  started = time.perf_counter()
  device = jax.devices()[0]
  args.small = args.small or device.platform == "cpu"
  first = args.batch or (8 if args.small else 18)
  vocab = 200 if args.small else 30522
  peak = device_peak(device, args.peak_tflops)
  stats = device.memory_stats() or {}
  limit = 0.9 * stats["bytes_limit"] if "bytes_limit" in stats else None
  print(f"device: {device.device_kind} ({device.platform}), {jax.device_count()} device(s) seen, "
        f"timing one; bf16 peak {peak / 1e12:.0f} TFLOP/s" if peak else
        f"device: {device.device_kind} ({device.platform}); no bf16 peak known (--peak_tflops)")
  print(f"  {'configs/bench_tiny.py' if args.small else 'configs/flickr.py'} stage 2, every loss "
        f"term, towers and fusion in bfloat16, captions of {args.tokens} tokens; memory limit "
        f"{limit / GIB:.1f} GiB" if limit else "  no device memory limit reported")
  for remat in (False, True):
    built, compiled, need, compile_s = compiled_step(args, first, remat, vocab)
    report(f"remat {'on' if remat else 'off'}", first, built, compiled, need, compile_s,
           time_step(built, compiled, args.steps), peak)
    del built, compiled
    batch, built, compiled, need, compile_s = largest_batch(args, first, need, limit, remat, vocab)
    report(f"remat {'on' if remat else 'off'}, largest", batch, built, compiled, need, compile_s,
           time_step(built, compiled, max(args.steps // 2, 3)), peak)
  itm_block(args, vocab, peak)
  print(f"device check done in {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
  main()
