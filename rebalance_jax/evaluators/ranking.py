"""Ranking metrics of the evaluation protocols (docs/method.md §7): small, pure, vectorized numpy.

Conventions: N_i test images and N_c captions; caption c belongs to image `text_to_image[c]`, and
`first_caption[i]` is image i's first caption (5i in the standard layout). `rel` is the (N_c, N_i)
graded relevance matrix: rel[c, j] = ROUGE-L of caption c against the references of image j (≥ 0).
Embeddings are L2-normalized, so a dot product is a cosine. Scores must be finite.

Rules:
- Recall tie rule (optimistic): a query's rank is the number of gallery items scored strictly higher
  than its best positive, so a positive tied with negatives ranks first among them.
- Ranking order (`top_k_indices`, NDCG): descending score; equal scores by ascending gallery index.
- NDCG: excluded gallery items are removed from both the ranking and the ideal ranking; a query
  whose ideal DCG is 0 (no relevant gallery item) contributes NDCG 0 to the mean.
- The query itself in single-modal retrieval (`self_rule`): "zeroed" ([ref]) keeps it in the gallery
  with score 0 and relevance 0, so it can take a top-K slot with no gain; "removed" (the fix)
  excludes it. Mixed retrieval: "faithful" ranks the query itself, "calibrated" excludes it.
- NDCG queries are processed in blocks of `block` rows, so no (Q, G) temporary exceeds (block, G).
"""

from collections.abc import Callable, Sequence

import numpy as np

from rebalance_jax.data.sources import CAPTIONS_PER_IMAGE
from rebalance_jax.infra.errors import InputError

RECALL_KS = (1, 5, 10)
NDCG_KS = (10, 20, 50)
QUERY_BLOCK = 512
MIXED_MODES = ("calibrated", "faithful")
SELF_RULES = ("zeroed", "removed")

# (block rows) -> (scores (b, G), relevance (b, G), excluded (b, G) bool or None)
BlockRows = Callable[[slice], tuple[np.ndarray, np.ndarray, np.ndarray | None]]


# ---------------------------------------------------------------- validation

def check_captions_per_image(text_to_image: np.ndarray, n_images: int,
                             per_image: int = CAPTIONS_PER_IMAGE) -> None:
  """Raises InputError (a ValueError) naming the first image with < `per_image` captions."""
  counts = np.bincount(text_to_image, minlength=n_images)[:n_images]
  short = np.flatnonzero(counts < per_image)
  if short.size:
    image = short[0]
    raise InputError(
        f"image {image} has {counts[image]} captions; every test image needs {per_image}")


def _check_first_captions(first_caption: np.ndarray, text_to_image: np.ndarray) -> None:
  """Every image has its captions, and `first_caption[i]` is a caption of image i."""
  check_captions_per_image(text_to_image, len(first_caption))
  owners = text_to_image[first_caption]
  wrong = np.flatnonzero(owners != np.arange(len(first_caption)))
  if wrong.size:
    image = wrong[0]
    raise InputError(f"first caption {first_caption[image]} of image {image} belongs to image "
                     f"{owners[image]}")


def _check_choice(name: str, value: str, choices: Sequence[str]) -> None:
  if value not in choices:
    raise ValueError(f"{name} is {value!r}; expected one of {choices}")


# ---------------------------------------------------------------- cross-modal recall

