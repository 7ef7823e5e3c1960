"""The paper's evaluation protocols (METHOD.md §7) for a student's parameters on a test split.

Embeddings (and, for ITM re-ranking, token states) are extracted sharded over every device and
process; scores and metrics are computed on the host with the pure functions of `ranking`:
cross-modal recall with ITC cosine scores and, when the student has a fusion encoder, the
reference's ITM re-ranking of the ITC top-k; single-modal (i2i, t2t) NDCG with the query itself
zeroed (the reference) and removed (the fix), and mixed NDCG in its `faithful` and `calibrated`
modes, all with ROUGE-L relevance.
"""

import dataclasses
import functools

import jax
import numpy as np
from jax.sharding import Mesh

from rebalance_jax import sharding
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import EvalSplit
from rebalance_jax.errors import InputError
from rebalance_jax.evaluators import ranking, rouge
from rebalance_jax.models.student import Student

CURVE_KS = tuple(range(1, 51))  # recall@K curves


@dataclasses.dataclass(frozen=True)
class Encoded:
  image_emb: np.ndarray                 # (N_i, D) normalized
  text_emb: np.ndarray                  # (N_c, D) normalized
  image_tokens: np.ndarray | None = None  # (N_i, T, W), for the fusion encoder
  text_hidden: np.ndarray | None = None   # (N_c, L, W)


def encode_split(model: Student, params, split: EvalSplit, batch_size: int, mesh: Mesh,
                 keep_tokens: bool) -> Encoded:
  """Embeddings of every test image and caption (plus token states if `keep_tokens`)."""
  apply = functools.partial(model.apply, {"params": params})

  def image_fn(image):
    tokens, emb = apply(augment.to_float(image), method=Student.encode_image)
    return {"emb": emb, "states": tokens} if keep_tokens else {"emb": emb}

  def text_fn(ids, mask):
    hidden, emb = apply(ids, mask, method=Student.encode_text)
    return {"emb": emb, "states": hidden} if keep_tokens else {"emb": emb}

  images = sharding.map_in_batches(jax.jit(image_fn), len(split.images),
                                   lambda i: {"image": split.images[i]}, batch_size, mesh)
  texts = sharding.map_in_batches(jax.jit(text_fn), len(split.ids),
                                  lambda i: {"ids": split.ids[i], "mask": split.mask[i]},
                                  batch_size, mesh)
  return Encoded(images["emb"], texts["emb"], images.get("states"), texts.get("states"))


def itm_logits(model: Student, params, encoded: Encoded, split: EvalSplit, image_index: np.ndarray,
               text_index: np.ndarray, batch_size: int, mesh: Mesh) -> np.ndarray:
  """Positive ITM logit of each (image_index[p], text_index[p]) pair, sharded in batches."""
  apply = functools.partial(model.apply, {"params": params})

  def pair_fn(image_tokens, text_hidden, mask):
    fused = apply(text_hidden, mask, image_tokens, method=Student.fuse)
    return apply(fused, method=Student.itm_logits)[:, 1]

  def rows(p):
    return {"image_tokens": encoded.image_tokens[image_index[p]],
            "text_hidden": encoded.text_hidden[text_index[p]], "mask": split.mask[text_index[p]]}

  return sharding.map_in_batches(jax.jit(pair_fn), len(image_index), rows, batch_size, mesh)


