"""Cost of the paper's COCO-5K evaluation protocol with ITM re-ranking, before running it for real.

  python bench/eval_paper_scale.py [--devices 2] [--dtype float32|bfloat16] [--k 256]
      [--block 256] [--slice_blocks 1] [--memory_devices 1,2,4,8]
      [--device_tflops 989] [--utilization 0.4] [--accelerators 1] [--interconnect_gbs 450]

Random weights and random states, no training, no towers. Shapes (docs/method.md §2, §6-7):
- 5,000 test images, each a Swin-B-shaped token state (145 tokens = pooled [CLS] + 12 x 12 patches,
  1,024 wide, mask of ones) and 25,000 captions (5 per image), each a BERT-base text state
  (L = 40 tokens x 768: configs/coco.py cuts eval captions to data.max_words_eval = 30 words, then
  tokenizes and pads them to data.max_tokens = 40 tokens, [CLS] and no [SEP]; the fusion encoder
  always reads all 40 positions, so the real caption lengths, drawn at random, change no cost).
  The image token shape is derived from configs/coco.py's Swin-B tower (checked against 145 x 1024).
- The fusion encoder and ITM head of configs/coco.py (6 BERT-base layers with cross-attention to the
  1,024-wide image tokens, 12 heads, MLP 3,072; ITM head 768 -> 1,536 -> 2) through
  `predict.student_predictor`; ITC top-k = eval.itm_k = 256, pairs per block = eval.batch_size.
- Token stores laid out as `retrieval.encode` leaves them: rows padded to whole blocks, sharded over
  the mesh's devices, in the towers' output dtype (float32; `--store_dtype` to try bfloat16).

What it does:
1. ITC at full size, on the host as `retrieval.evaluate` does it: the 5,000 x 25,000 cosine matrix
   of random 256-d embeddings, the top-k candidates in both directions (`ranking.top_k_indices`)
   and the re-ranked score matrices (`ranking.itm_rerank_scores`), with the host's peak memory.
2. ITM re-ranking on a slice: the candidate pairs of both directions, each distinct pair once,
   sorted by image and cut into chunks of one image and block / devices pairs
   (`retrieval.itm_rerank`, `retrieval.image_chunks`); `retrieval.itm_logits` scores a warm-up
   block, then `--slice_blocks` blocks (each device gathers its chunk's image and captions with
   `retrieval.gather_rows`; the fusion encoder computes the image's keys and values once per
   chunk). Any compilation inside a call (jax.monitoring; `retrieval.itm_score_fn` caches the
   block function, so only the first call compiles) is subtracted from its wall time and
   reported on its own line. The seconds per block are extrapolated to the protocol's blocks.
3. FLOPs per block counted analytically (matmuls, 2 per multiply-add; LayerNorm, softmax and GELU
   not counted: every pair's text side, and each chunk's image keys and values once) and
   cross-checked against XLA's cost analysis of the same function (`retrieval.itm_score_fn`,
   lowered and compiled ahead of time); beside it, the FLOPs of scoring every candidate pair with
   its own keys and values.
4. Memory: the token stores (fp32, bf16), per device for each mesh size in --memory_devices, with
   the compiled block's argument and peak temporary bytes (`memory_analysis()`); the host<->device
   bytes of the whole protocol (the slice's are counted by patching the transfer functions, as
   bench/eval_transfer.py does) and the device<->device bytes of `gather_rows`' reduce-scatters.
5. Projected totals: on this machine (measured rates x block counts) and, from --device_tflops at
   --utilization, on an accelerator: a projection, not a measurement.
"""

import argparse
import os
import sys
import time
import tracemalloc

NUM_IMAGES, CAPTIONS_PER_IMAGE = 5_000, 5
SWIN_B_TOKENS = (145, 1024)  # Swin-B at 384 px: pooled [CLS] + 12 x 12 final tokens, width 1024
EMBED_DIM = 256
IMAGE_SIZE = 384  # the uint8 images the encode pass uploads
GIB, MIB = 2**30, 2**20


