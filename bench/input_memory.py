"""Host memory of the input pipeline on a larger synthetic dataset, and the rate it reads batches.

  python bench/input_memory.py [--num_train 12000] [--image_size 64] [--steps 200]

Generates (once, cached) the synthetic data at that scale, then reports the process's resident
memory after importing JAX, after loading the dataset, and after reading `--steps` training
batches of 64 pairs through `pipeline.TrainBatches.iterate`, against the size of the training
images on disk. A split is memory-mapped: only the pages batches touch become resident.
"""

import argparse
import time

import numpy as np


def resident() -> str:
  """Resident memory: anonymous (the process's own) and file-backed (mapped pages of files, which
  the kernel can drop and re-read at will)."""
  with open("/proc/self/status") as f:
    kib = {k: int(v.split()[0]) for k, v in (line.split(":", 1) for line in f)
           if k in ("RssAnon", "RssFile")}
  return f"{kib['RssAnon'] / 1024:7.1f} MiB anonymous, {kib['RssFile'] / 1024:6.1f} MiB file-backed"


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_train", type=int, default=12000)
  parser.add_argument("--image_size", type=int, default=64)
  parser.add_argument("--steps", type=int, default=200)
  parser.add_argument("--cache_dir", default="~/.cache/rebalance_jax/bench")
  args = parser.parse_args()
  import jax  # its import is part of every process's baseline
  print(f"resident after importing JAX {jax.__version__}: {resident()}")
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from rebalance_jax.config import defaults, spec
  from rebalance_jax.data import pipeline
  from rebalance_jax.data.dataset import load_dataset

  config = defaults.base_config()
  config.data.update(image_size=args.image_size, cache_dir=args.cache_dir)
  config.data.synthetic.num_train = args.num_train
  config.model.image.image_size = config.teachers.image.image_size = args.image_size
  exp = spec.from_config(config)
  print(f"resident after importing the project:{resident()}")
  start = time.perf_counter()
  data = load_dataset(exp.data)
  print(f"resident after loading the dataset:  {resident()} "
        f"({time.perf_counter() - start:.1f} s, generation included on a cold cache)")
  images = np.asarray(data.train.images[:1]).nbytes * data.train.num_images
  print(f"training images on disk:             {images / 2**20:8.1f} MiB "
        f"({data.train.num_images} images, {data.train.num_captions} pairs)")
  batches = pipeline.TrainBatches(data.train.num_captions, 64, 0, pipeline.pair_rows(data, 0))
  start = time.perf_counter()
  for _ in batches.iterate(0, args.steps):
    pass
  seconds = time.perf_counter() - start
  print(f"resident after {args.steps} batches of 64: {resident()}")
  print(f"pipeline rate: {args.steps / seconds:.1f} batches/s ({64 * args.steps / seconds:.0f} "
        "pairs/s, tokenization included)")


if __name__ == "__main__":
  main()