def itm_rerank(model: Student, params, encoded: Encoded, split: EvalSplit, itc_i2t: np.ndarray,
               k: int, batch_size: int, mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """The reference's scores: each query's ITC top-k re-scored by the ITM head, −100 elsewhere.

  Returns (i2t (N_i, N_c), t2i (N_c, N_i)).
  """
  num_images, num_texts = itc_i2t.shape
  score = functools.partial(itm_logits, model, params, encoded, split, batch_size=batch_size,
                            mesh=mesh)
  k_texts, k_images = min(k, num_texts), min(k, num_images)
  texts_of_image = ranking.top_k_indices(itc_i2t, k_texts)
  i2t = score(np.repeat(np.arange(num_images), k_texts), texts_of_image.ravel())
  images_of_text = ranking.top_k_indices(itc_i2t.T, k_images)
  t2i = score(images_of_text.ravel(), np.repeat(np.arange(num_texts), k_images))
  return (ranking.itm_rerank_scores(itc_i2t, texts_of_image, i2t.reshape(num_images, k_texts)),
          ranking.itm_rerank_scores(itc_i2t.T, images_of_text, t2i.reshape(num_texts, k_images)))


def split_relevance(split: EvalSplit, cache_dir: str | None) -> np.ndarray:
  """ROUGE-L relevance (N_c, N_i) of every caption against every image's captions (cached)."""
  return rouge.relevance_matrix(list(split.captions), split.references(), cache_dir)


def recall_curves(itc_i2t: np.ndarray, text_to_image: np.ndarray,
                  reranked: tuple[np.ndarray, np.ndarray] | None = None, itm_k: int = 0,
                  ks: tuple[int, ...] = CURVE_KS) -> dict:
  """Recall@K curves in percent: {"ks": ks, "itc": {"i2t": [...], "t2i": [...]}} from the ITC
  cosines at every K in `ks`; with `reranked` = (i2t, t2i), the re-ranked matrices of the ITC
  top-`itm_k`, also "itm": {"i2t", "t2i", "max_k": itm_k} at the Ks up to max_k only: beyond it the
  positives outside the candidates tie at the fill, and the optimistic tie rule would count them as
  hits."""
  def curve(i2t, t2i, curve_ks):
    recall = ranking.recall_at_k(i2t, t2i, text_to_image, ks=curve_ks)
    return {d: [recall[f"{d}_r{k}"] for k in curve_ks] for d in ("i2t", "t2i")}
  curves = {"ks": list(ks), "itc": curve(itc_i2t, itc_i2t.T, ks)}
  if reranked is not None:
    curves["itm"] = {**curve(*reranked, [k for k in ks if k <= itm_k]), "max_k": itm_k}
  return curves


def metric_names() -> set[str]:
  """Every numeric key `evaluate` can return (the "itm/" ones only with ITM re-ranking)."""
  recall = [f"{d}_r{k}" for d in ("i2t", "t2i") for k in ranking.RECALL_KS] + ["rsum", "r_mean"]
  single = [f"{p}{rule}_ndcg@{k}" for p in ("i2i", "t2t") for k in ranking.NDCG_KS
            for rule in ("", *(f"_{r}" for r in ranking.SELF_RULES))]
  mixed = [f"mixed{mode}{part}_ndcg@{k}" for mode in ("", "_faithful") for part in ("", "_img", "_txt")
           for k in ranking.NDCG_KS]
  return {f"{prefix}{name}" for prefix in ("", "itc/", "itm/") for name in recall} | {
      *single, *mixed}


def evaluate(model: Student, params, split: EvalSplit, relevance: np.ndarray, *, itm_k: int,
             batch_size: int, mesh: Mesh,
             single_modal_self: str = "zeroed") -> tuple[dict[str, float], dict]:
  """Every protocol on `split`.

  Returns (metrics, `recall_curves`). Unprefixed recall keys use the reference's scores (ITM
  re-ranking when the student has an ITM head and itm_k > 0, else ITC cosine); "itc/..." and
  "itm/..." keep both. NDCG keys:
  - i2i_ndcg@K, t2t_ndcg@K (the headline): the query itself under `single_modal_self`, "zeroed"
    (the reference) or "removed" (the fix), recorded as metrics["single_modal_self"];
    i2i_zeroed_ndcg@K, i2i_removed_ndcg@K and their t2t counterparts hold both;
  - mixed_ndcg@K: calibrated (the fix), with its image/text-query parts mixed_img_ndcg@K and
    mixed_txt_ndcg@K; mixed_faithful_ndcg@K (and parts): the reference's arithmetic.
  """
  if single_modal_self not in ranking.SELF_RULES:
    raise InputError(f"single_modal_self is {single_modal_self!r}; expected one of "
                     f"{ranking.SELF_RULES}")
  ranking.check_captions_per_image(split.text_to_image, len(split.images))
  rerank = not model.config.dual_encoder and itm_k > 0
  encoded = encode_split(model, params, split, batch_size, mesh, keep_tokens=rerank)
  itc_i2t = encoded.image_emb @ encoded.text_emb.T
  t2i_index = split.text_to_image
  metrics = {f"itc/{k}": v for k, v in ranking.recall_at_k(itc_i2t, itc_i2t.T, t2i_index).items()}
  i2t, t2i = itc_i2t, itc_i2t.T
  if rerank:
    i2t, t2i = itm_rerank(model, params, encoded, split, itc_i2t, itm_k, batch_size, mesh)
    metrics.update({f"itm/{k}": v for k, v in ranking.recall_at_k(i2t, t2i, t2i_index).items()})
  metrics.update(ranking.recall_at_k(i2t, t2i, t2i_index))
  metrics["score_mode"] = "itm" if rerank else "itc"

  first = split.image_to_texts[:, 0]
  for rule in ranking.SELF_RULES:
    single = {**ranking.i2i_ndcg(encoded.image_emb, relevance, first, self_rule=rule),
              **ranking.t2t_ndcg(encoded.text_emb, relevance, first, t2i_index, self_rule=rule)}
    metrics.update({k.replace("_ndcg", f"_{rule}_ndcg"): v for k, v in single.items()})
    if rule == single_modal_self:
      metrics.update(single)
  metrics["single_modal_self"] = single_modal_self
  metrics.update(ranking.mixed_ndcg(encoded.image_emb, encoded.text_emb, relevance, first,
                                    t2i_index, mode="calibrated"))
  faithful = ranking.mixed_ndcg(encoded.image_emb, encoded.text_emb, relevance, first, t2i_index,
                                mode="faithful", i2t_scores=i2t, t2i_scores=t2i)
  metrics.update({k.replace("mixed", "mixed_faithful", 1): v for k, v in faithful.items()})
  return metrics, recall_curves(itc_i2t, t2i_index, (i2t, t2i) if rerank else None, itm_k)
