"""Cross-modal retrieval evaluation: embeddings sharded over devices, recall@K on the host.

(The paper's full protocol suite, with ITM re-ranking and single-modal/mixed NDCG, builds on these
pieces.)
"""

import functools

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rebalance_jax import sharding
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import EvalSplit
from rebalance_jax.models.student import Student

RECALL_KS = (1, 5, 10)


def map_in_batches(fn, arrays: dict[str, np.ndarray], batch_size: int, mesh: Mesh) -> np.ndarray:
  """Applies jitted `fn(**batch)` over rows in global batches of `batch_size` (the last padded),
  each process feeding its own slice; returns the unpadded outputs on every process."""
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  n = len(next(iter(arrays.values())))
  outputs = []
  for start in range(0, n, batch_size):
    rows = {k: v[start:start + batch_size] for k, v in arrays.items()}
    pad = batch_size - len(next(iter(rows.values())))
    rows = {k: np.concatenate([v, np.repeat(v[-1:], pad, axis=0)]) for k, v in rows.items()}
    local = {k: v[sharding.process_slice(batch_size)] for k, v in rows.items()}
    out = fn(**sharding.to_global(local, mesh))
    outputs.append(np.asarray(multihost_utils.process_allgather(out, tiled=True)))
  return np.concatenate(outputs)[:n]


def embed_split(model: Student, params, split: EvalSplit, batch_size: int, mesh: Mesh):
  """Normalized embeddings (images (N_i, D), captions (N_c, D)) of a test split."""
  apply = functools.partial(model.apply, {"params": params})
  image_fn = jax.jit(lambda image: apply(augment.to_float(image), method=Student.encode_image)[1])
  text_fn = jax.jit(lambda ids, mask: apply(ids, mask, method=Student.encode_text)[1])
  images = map_in_batches(image_fn, {"image": split.images}, batch_size, mesh)
  texts = map_in_batches(text_fn, {"ids": split.ids, "mask": split.mask}, batch_size, mesh)
  return images, texts


def retrieval_ranks(scores: np.ndarray, positives: np.ndarray) -> np.ndarray:
  """Rank (0 = top) of each query's best positive: #gallery items scored strictly higher.

  scores: (Q, G); positives: (Q, G) boolean.
  """
  best = np.max(np.where(positives, scores, -np.inf), axis=1, keepdims=True)
  return np.sum(scores > best, axis=1)


def recall_metrics(i2t_scores: np.ndarray, text_to_image: np.ndarray) -> dict[str, float]:
  """i2t and t2i R@1/5/10 (percent), rsum and r_mean from image-by-caption scores."""
  positives = text_to_image[None, :] == np.arange(i2t_scores.shape[0])[:, None]
  ranks = {"i2t": retrieval_ranks(i2t_scores, positives),
           "t2i": retrieval_ranks(i2t_scores.T, positives.T)}
  metrics = {f"{d}_r{k}": 100.0 * float(np.mean(r < k)) for d, r in ranks.items() for k in RECALL_KS}
  metrics["rsum"] = sum(metrics[f"{d}_r{k}"] for d in ranks for k in RECALL_KS)
  metrics["r_mean"] = metrics["rsum"] / 6
  return metrics


def evaluate_retrieval(model: Student, params, split: EvalSplit, batch_size: int,
                       mesh: Mesh) -> dict[str, float]:
  """Cosine-score cross-modal retrieval metrics of `params` on `split`."""
  images, texts = embed_split(model, params, split, batch_size, mesh)
  return recall_metrics(images @ texts.T, split.text_to_image)


def results_table(rows: dict[str, dict[str, float]]) -> str:
  """Markdown table: one row per model, columns i2t R@1/5/10, t2i R@1/5/10, rsum."""
  columns = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in RECALL_KS] + ["rsum"]
  header = ["model"] + [c.replace("_r", " R@") for c in columns]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for name, m in rows.items():
    lines.append("| " + " | ".join([name] + [f"{m[c]:.2f}" for c in columns]) + " |")
  return "\n".join(lines)
