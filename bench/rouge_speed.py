"""Times rouge_l_matrix on random captions and extrapolates to COCO-5K (25,000 captions × 5,000 images).

Captions: words drawn from a vocabulary of --vocab words, 8–20 words each, 5 references per image.
The cost is linear in captions × images, so the extrapolation scales the measured time by the pair count.

  python bench/rouge_speed.py [--captions 2500] [--images 500] [--vocab 1000]
"""

import argparse
import time

import numpy as np

from rebalance_jax.evaluators.rouge import rouge_l_matrix

COCO_5K_CAPTIONS, COCO_5K_IMAGES = 25_000, 5_000


def random_captions(rng: np.random.Generator, count: int, vocab: int) -> list[str]:
  return [" ".join(f"w{i}" for i in rng.integers(0, vocab, rng.integers(8, 21))) for _ in range(count)]


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--captions", type=int, default=2500)
  parser.add_argument("--images", type=int, default=500)
  parser.add_argument("--vocab", type=int, default=1000)
  args = parser.parse_args()

  rng = np.random.default_rng(0)
  captions = random_captions(rng, args.captions, args.vocab)
  pooled = random_captions(rng, 5 * args.images, args.vocab)
  references = [pooled[5 * j:5 * j + 5] for j in range(args.images)]

  start = time.perf_counter()
  rouge_l_matrix(captions, references)
  seconds = time.perf_counter() - start
  scale = (COCO_5K_CAPTIONS * COCO_5K_IMAGES) / (args.captions * args.images)
  print(f"{args.captions} captions x {args.images} images x 5 references (vocabulary {args.vocab}): "
        f"{seconds:.2f} s, {args.captions * args.images * 5 / seconds / 1e6:.1f} M LCS/s")
  print(f"extrapolated to COCO-5K ({COCO_5K_CAPTIONS} x {COCO_5K_IMAGES}): {seconds * scale:.0f} s "
        f"({seconds * scale / 60:.1f} min)")


if __name__ == "__main__":
  main()