def parse_args():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--devices", type=int, default=2,
                      help="fake CPU devices of the mesh the slice runs on")
  parser.add_argument("--memory_devices", default="1,2,4,8",
                      help="mesh sizes whose per-device memory is compiled and reported")
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                      help="the fusion encoder's compute dtype (config.model.fusion.dtype)")
  parser.add_argument("--store_dtype", choices=("float32", "bfloat16"), default="float32",
                      help="dtype of the token stores (the towers emit float32)")
  parser.add_argument("--k", type=int, default=0, help="ITC candidates per query (0: config's)")
  parser.add_argument("--block", type=int, default=0,
                      help="pairs per ITM block, = eval.batch_size (0: config's)")
  parser.add_argument("--slice_blocks", type=int, default=1,
                      help="timed blocks per direction (after one warm-up block)")
  parser.add_argument("--device_tflops", type=float, default=989.0,
                      help="accelerator peak TFLOP/s for the projection (H200 SXM dense bf16)")
  parser.add_argument("--utilization", type=float, default=0.4,
                      help="assumed fraction of that peak the fusion encoder reaches")
  parser.add_argument("--accelerators", type=int, default=1,
                      help="accelerators of a projected run (stores and pairs shard over them)")
  parser.add_argument("--interconnect_gbs", type=float, default=450.0,
                      help="device<->device GB/s per device for the projection (NVLink-ish)")
  return parser.parse_args()


args = parse_args()
MEMORY_DEVICES = sorted({int(n) for n in args.memory_devices.split(",") if n})
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_"
                           f"count={max([args.devices, *MEMORY_DEVICES])}")
sys.path.insert(0, os.getcwd())

import jax  # noqa: E402  (after XLA_FLAGS)
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import stage_step  # noqa: E402
from jax import monitoring  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402
from jax.sharding import PartitionSpec as P  # noqa: E402

from configs import coco  # noqa: E402
from rebalance_jax.config import spec  # noqa: E402
from rebalance_jax.evaluators import (  # noqa: E402
  predict,  # noqa: E402
  ranking,
  retrieval,
)
from rebalance_jax.infra import sharding  # noqa: E402
from rebalance_jax.models.student import Student  # noqa: E402

COMPILE_EVENTS = ("/jax/core/compile/jaxpr_trace_duration",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration",
                  "/jax/core/compile/backend_compile_duration")
compile_log: list[float] = []
monitoring.register_event_duration_secs_listener(
    lambda name, secs, **_: compile_log.append(secs) if name in COMPILE_EVENTS else None)

# Host<->device bytes, counted where retrieval moves them (sharding.to_global and
# multihost_utils.process_allgather), as bench/eval_transfer.py does.
moved = {"to_device": 0, "to_host": 0}
_to_device, _to_host = jax.make_array_from_process_local_data, multihost_utils.process_allgather


def _counted_to_device(sharding_, local, *a, **kw):
  moved["to_device"] += np.asarray(local).nbytes
  return _to_device(sharding_, local, *a, **kw)


def _counted_to_host(x, *a, **kw):
  out = _to_host(x, *a, **kw)
  moved["to_host"] += sum(np.asarray(leaf).nbytes for leaf in jax.tree.leaves(out))
  return out


jax.make_array_from_process_local_data = _counted_to_device
multihost_utils.process_allgather = _counted_to_host


def gb(n: float) -> str:
  if n >= 1024 * GIB:
    return f"{n / 1024 / GIB:8.2f} TiB"
  return f"{n / GIB:8.2f} GiB" if n >= GIB else f"{n / MIB:8.1f} MiB"


def hms(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.1f} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.1f} min"
  if seconds < 2 * 86400:
    return f"{seconds / 3600:.1f} h"
  return f"{seconds / 86400:.1f} days"