def recall_at_k(i2t_scores: np.ndarray, t2i_scores: np.ndarray, text_to_image: np.ndarray,
                ks: Sequence[int] = RECALL_KS) -> dict[str, float]:
  """i2t and t2i R@K in percent, rsum (their sum) and r_mean (their mean).

  i2t_scores: (N_i, N_c); t2i_scores: (N_c, N_i). An image hits at K if any of its captions ranks in
  its top K, a caption if its image does; ranks follow the optimistic tie rule (module docstring).
  With ITM re-ranked matrices a positive outside the candidates (scored `fill`) ranks after every
  candidate whose logit exceeds the fill, and ties with every other non-candidate: R@K is then
  meaningful only for K ≤ k, beyond which the tie rule makes it a hit.
  """
  n_images, n_captions = i2t_scores.shape
  if t2i_scores.shape != (n_captions, n_images):
    raise ValueError(f"t2i_scores has shape {t2i_scores.shape}; expected {(n_captions, n_images)}")
  check_captions_per_image(text_to_image, n_images)
  captions = np.arange(n_captions)
  best_positive = np.full(n_images, -np.inf)
  np.maximum.at(best_positive, text_to_image, i2t_scores[text_to_image, captions])
  ranks = {"i2t": _count_above(i2t_scores, best_positive),
           "t2i": _count_above(t2i_scores, t2i_scores[captions, text_to_image])}
  metrics = {f"{d}_r{k}": 100.0 * float(np.mean(r < k)) for d, r in ranks.items() for k in ks}
  metrics["rsum"] = sum(metrics.values())
  metrics["r_mean"] = metrics["rsum"] / (2 * len(ks))
  return metrics


def _count_above(scores: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
  """Per row, the number of scores strictly above the row's threshold."""
  return np.sum(scores > thresholds[:, None], axis=1)


def top_k_indices(scores: np.ndarray, k: int) -> np.ndarray:
  """(Q, k) column indices of each row's k highest scores (k ≤ G), by descending score, equal scores
  by ascending index — the first k of a stable descending sort."""
  top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
  kth_score = np.min(np.take_along_axis(scores, top, axis=1), axis=1)
  # argpartition picks arbitrarily among scores tied with the k-th: redo those rows stably.
  tied = np.flatnonzero(np.sum(scores >= kth_score[:, None], axis=1) > k)
  top[tied] = np.argsort(-scores[tied], axis=1, kind="stable")[:, :k]
  order = np.lexsort((top, -np.take_along_axis(scores, top, axis=1)))
  return np.take_along_axis(top, order, axis=1)


def itm_rerank_scores(itc_scores: np.ndarray, candidates_idx: np.ndarray, itm_logits: np.ndarray,
                      fill: float = -100.0) -> np.ndarray:
  """The reference's re-ranked score matrix, shaped like itc_scores (Q, G): `fill` everywhere except
  at each query's ITC top-k candidates `candidates_idx` (Q, k), which hold their ITM positive logits
  `itm_logits` (Q, k)."""
  if candidates_idx.shape != itm_logits.shape:
    raise ValueError(f"candidates_idx {candidates_idx.shape} and itm_logits {itm_logits.shape} "
                     "must have the same shape")
  scores = np.full(itc_scores.shape, fill, dtype=np.result_type(itm_logits, np.float32))
  np.put_along_axis(scores, candidates_idx, itm_logits, axis=1)
  return scores


# ---------------------------------------------------------------- NDCG

def ndcg_at_k(scores: np.ndarray, relevance: np.ndarray, ks: Sequence[int] = NDCG_KS,
              exclude: np.ndarray | None = None, block: int = QUERY_BLOCK) -> dict[int, float]:
  """{K: mean NDCG@K × 100} over the queries (rows) of scores and relevance (Q, G).

  DCG@K = Σ_{r<K} rel_r / log2(r + 2) over the gallery in ranking order (module docstring), IDCG@K
  the same over the query's relevances sorted descending; K > G counts the whole gallery. `exclude`
  (Q, G) bool marks gallery items removed from a query's ranking and ideal ranking.
  """
  def block_rows(rows):
    return scores[rows], relevance[rows], None if exclude is None else exclude[rows]
  means = 100.0 * _per_query_ndcg(block_rows, len(scores), ks, block).mean(axis=0)
  return {k: float(m) for k, m in zip(ks, means)}


def _per_query_ndcg(block_rows: BlockRows, n_queries: int, ks: Sequence[int],
                    block: int) -> np.ndarray:
  """(n_queries, len(ks)) NDCG in [0, 1], evaluating `block` queries at a time."""
  return np.concatenate([_ndcg_rows(*block_rows(slice(start, start + block)), ks)
                         for start in range(0, n_queries, block)])


def _ndcg_rows(scores: np.ndarray, relevance: np.ndarray, exclude: np.ndarray | None,
               ks: Sequence[int]) -> np.ndarray:
  """(b, len(ks)) NDCG in [0, 1] of a block of queries."""
  if exclude is not None:  # last in the ranking, with no gain: as if removed (scores are finite)
    scores = np.where(exclude, -np.inf, scores)
    relevance = np.where(exclude, 0.0, relevance)
  n_gallery = scores.shape[1]
  depth = min(max(ks), n_gallery)
  ranked = np.take_along_axis(relevance, top_k_indices(scores, depth), axis=1)
  ideal = np.sort(np.partition(relevance, n_gallery - depth, axis=1)[:, n_gallery - depth:],
                  axis=1)[:, ::-1]
  discount = 1.0 / np.log2(np.arange(depth) + 2.0)
  at_k = [min(k, n_gallery) - 1 for k in ks]
  dcg = np.cumsum(ranked * discount, axis=1)[:, at_k]
  idcg = np.cumsum(ideal * discount, axis=1)[:, at_k]
  return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)


