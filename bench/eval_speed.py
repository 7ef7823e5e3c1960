"""Times the evaluation protocols at COCO-5K scale on random data, and prints the figures.

  python bench/eval_speed.py [--images 5000] [--rouge_captions 2500 --rouge_images 500]

1. Metric suite at COCO-5K scale (5,000 images, 25,000 captions, 256-d normalized embeddings, a
   random relevance matrix, ITM-style re-ranked score matrices): cross-modal recall, i2i, t2t,
   mixed NDCG in both modes.
2. The ROUGE-L relevance matrix on random captions (words from a 1,000-word vocabulary, 8–20 words,
   5 references per image) at a fraction of COCO-5K, extrapolated linearly in caption × image pairs
   to 25,000 × 5,000 (pass --rouge_captions 25000 --rouge_images 5000 to time it whole).
"""

import argparse
import time

import numpy as np

from rebalance_jax.evaluators import ranking
from rebalance_jax.evaluators.rouge import rouge_l_matrix

COCO_5K_CAPTIONS, COCO_5K_IMAGES = 25_000, 5_000


def timed(label: str, fn, *args, **kwargs):
  start = time.perf_counter()
  out = fn(*args, **kwargs)
  print(f"  {label:<34s} {time.perf_counter() - start:7.2f} s", flush=True)
  return out


def normalized(rng, n, d=256):
  x = rng.normal(size=(n, d)).astype(np.float32)
  return x / np.linalg.norm(x, axis=1, keepdims=True)


def bench_metrics(num_images: int, itm_k: int = 256) -> None:
  rng = np.random.default_rng(0)
  num_captions = 5 * num_images
  images, texts = normalized(rng, num_images), normalized(rng, num_captions)
  text_to_image = np.repeat(np.arange(num_images), 5)
  first = np.arange(0, num_captions, 5)
  relevance = rng.random((num_captions, num_images), dtype=np.float32)
  print(f"metric suite: {num_images} images x {num_captions} captions, 256-d, ITM top-{itm_k}")
  total = time.perf_counter()
  itc = timed("ITC score matrix", lambda: images @ texts.T)
  texts_of_image, images_of_text = timed(
      "top-k candidates (i2t + t2i)",
      lambda: (ranking.top_k_indices(itc, itm_k), ranking.top_k_indices(itc.T, itm_k)))
  fake_logits = lambda idx: rng.normal(size=idx.shape).astype(np.float32)
  i2t = ranking.itm_rerank_scores(itc, texts_of_image, fake_logits(texts_of_image))
  t2i = ranking.itm_rerank_scores(itc.T, images_of_text, fake_logits(images_of_text))
  timed("recall (ITC)", ranking.recall_at_k, itc, itc.T, text_to_image)
  timed("recall (ITM re-ranked)", ranking.recall_at_k, i2t, t2i, text_to_image)
  for rule in ranking.SELF_RULES:
    timed(f"i2i NDCG (self {rule})", ranking.i2i_ndcg, images, relevance, first, self_rule=rule)
    timed(f"t2t NDCG (self {rule})", ranking.t2t_ndcg, texts, relevance, first, text_to_image,
          self_rule=rule)
  timed("mixed NDCG (calibrated)", ranking.mixed_ndcg, images, texts, relevance, first,
        text_to_image, mode="calibrated")
  timed("mixed NDCG (faithful)", ranking.mixed_ndcg, images, texts, relevance, first,
        text_to_image, mode="faithful", i2t_scores=i2t, t2i_scores=t2i)
  print(f"  {'total':<34s} {time.perf_counter() - total:7.2f} s")


def random_captions(rng, count: int, vocab: int = 1000) -> list[str]:
  return [" ".join(f"w{i}" for i in rng.integers(0, vocab, rng.integers(8, 21)))
          for _ in range(count)]


def bench_rouge(num_captions: int, num_images: int) -> None:
  rng = np.random.default_rng(0)
  captions = random_captions(rng, num_captions)
  pooled = random_captions(rng, 5 * num_images)
  references = [pooled[5 * j:5 * j + 5] for j in range(num_images)]
  start = time.perf_counter()
  rouge_l_matrix(captions, references)
  seconds = time.perf_counter() - start
  scale = COCO_5K_CAPTIONS * COCO_5K_IMAGES / (num_captions * num_images)
  print(f"ROUGE-L: {num_captions} captions x {num_images} images x 5 references: {seconds:.2f} s "
        f"({num_captions * num_images * 5 / seconds / 1e6:.1f} M LCS/s); COCO-5K "
        f"({COCO_5K_CAPTIONS} x {COCO_5K_IMAGES}): {seconds * scale:.0f} s"
        + (" (extrapolated)" if scale != 1 else ""))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--images", type=int, default=COCO_5K_IMAGES)
  parser.add_argument("--rouge_captions", type=int, default=2500)
  parser.add_argument("--rouge_images", type=int, default=500)
  args = parser.parse_args()
  bench_metrics(args.images)
  bench_rouge(args.rouge_captions, args.rouge_images)


if __name__ == "__main__":
  main()