def padded(rows: int, block: int) -> int:
  return -(-rows // block) * block


def image_token_shape(tower) -> tuple[int, int]:
  """(tokens, width) the Swin tower emits: [pooled; the final stage's grid], width doubled per
  patch merging."""
  c = tower.config
  if tower.kind != "swin":
    raise SystemExit(f"configs/coco.py's image tower is {tower.kind!r}; this bench expects Swin-B")
  merges = len(c.depths) - 1
  grid = c.image_size // c.patch_size // 2**merges
  return 1 + grid * grid, c.embed_dim * 2**merges


def fusion_flops_per_pair(depth, text_len, width, mlp, image_tokens, image_width) -> dict:
  """Matmul FLOPs (2 per multiply-add) of one (caption, image) pair through the fusion encoder
  (every text position, every layer, as FusionEncoder computes it) and the ITM head on [CLS]."""
  L, W, T, Wi = text_len, width, image_tokens, image_width
  per_layer = {
      "self-attn q,k,v,o": 4 * 2 * L * W * W,
      "self-attn scores+values": 2 * 2 * L * L * W,
      "cross-attn q,o": 2 * 2 * L * W * W,
      "cross-attn k,v (image)": 2 * 2 * T * Wi * W,
      "cross-attn scores+values": 2 * 2 * L * T * W,
      "mlp": 2 * 2 * L * W * mlp,
  }
  parts = {name: depth * f for name, f in per_layer.items()}
  parts["itm head"] = 2 * W * 2 * W + 2 * 2 * W * 2
  return parts


def main():
  config = coco.get_config()
  config.model.fusion.dtype = args.dtype
  # Random weights: no converted checkpoint is read.
  for section in (config.model, config.model.image, config.model.text, config.model.fusion,
                  config.teachers.image, config.teachers.text):
    section.init = ""
  exp = spec.from_config(config)
  student_config = exp.student_config(30522)  # BERT vocabulary; no text tower runs here
  fusion = student_config.fusion
  image_tokens, image_width = image_token_shape(student_config.image)
  assert (image_tokens, image_width) == SWIN_B_TOKENS, (image_tokens, image_width)
  k = args.k or exp.eval.itm_k
  block = args.block or exp.eval.batch_size
  text_len, text_width = exp.data.max_tokens, config.model.text.width
  num_captions = NUM_IMAGES * CAPTIONS_PER_IMAGE
  store_dtype = jnp.dtype(args.store_dtype)
  devices = jax.devices()
  mesh = sharding.make_mesh(devices[:args.devices])
  sharding.check_batch_size(block, mesh, "--block")
  image_rows, text_rows = padded(NUM_IMAGES, block), padded(num_captions, block)
  candidates = {"i2t": NUM_IMAGES * min(k, num_captions),
                "t2i": num_captions * min(k, NUM_IMAGES)}
  print(f"COCO-5K protocol: {NUM_IMAGES} images x {image_tokens} tokens x {image_width}, "
        f"{num_captions} captions x {text_len} tokens x {text_width} (max_words_eval "
        f"{exp.data.max_words_eval}, max_tokens {text_len}); ITM top-{k} both ways: "
        f"{candidates['i2t']:,} + {candidates['t2i']:,} = {sum(candidates.values()):,} "
        "candidate pairs")
  print(f"fusion: {fusion.depth} layers, width {text_width}, {fusion.num_heads} heads, MLP "
        f"{fusion.mlp_dim}, cross-attention to {image_width}-wide tokens, compute {fusion.dtype}; "
        f"stores {args.store_dtype}; mesh of {args.devices} fake CPU devices "
        f"({os.cpu_count()} cores)")

  # ------------------------------------------------------------------ model, stores
  model = Student(student_config)

  def fuse_and_match(m, text_hidden, text_mask, image_tokens, image_mask):
    return m.itm_logits(m.fuse(text_hidden, text_mask, image_tokens, image_mask))

  start = time.perf_counter()
  shapes = (jnp.zeros((1, text_len, text_width)), jnp.ones((1, text_len), jnp.int32),
            jnp.zeros((1, image_tokens, image_width)), jnp.ones((1, image_tokens), jnp.int32))
  params = jax.jit(lambda key: model.init(key, *shapes, method=fuse_and_match)["params"],
                   out_shardings=sharding.replicated(mesh))(jax.random.key(0))
  param_bytes = sum(x.nbytes for x in jax.tree.leaves(params))  # fusion, ITM head, scalars
  predictor = predict.student_predictor(model, encode_captions=None)

  rows_sharding = sharding.batch_sharding(mesh)
  make = jax.jit(lambda key, shape: jax.random.normal(key, shape, store_dtype),
                 static_argnums=1, out_shardings=rows_sharding)
  rbg = lambda seed: jax.random.key(seed, impl="unsafe_rbg")  # 3x faster than threefry on CPU
  lengths = np.random.default_rng(0).integers(8, text_len + 1, text_rows)
  text_mask = (np.arange(text_len)[None] < lengths[:, None]).astype(np.int32)
  images = retrieval.Encoded(None, {
      "tokens": make(rbg(1), (image_rows, image_tokens, image_width)),
      "mask": jax.device_put(np.ones((image_rows, image_tokens), np.int32), rows_sharding)})
  texts = retrieval.Encoded(None, {
      "tokens": make(rbg(2), (text_rows, text_len, text_width)),
      "mask": jax.device_put(text_mask, rows_sharding)})
  jax.block_until_ready((images.states, texts.states))
  setup_seconds = time.perf_counter() - start
  print(f"setup (random fusion parameters {param_bytes / MIB:.0f} MiB, random token stores): "
        f"{setup_seconds:.1f} s")

  # ------------------------------------------------------------------ 1. ITC at full size
  rng = np.random.default_rng(0)
  normalized = lambda n: (lambda x: x / np.linalg.norm(x, axis=1, keepdims=True))(
      rng.normal(size=(n, EMBED_DIM)).astype(np.float32))
  image_emb, text_emb = normalized(NUM_IMAGES), normalized(num_captions)
  rows = []
  tracemalloc.start()

  def timed(label, fn):
    begin = time.perf_counter()
    out = fn()
    rows.append((label, time.perf_counter() - begin))
    return out

  itc = timed(f"ITC scores {NUM_IMAGES} x {num_captions} (host)", lambda: image_emb @ text_emb.T)
  texts_of_image = timed(f"top-{k} i2t candidates", lambda: ranking.top_k_indices(itc, k))
  images_of_text = timed(f"top-{k} t2i candidates", lambda: ranking.top_k_indices(itc.T, k))
  fake = lambda idx: rng.normal(size=idx.shape).astype(np.float32)
  i2t_fake, t2i_fake = fake(texts_of_image), fake(images_of_text)
  timed("re-ranked score matrices (fill)", lambda: (
      ranking.itm_rerank_scores(itc, texts_of_image, i2t_fake),
      ranking.itm_rerank_scores(itc.T, images_of_text, t2i_fake)))
  _, host_peak = tracemalloc.get_traced_memory()
  tracemalloc.stop()
  itc_seconds = sum(s for _, s in rows)
  print(f"\n1. ITC part at full size (numpy on the host, as retrieval.evaluate); host peak "
        f"{host_peak / GIB:.2f} GiB (tracemalloc, embeddings excluded)")
  for label, seconds in rows:
    print(f"  {label:<44s} {seconds:8.2f} s")
  print(f"  {'total':<44s} {itc_seconds:8.2f} s")

  # ------------------------------------------------------------------ 2. ITM slice
  # The pairs as retrieval.itm_rerank scores them: both directions' candidates, each pair once,
  # sorted by image and cut into chunks of one image and block / devices pairs.
  pairs = np.unique(np.concatenate([
      np.repeat(np.arange(NUM_IMAGES), k) * num_captions + texts_of_image.ravel(),
      images_of_text.ravel() * num_captions + np.repeat(np.arange(num_captions), k)]))
  pair_images, pair_texts = pairs // num_captions, pairs % num_captions
  chunk_counts = {n: len(retrieval.image_chunks(pair_images, block // n)[0])
                  for n in sorted({args.devices, *MEMORY_DEVICES, 8, args.accelerators})}
  protocol_blocks = {n: -(-c // n) for n, c in chunk_counts.items()}
  print(f"\n2. ITM re-ranking slice through retrieval.itm_logits: {len(pairs):,} distinct pairs "
        f"of the {sum(candidates.values()):,} candidates, sorted by image; chunks of one image "
        f"and up to {block} / devices pairs, one per device in each block of {block}")
  for n, c in chunk_counts.items():
    print(f"  {n} device(s): {c:,} chunks in {protocol_blocks[n]:,} blocks "
          f"({len(pairs) / (protocol_blocks[n] * block):.1%} of the blocks' rows are pairs)")
  starts, ends = retrieval.image_chunks(pair_images, block // args.devices)

  def run(first_chunk, chunks):
    compile_log.clear()
    moved.update(to_device=0, to_host=0)
    rows = slice(starts[first_chunk], ends[first_chunk + chunks - 1])
    begin = time.perf_counter()
    logits = retrieval.itm_logits(predictor, params, images, texts, pair_images[rows],
                                  pair_texts[rows], block, mesh)
    wall = time.perf_counter() - begin
    assert np.all(np.isfinite(logits)), "non-finite ITM logits"
    return (wall, sum(compile_log), dict(moved), len(compile_log) // len(COMPILE_EVENTS),
            rows.stop - rows.start)

  warm = run(0, args.devices)
  timed_run = run(args.devices, args.slice_blocks * args.devices)
  per_block = (timed_run[0] - timed_run[1]) / args.slice_blocks
  compile_seconds = warm[1]
  print(f"  {'call':<30s} {'pairs':>7s} {'wall':>9s} {'compile':>9s} {'compiles':>9s} "
        f"{'s/block':>9s} {'pairs/s':>8s}")
  for label, (wall, comp, _, count, n), blocks_run in (("warm-up (first block)", warm, 1),
                                                        ("slice", timed_run, args.slice_blocks)):
    print(f"  {label:<30s} {n:7d} {wall:8.2f}s {comp:8.2f}s {count:9d} "
          f"{(wall - comp) / blocks_run:8.2f}s {n / (wall - comp):8.1f}")

  # ------------------------------------------------------------------ 3. FLOPs
  parts = fusion_flops_per_pair(fusion.depth, text_len, text_width, fusion.mlp_dim,
                                image_tokens, image_width)
  kv = parts["cross-attn k,v (image)"]  # once per chunk
  flops_pair = sum(parts.values()) - kv
  block_flops = lambda n: block * flops_pair + n * kv

  def abstract(x, mesh_, spec_):
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=NamedSharding(mesh_, spec_))

  compiled, compile_secs = {}, {}
  for n in MEMORY_DEVICES:
    the_mesh = sharding.make_mesh(devices[:n])
    rows_spec = P(the_mesh.axis_names)
    states = lambda e, m=the_mesh, s=rows_spec: {key: abstract(v, m, s)
                                                 for key, v in e.states.items()}
    index = lambda size, m=the_mesh, s=rows_spec: jax.ShapeDtypeStruct(
        (size,), jnp.int32, sharding=NamedSharding(m, s))
    begin = time.perf_counter()
    compiled[n] = retrieval.itm_score_fn(predictor, the_mesh).lower(
        jax.tree.map(lambda x, m=the_mesh: abstract(x, m, P()), params), states(images),
        states(texts), index(n), index(block)).compile()
    compile_secs[n] = time.perf_counter() - begin
  n0 = MEMORY_DEVICES[0]
  xla_flops = stage_step.flops(compiled[n0]) * n0
  print(f"\n3. FLOPs per block of {block} pairs on {n0} device(s): analytic "
        f"{block_flops(n0) / 1e9:.1f} GFLOP (XLA cost analysis: {xla_flops / 1e9:.1f} GFLOP, ratio "
        f"{xla_flops / block_flops(n0):.3f}); per (caption, image) pair, the image's keys and "
        "values apart:")
  for name, f in parts.items():
    share = f" (once per chunk: {f / 1e9:.3f} GFLOP)" if f == kv else ""
    print(f"  {name:<28s} {f / 1e9 if f != kv else 0:7.3f} GFLOP{share}")
  total_flops = protocol_blocks[args.devices] * block_flops(args.devices)
  per_pair_before = sum(parts.values())
  print(f"  protocol on {args.devices} device(s): {total_flops / 1e15:.1f} PFLOP "
        f"({sum(candidates.values()) * per_pair_before / 1e15:.1f} PFLOP for every candidate pair "
        f"with its own keys and values); measured here "
        f"{block_flops(args.devices) / per_block / 1e9:.1f} GFLOP/s")
  for n in sorted({1, 8, args.accelerators} - {args.devices}):
    print(f"  protocol on {n} device(s): {protocol_blocks[n] * block_flops(n) / 1e15:.1f} PFLOP")

  # ------------------------------------------------------------------ 4. memory, traffic
  image_row = image_tokens * image_width
  text_row = text_len * text_width
  store = {d: (image_rows * image_row + text_rows * text_row) * jnp.dtype(d).itemsize +
              (image_rows * image_tokens + text_rows * text_len) * 4
           for d in ("float32", "bfloat16")}
  print(f"\n4. Memory. Token stores ({image_rows} x {image_tokens} x {image_width} + {text_rows} x "
        f"{text_len} x {text_width}, int32 masks): fp32 {gb(store['float32'])}, bf16 "
        f"{gb(store['bfloat16'])}; encode's concatenation briefly holds 2x")
  image_bytes = image_row * store_dtype.itemsize + image_tokens * 4
  text_bytes = text_row * store_dtype.itemsize + text_len * 4
  # gather_rows builds a block's gathered rows (n images, block texts) on every device and
  # reduce-scatters them: (n - 1) / n of them cross the interconnect per device.
  traffic = lambda n: protocol_blocks[n] * (n * image_bytes + block * text_bytes) * (n - 1) / n
  print(f"  per device, one block of {block} pairs compiled ({args.dtype} compute, "
        f"{args.store_dtype} stores); gather traffic = gather_rows' reduce-scatters over the "
        "protocol")
  print(f"  {'devices':>7s} {'store fp32':>12s} {'store bf16':>12s} {'arguments':>12s} "
        f"{'block temp':>12s} {'gather traffic':>15s} {'compile':>8s}")
  for n, c in compiled.items():
    m = c.memory_analysis()
    print(f"  {n:7d} {gb(store['float32'] / n):>12s} {gb(store['bfloat16'] / n):>12s} "
          f"{gb(m.argument_size_in_bytes):>12s} {gb(m.temp_size_in_bytes):>12s} "
          f"{gb(traffic(n)) if n > 1 else '0':>15s} {compile_secs[n]:7.1f}s")
  print(f"  gather_rows builds each block's gathered rows on every device before the "
        f"reduce-scatter: {block} captions and one image per device ({gb(8 * image_bytes + block * text_bytes).strip()} "
        "on 8 devices)")
  slice_pairs = timed_run[4]
  per_pair_to_device = timed_run[2]["to_device"] / slice_pairs
  per_pair_to_host = timed_run[2]["to_host"] / slice_pairs
  print(f"  host<->device over the protocol (measured on the slice: {per_pair_to_device:.1f} B "
        f"to device, {per_pair_to_host:.1f} B to host per pair):")
  transfers = [
      ("images to devices (encode, uint8 384 px)", image_rows * IMAGE_SIZE**2 * 3),
      ("caption ids + mask to devices (int32)", text_rows * text_len * 2 * 4),
      ("embeddings to host (fp32, 256-d)", (image_rows + text_rows) * EMBED_DIM * 4),
      ("ITM pair indices to devices", len(pairs) * per_pair_to_device),
      ("ITM logits to host", len(pairs) * per_pair_to_host),
  ]
  for label, n in transfers:
    print(f"    {label:<44s} {gb(n)}")
  print(f"    {'total':<44s} {gb(sum(n for _, n in transfers))}")

  # ------------------------------------------------------------------ 5. projections
  itm_here = protocol_blocks[args.devices] * per_block + compile_seconds
  print("\n5. Projected totals (ITC + re-ranking; the towers' encode pass and the metric suite, "
        "bench/eval_speed.py, not included)")
  print(f"  this machine, extrapolated from the slice: ITM {protocol_blocks[args.devices]} blocks x "
        f"{per_block:.2f} s + 1 compile x {compile_seconds:.1f} s + ITC {itc_seconds:.1f} s = "
        f"{hms(itm_here + itc_seconds)}")
  print(f"  PROJECTION, not a measurement: accelerators at {args.device_tflops:.0f} TFLOP/s peak "
        f"(the default is an H200 SXM's dense bf16 figure: the fusion encoder in bf16) x "
        f"{args.utilization:.0%} assumed utilization, the blocks split evenly; gather_rows' "
        f"reduce-scatters at {args.interconnect_gbs:.0f} GB/s per device, not overlapped; "
        f"per-block host round trips, compilation and the host-side ITC ({itc_seconds:.1f} s "
        "here) excluded")
  print(f"  {'accelerators':>12s} {'ITM compute':>12s} {'gather traffic':>15s} {'total':>10s} "
        f"{'stores/device':>14s}")
  for n in sorted({1, 8, args.accelerators}):
    compute = protocol_blocks[n] * block_flops(n) / (args.device_tflops * 1e12 * args.utilization
                                                     * n)
    moved_seconds = traffic(n) / (args.interconnect_gbs * 1e9)
    stores = store[args.store_dtype] / n
    print(f"  {n:12d} {hms(compute):>12s} {hms(moved_seconds):>15s} "
          f"{hms(compute + moved_seconds):>10s} {gb(stores):>14s}")


if __name__ == "__main__":
  main()