def _named(prefix: str, ks: Sequence[int], per_query: np.ndarray) -> dict[str, float]:
  """{f"{prefix}_ndcg@{k}": mean NDCG@k × 100}."""
  return {f"{prefix}_ndcg@{k}": float(m) for k, m in zip(ks, 100.0 * per_query.mean(axis=0))}


def _self_mask(gallery_positions: np.ndarray, n_gallery: int) -> np.ndarray:
  """(b, n_gallery) bool: True at each query's own gallery position."""
  return gallery_positions[:, None] == np.arange(n_gallery)


def _apply_self_rule(scores: np.ndarray, relevance: np.ndarray, is_self: np.ndarray,
                     self_rule: str) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
  """A block's (scores, relevance, excluded) with `self_rule` applied at `is_self` (b, G)."""
  if self_rule == "removed":
    return scores, relevance, is_self
  return np.where(is_self, 0, scores), np.where(is_self, 0, relevance), None


# ---------------------------------------------------------------- single-modal and mixed protocols

def i2i_ndcg(image_emb: np.ndarray, rel: np.ndarray, first_caption: np.ndarray,
             ks: Sequence[int] = NDCG_KS, self_rule: str = "zeroed",
             block: int = QUERY_BLOCK) -> dict[str, float]:
  """{"i2i_ndcg@K"}: every image i queries all images by cosine, itself under `self_rule` (module
  docstring); gallery image j has relevance rel[first_caption[i], j]."""
  _check_choice("self_rule", self_rule, SELF_RULES)
  n_images = len(image_emb)

  def block_rows(rows):
    return _apply_self_rule(image_emb[rows] @ image_emb.T, rel[first_caption[rows]],
                            _self_mask(np.arange(n_images)[rows], n_images), self_rule)
  return _named("i2i", ks, _per_query_ndcg(block_rows, n_images, ks, block))


def t2t_ndcg(text_emb: np.ndarray, rel: np.ndarray, first_caption: np.ndarray,
             text_to_image: np.ndarray, ks: Sequence[int] = NDCG_KS, self_rule: str = "zeroed",
             block: int = QUERY_BLOCK) -> dict[str, float]:
  """{"t2t_ndcg@K"}: the first caption of every image i queries all captions by cosine, itself under
  `self_rule` (module docstring); gallery caption c has relevance rel[c, i]."""
  _check_choice("self_rule", self_rule, SELF_RULES)
  _check_first_captions(first_caption, text_to_image)

  def block_rows(rows):
    queries = first_caption[rows]
    return _apply_self_rule(text_emb[queries] @ text_emb.T, rel[:, rows].T,
                            _self_mask(queries, len(text_emb)), self_rule)
  return _named("t2t", ks, _per_query_ndcg(block_rows, len(first_caption), ks, block))


