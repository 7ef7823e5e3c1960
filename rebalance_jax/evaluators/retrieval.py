"""The paper's evaluation protocols (docs/method.md §7) for any model with the predict contract.

Embeddings are extracted sharded over every device and process, and only they (N x D) come to the
host, where scores and metrics are computed with the pure functions of `ranking`. Token states
stay sharded on the devices: ITM re-ranking sends each query's ITC top-k candidate indices to the
devices, which gather the states and score the pairs in blocks, each process supplying its share
of each block. Protocols: cross-modal recall with ITC cosine scores and, for a model with a
matching head, the reference's ITM re-ranking of the ITC top-k; single-modal (i2i, t2t) NDCG with
the query itself zeroed (the reference) and removed (the fix); mixed NDCG in its `faithful` and
`calibrated` modes; all with ROUGE-L relevance.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rebalance_jax.data import pipeline
from rebalance_jax.data.sources import Split
from rebalance_jax.evaluators import ranking, rouge
from rebalance_jax.evaluators.predict import Predictor
from rebalance_jax.infra import interrupts, sharding
from rebalance_jax.infra.errors import InputError

CURVE_KS = tuple(range(1, 51))  # recall@K curves


@dataclasses.dataclass(frozen=True)
class Encoded:
  """One modality of a split: host embeddings, and device states (rows padded to whole batches)."""
  emb: np.ndarray                        # (N, D) normalized
  states: dict[str, jax.Array] | None    # {"tokens", "mask"} sharded over rows, for matching


def gather_rows(states: jax.Array, index: jax.Array, mesh: Mesh) -> jax.Array:
  """states[index] for row-sharded `states` and batch-sharded `index`, without moving `states`:
  each device looks up the indices that fall in its own rows (zeros elsewhere), and a
  reduce-scatter hands every device the rows of its share of `index`."""
  axes = mesh.axis_names

  def local(shard, local_index):
    index = jax.lax.all_gather(local_index, axes, tiled=True)
    rows = shard.shape[0]
    relative = index - jax.lax.axis_index(axes) * rows
    mine = (relative >= 0) & (relative < rows)
    found = shard[jnp.clip(relative, 0, rows - 1)]
    found = jnp.where(mine.reshape((-1,) + (1,) * (found.ndim - 1)), found,
                      jnp.zeros_like(found))
    return jax.lax.psum_scatter(found, axes, scatter_dimension=0, tiled=True)

  return jax.shard_map(local, mesh=mesh, in_specs=(P(axes), P(axes)), out_specs=P(axes))(
      states, index)


def _concatenate_on_device(parts: list[jax.Array], mesh: Mesh) -> jax.Array:
  return jax.jit(lambda *xs: jnp.concatenate(xs), out_shardings=sharding.batch_sharding(mesh))(
      *parts)


def encode(fn, params, num_rows: int, load_rows, batch_size: int, mesh: Mesh,
           keep_states: bool) -> Encoded:
  """`fn(params, *rows.values())` over rows 0..num_rows-1 in padded global batches: embeddings
  gathered to the host, token states (if `keep_states`) kept on the devices."""
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  jitted = _embedding_fn(fn, keep_states)
  embeddings, states = [], []
  for _, rows, _ in pipeline.padded_batches(num_rows, batch_size):
    interrupts.check("an evaluation pass")
    out = jitted(params, *sharding.to_global(load_rows(rows), mesh).values())
    embeddings.append(multihost_utils.process_allgather(out["emb"], tiled=True))
    if keep_states:
      states.append({k: out[k] for k in ("tokens", "mask")})
  kept = None
  if keep_states:
    kept = {k: _concatenate_on_device([s[k] for s in states], mesh) for k in ("tokens", "mask")}
  return Encoded(np.concatenate(embeddings)[:num_rows], kept)


@functools.lru_cache(maxsize=16)
def _embedding_fn(fn, keep_states: bool):
  """`fn` jitted, keeping only the embeddings unless `keep_states`: cached, so that every
  evaluation of a run reuses one trace and compilation."""
  return jax.jit(fn if keep_states else lambda params, *rows: {"emb": fn(params, *rows)["emb"]})


def encode_split(predictor: Predictor, params, split: Split, batch_size: int, mesh: Mesh,
                 keep_states: bool) -> tuple[Encoded | None, Encoded | None]:
  """(images, captions) of `split` through the predictor (None for a modality it lacks)."""
  images = texts = None
  if predictor.embed_images is not None:
    images = encode(predictor.embed_images, params, split.num_images,
                    pipeline.image_rows(split), batch_size, mesh, keep_states)
  if predictor.embed_texts is not None:
    texts = encode(predictor.embed_texts, params, split.num_captions,
                   pipeline.caption_rows(split, predictor.encode_captions), batch_size, mesh,
                   keep_states)
  return images, texts


@functools.lru_cache(maxsize=8)
def itm_score_fn(predictor: Predictor, mesh: Mesh):
  """The jitted block function of `itm_logits`, (params, image_states, text_states, chunk_images,
  pair_texts) -> logits. A block is one chunk per device: one image (chunk_images, (devices,))
  and its `rows` pairs' texts (pair_texts, (devices · rows,)). Each device gathers its chunk's
  states from where they lie (`gather_rows`) and the fusion encoder computes the image's
  cross-attention keys and values once for the chunk. Cached per predictor and mesh, so repeated
  evaluations reuse its compilation."""
  def score(params, image_states, text_states, chunk_images, pair_texts):
    take = lambda states, index: jax.tree.map(lambda x: gather_rows(x, index, mesh), states)
    i, t = take(image_states, chunk_images), take(text_states, pair_texts)
    rows = pair_texts.shape[0] // chunk_images.shape[0]
    image_index = jnp.zeros((chunk_images.shape[0], rows), jnp.int32)  # each chunk's own image
    return predictor.match_logits(params, i["tokens"], i["mask"], t["tokens"], t["mask"],
                                  image_index)
  return jax.jit(score)


def image_chunks(images: np.ndarray, rows: int) -> tuple[np.ndarray, np.ndarray]:
  """(start, end) of the chunks of pairs sorted by image (`images`, (P,)): runs of at most `rows`
  consecutive pairs of the same image."""
  runs = np.flatnonzero(np.diff(images)) + 1
  run_starts, run_ends = np.concatenate([[0], runs]), np.concatenate([runs, [len(images)]])
  per_run = -(-(run_ends - run_starts) // rows)
  offsets = np.arange(per_run.sum()) - np.repeat(np.cumsum(per_run) - per_run, per_run)
  starts = np.repeat(run_starts, per_run) + rows * offsets
  return starts, np.minimum(starts + rows, np.repeat(run_ends, per_run))


def itm_logits(predictor: Predictor, params, images: Encoded, texts: Encoded,
               image_index: np.ndarray, text_index: np.ndarray, batch_size: int,
               mesh: Mesh) -> np.ndarray:
  """Matching logit of each (image_index[p], text_index[p]) pair. The pairs are scored sorted by
  image, in chunks of one image and up to batch_size / devices pairs, one chunk per device in
  each block, so that an image's keys and values are computed once per chunk; only the indices
  go to the devices, which gather the states from where they lie (`itm_score_fn`)."""
  devices = mesh.devices.size
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  rows = batch_size // devices
  order = np.argsort(image_index, kind="stable")
  sorted_images, sorted_texts = image_index[order], text_index[order]
  starts, ends = image_chunks(sorted_images, rows)
  mine = sharding.process_slice(devices)
  jitted = itm_score_fn(predictor, mesh)
  sorted_logits = np.zeros(len(order), np.float32)
  for first in range(0, len(starts), devices):
    interrupts.check("ITM re-ranking")
    block = np.arange(first, first + devices)[mine]
    block = np.minimum(block, len(starts) - 1)  # the last block: repeats of its last chunk
    pair = starts[block, None] + np.arange(rows)[None]  # (chunks, rows); past a chunk's end:
    pair = np.minimum(pair, ends[block, None] - 1)      # repeats of its last pair
    inputs = sharding.to_global({"image": sorted_images[starts[block]].astype(np.int32),
                                 "text": sorted_texts[pair].reshape(-1).astype(np.int32)}, mesh)
    out = jitted(params, images.states, texts.states, inputs["image"], inputs["text"])
    out = multihost_utils.process_allgather(out, tiled=True).reshape(devices, rows)
    for c, chunk in enumerate(range(first, min(first + devices, len(starts)))):
      sorted_logits[starts[chunk]:ends[chunk]] = out[c, :ends[chunk] - starts[chunk]]
  logits = np.empty_like(sorted_logits)
  logits[order] = sorted_logits
  return logits


def itm_rerank(predictor: Predictor, params, images: Encoded, texts: Encoded,
               itc_i2t: np.ndarray, k: int, batch_size: int,
               mesh: Mesh) -> tuple[np.ndarray, np.ndarray]:
  """The reference's scores: each query's ITC top-k re-scored by the ITM head, −100 elsewhere.
  A pair among both an image's and a caption's candidates is scored once.

  Returns (i2t (N_i, N_c), t2i (N_c, N_i)).
  """
  num_images, num_texts = itc_i2t.shape
  k_texts, k_images = min(k, num_texts), min(k, num_images)
  texts_of_image = ranking.top_k_indices(itc_i2t, k_texts)
  images_of_text = ranking.top_k_indices(itc_i2t.T, k_images)
  pairs = np.concatenate([np.repeat(np.arange(num_images), k_texts) * num_texts +
                          texts_of_image.ravel(),
                          images_of_text.ravel() * num_texts +
                          np.repeat(np.arange(num_texts), k_images)])
  unique, where = np.unique(pairs, return_inverse=True)
  logits = itm_logits(predictor, params, images, texts, unique // num_texts, unique % num_texts,
                      batch_size, mesh)[where]
  i2t, t2i = logits[:num_images * k_texts], logits[num_images * k_texts:]
  return (ranking.itm_rerank_scores(itc_i2t, texts_of_image, i2t.reshape(num_images, k_texts)),
          ranking.itm_rerank_scores(itc_i2t.T, images_of_text, t2i.reshape(num_texts, k_images)))


def split_relevance(split: Split, cache_dir: str | None) -> np.ndarray:
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


def evaluate(predictor: Predictor, params, split: Split, relevance: np.ndarray, *, itm_k: int,
             batch_size: int, mesh: Mesh,
             single_modal_self: str = "zeroed") -> tuple[dict[str, float], dict | None]:
  """Every protocol of `predictor` on `split`.

  Returns (metrics, `recall_curves`, or None without cross-modal retrieval). Unprefixed recall
  keys use the reference's scores (ITM re-ranking when the predictor has a matching head and
  itm_k > 0, else ITC cosine); "itc/..." and "itm/..." keep both. NDCG keys:
  - i2i_ndcg@K, t2t_ndcg@K (the headline): the query itself under `single_modal_self`, "zeroed"
    (the reference) or "removed" (the fix), recorded as metrics["single_modal_self"];
    i2i_zeroed_ndcg@K, i2i_removed_ndcg@K and their t2t counterparts hold both;
  - mixed_ndcg@K: calibrated (the fix), with its image/text-query parts mixed_img_ndcg@K and
    mixed_txt_ndcg@K; mixed_faithful_ndcg@K (and parts): the reference's arithmetic.
  A predictor with one modality gets that modality's single-modal NDCG only.
  """
  if single_modal_self not in ranking.SELF_RULES:
    raise InputError(f"single_modal_self is {single_modal_self!r}; expected one of "
                     f"{ranking.SELF_RULES}")
  ranking.check_captions_per_image(split.caption_image, split.num_images)
  rerank = predictor.cross_modal and predictor.match_logits is not None and itm_k > 0
  images, texts = encode_split(predictor, params, split, batch_size, mesh, keep_states=rerank)
  t2i_index = split.caption_image
  first = split.image_to_texts[:, 0]
  metrics = {}
  for rule in ranking.SELF_RULES:
    single = {}
    if images is not None:
      single.update(ranking.i2i_ndcg(images.emb, relevance, first, self_rule=rule))
    if texts is not None:
      single.update(ranking.t2t_ndcg(texts.emb, relevance, first, t2i_index, self_rule=rule))
    metrics.update({k.replace("_ndcg", f"_{rule}_ndcg"): v for k, v in single.items()})
    if rule == single_modal_self:
      metrics.update(single)
  metrics["single_modal_self"] = single_modal_self
  if not predictor.cross_modal:
    return metrics, None

  itc_i2t = images.emb @ texts.emb.T
  metrics.update({f"itc/{k}": v for k, v in ranking.recall_at_k(itc_i2t, itc_i2t.T,
                                                                 t2i_index).items()})
  i2t, t2i = itc_i2t, itc_i2t.T
  if rerank:
    i2t, t2i = itm_rerank(predictor, params, images, texts, itc_i2t, itm_k, batch_size, mesh)
    metrics.update({f"itm/{k}": v for k, v in ranking.recall_at_k(i2t, t2i, t2i_index).items()})
  metrics.update(ranking.recall_at_k(i2t, t2i, t2i_index))
  metrics["score_mode"] = "itm" if rerank else "itc"
  metrics.update(ranking.mixed_ndcg(images.emb, texts.emb, relevance, first, t2i_index,
                                    mode="calibrated"))
  faithful = ranking.mixed_ndcg(images.emb, texts.emb, relevance, first, t2i_index,
                                mode="faithful", i2t_scores=i2t, t2i_scores=t2i)
  metrics.update({k.replace("mixed", "mixed_faithful", 1): v for k, v in faithful.items()})
  return metrics, recall_curves(itc_i2t, t2i_index, (i2t, t2i) if rerank else None, itm_k)
