"""Training images/s of the real-data pipeline at 384 px, with 0, 1 and 2 worker processes.

  python bench/input_pipeline.py [--num_images 240] [--batch_size 36] [--steps 20] \
      [--step_seconds S]

Writes `--num_images` generated photo-sized JPEGs (500 x 375 and 375 x 500, quality 90, as
Flickr30K's and COCO's are) with a Karpathy split file, prepares them (`real.prepare`: TFDS
ArrayRecord), then reads `--steps` training batches through `pipeline.TrainBatches.iterate` as
training does: decode, RandomResizedCrop to 384 px, flip, RandAugment(2, 7), tokenize. Prints
images/s per worker count (0: grain's reader threads in this process) and the shortest train
step (seconds per batch) it keeps up with; with `--step_seconds` (a step time measured with
bench/train_step.py on the accelerator) also the margin over that step.
"""

import argparse
import json
import os
import shutil
import tempfile
import time

import numpy as np


def write_jpegs(root: str, num_images: int, seed: int = 0) -> str:
  """Photo-like JPEGs (smooth gradients, shapes, sensor noise) and a Karpathy split file."""
  from PIL import Image, ImageDraw
  rng = np.random.default_rng(seed)
  os.makedirs(os.path.join(root, "images"), exist_ok=True)
  entries = []
  for i in range(num_images):
    w, h = (500, 375) if i % 3 else (375, 500)
    y, x = np.mgrid[0:h, 0:w] / max(w, h)
    base = rng.uniform(40, 200, 3) + 60 * np.stack([np.sin(5 * x + i), np.cos(4 * y), x * y], -1)
    pixels = np.clip(base + rng.normal(0, 12, (h, w, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(6):
      x0, y0 = rng.integers(0, w - 60), rng.integers(0, h - 60)
      draw.ellipse((x0, y0, x0 + rng.integers(20, 160), y0 + rng.integers(20, 160)),
                   fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    name = f"{i:06d}.jpg"
    image.save(os.path.join(root, "images", name), quality=90)
    split = ("test", "val")[i % 2] if i < 20 else "train"
    entries.append({"filename": name, "split": split, "imgid": i,
                    "sentences": [{"raw": f"a photo number {i} with shapes {k}"}
                                  for k in range(5)]})
  path = os.path.join(root, "dataset_flickr30k.json")
  with open(path, "w") as f:
    json.dump({"images": entries, "dataset": "flickr30k"}, f)
  return path


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_images", type=int, default=240)
  parser.add_argument("--batch_size", type=int, default=36)
  parser.add_argument("--steps", type=int, default=20)
  parser.add_argument("--workers", default="0,1,2")
  parser.add_argument("--step_seconds", type=float, default=None,
                      help="seconds of the train step that consumes one batch")
  args = parser.parse_args()
  from absl import flags
  flags.FLAGS.mark_as_parsed()
  from rebalance_jax.config import defaults, spec
  from rebalance_jax.data import pipeline
  from rebalance_jax.data.dataset import load_dataset

  root = tempfile.mkdtemp(prefix="input_pipeline_")
  start = time.perf_counter()
  annotation_file = write_jpegs(root, args.num_images)
  print(f"wrote {args.num_images} JPEGs in {time.perf_counter() - start:.1f} s ({root})")
  config = defaults.reference_config("flickr30k", lr=5e-5, max_tokens=60, variant="tiny")
  config.data.update(image_root=os.path.join(root, "images"), annotation_file=annotation_file,
                     cache_dir=os.path.join(root, "cache"), image_size=384)
  config.model.image.update(image_size=384, patch_size=32)
  data_spec = spec.from_config(config).data
  start = time.perf_counter()
  data = load_dataset(data_spec)
  print(f"prepared and loaded in {time.perf_counter() - start:.1f} s: "
        f"{data.train.num_images} training images, {data.train.num_captions} pairs")
  for workers in (int(w) for w in args.workers.split(",")):
    batches = pipeline.TrainBatches(data.train.num_captions, args.batch_size, 0,
                                    pipeline.pair_rows(data, 0), num_workers=workers)
    iterator = batches.iterate(0, args.steps + 1)
    next(iterator)  # worker start-up and the first batch are not the steady state
    start = time.perf_counter()
    for _ in range(args.steps):
      batch = next(iterator)
    seconds = time.perf_counter() - start
    iterator.close()
    assert batch["image"].shape == (args.batch_size, 384, 384, 3)
    rate = args.steps * args.batch_size / seconds
    line = (f"workers={workers}: {rate:7.1f} images/s: keeps up with steps of "
            f"{seconds / args.steps:.3f} s or longer at batch {args.batch_size}")
    if args.step_seconds:
      line += f"; {args.step_seconds * args.steps / seconds:.1f}x the given step's need"
    print(line)
  shutil.rmtree(root)


if __name__ == "__main__":
  main()