def mixed_ndcg(image_emb: np.ndarray, text_emb: np.ndarray, rel: np.ndarray,
               first_caption: np.ndarray, text_to_image: np.ndarray,
               ks: Sequence[int] = NDCG_KS, mode: str = "calibrated",
               i2t_scores: np.ndarray | None = None, t2i_scores: np.ndarray | None = None,
               block: int = QUERY_BLOCK) -> dict[str, float]:
  """Mixed retrieval NDCG: {"mixed_img_ndcg@K", "mixed_txt_ndcg@K", "mixed_ndcg@K" (all queries)}.

  Queries: every image i and its first caption q = first_caption[i]; each ranks one joint gallery of
  the N_i images and the N_c captions.

  mode="calibrated" (docs/method.md's fix): the gallery is the images (positions 0..N_i-1), then the
  captions (N_i + c), all scored by the cosine of the normalized embeddings, the query itself
  excluded. Relevance for both queries of image i: image j -> rel[q, j], caption c -> rel[c, i].

  mode="faithful" (the reference, index by index, flaws included): the query itself is ranked, and
  cosines share one ranking with the re-ranked matrices i2t_scores (N_i, N_c) and t2i_scores
  (N_c, N_i) (`itm_rerank_scores`: ITM logits of the ITC top-k, -100 elsewhere).
  - image query i: the images by cosine, relevance rel[q, j]; then the captions scored
    i2t_scores[i, c], relevance rel[c, i];
  - text query q: the captions by cosine against q, relevance rel[c, i]; then the images, image a
    scored t2i_scores[first_caption[a], i] with relevance rel[first_caption[a], i]: the reference
    reads both transposed (`scores_t2i.T[:, ::5]`), so image a is scored by how a's first caption
    scored image i.
  """
  _check_choice("mode", mode, MIXED_MODES)
  n_images, n_captions = len(image_emb), len(text_emb)
  if mode == "faithful":
    for name, scores, shape in (("i2t_scores", i2t_scores, (n_images, n_captions)),
                                ("t2i_scores", t2i_scores, (n_captions, n_images))):
      if scores is None or scores.shape != shape:
        raise ValueError(f"mode 'faithful' needs {name} of shape {shape}")
  _check_first_captions(first_caption, text_to_image)
  n_gallery = n_images + n_captions

  def relevance(rows):  # images, then captions
    return np.concatenate([rel[first_caption[rows]], rel[:, rows].T], axis=1)

  def image_rows(rows):
    queries = image_emb[rows]
    to_texts = i2t_scores[rows] if mode == "faithful" else queries @ text_emb.T
    is_self = None if mode == "faithful" else _self_mask(np.arange(n_images)[rows], n_gallery)
    return np.concatenate([queries @ image_emb.T, to_texts], axis=1), relevance(rows), is_self

  def text_rows(rows):
    captions = first_caption[rows]
    queries = text_emb[captions]
    if mode == "faithful":  # captions; then image a: t2i, rel at (first_caption[a], i)
      return (np.concatenate([queries @ text_emb.T, t2i_scores[first_caption, rows].T], axis=1),
              np.concatenate([rel[:, rows].T, rel[first_caption, rows].T], axis=1), None)
    return (np.concatenate([queries @ image_emb.T, queries @ text_emb.T], axis=1), relevance(rows),
            _self_mask(n_images + captions, n_gallery))

  image_queries = _per_query_ndcg(image_rows, n_images, ks, block)
  text_queries = _per_query_ndcg(text_rows, n_images, ks, block)
  return {**_named("mixed_img", ks, image_queries), **_named("mixed_txt", ks, text_queries),
          **_named("mixed", ks, np.concatenate([image_queries, text_queries]))}
