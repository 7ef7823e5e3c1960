"""Tests of the ranking metrics (rebalance_jax.evaluators.ranking) against docs/method.md §7.

Hand-built score matrices with the expected values worked out in comments, plus a plain-loop float64
reference of the NDCG protocols (deliberately naive, so it is obviously the spec) on random data.
"""

import math

import numpy as np
import pytest

from rebalance_jax.evaluators import ranking

LOG2_3 = math.log2(3)

# 3 images, 15 captions, interleaved: captions of image i are i, i+3, ..., i+12.
INTERLEAVED_3 = np.arange(15) % 3


def _correspondence(text_to_image, n_images):
  """(N_i, N_c) 1.0 where caption c belongs to image i."""
  return (text_to_image[None, :] == np.arange(n_images)[:, None]).astype(float)


# ---------------------------------------------------------------- recall

def test_recall_perfect_ranking():
  i2t = _correspondence(INTERLEAVED_3, 3)  # own captions 1, all others 0: every best positive tops
  metrics = ranking.recall_at_k(i2t, i2t.T, INTERLEAVED_3)
  assert all(metrics[f"{d}_r{k}"] == 100.0 for d in ("i2t", "t2i") for k in (1, 5, 10))
  assert metrics["rsum"] == 600.0 and metrics["r_mean"] == 100.0


def test_recall_reversed_ranking():
  i2t = -_correspondence(INTERLEAVED_3, 3)
  metrics = ranking.recall_at_k(i2t, i2t.T, INTERLEAVED_3)
  # An image's own captions (-1) sit below the 10 others (0): rank 10, a miss even at K=10.
  assert [metrics[f"i2t_r{k}"] for k in (1, 5, 10)] == [0.0, 0.0, 0.0]
  # A caption's image (-1) sits below the 2 others (0): rank 2, a hit at K=5 and 10 only.
  assert [metrics[f"t2i_r{k}"] for k in (1, 5, 10)] == [0.0, 100.0, 100.0]
  assert metrics["rsum"] == 200.0 and metrics["r_mean"] == pytest.approx(200.0 / 6)


def test_recall_ties_are_optimistic_with_non_trivial_correspondence():
  text_to_image = np.array([1, 0, 1, 0, 1, 0, 1, 0, 1, 0])  # image 0: odd captions, image 1: even
  i2t = np.zeros((2, 10))
  # Image 0: best positive caption 3 (0.5) below captions 0, 2 (0.9), tied with caption 4 (0.5):
  # rank = #strictly higher = 2 -> miss at K=1, hit at K=5, 10.
  i2t[0, [0, 2, 3, 4]] = [0.9, 0.9, 0.5, 0.5]
  # Image 1: best positive caption 8 (0.7) tied with negative caption 1 (0.7): rank 0, a hit.
  i2t[1, [1, 8]] = [0.7, 0.7]
  # t2i = i2t.T, (own, other) image scores per caption: 0 (0, .9) miss, 1 (0, .7) miss,
  # 2 (0, .9) miss, 3 (.5, 0) hit, 4 (0, .5) miss, 8 (.7, 0) hit, and 5, 6, 7, 9 (0, 0) tied: hits.
  # R@1 = 6/10; with 2 images every caption hits at K=5, 10.
  metrics = ranking.recall_at_k(i2t, i2t.T, text_to_image)
  assert metrics == pytest.approx({"i2t_r1": 50.0, "i2t_r5": 100.0, "i2t_r10": 100.0,
                                   "t2i_r1": 60.0, "t2i_r5": 100.0, "t2i_r10": 100.0,
                                   "rsum": 510.0, "r_mean": 85.0})


def test_recall_checks_shapes_and_captions():
  i2t = _correspondence(INTERLEAVED_3, 3)
  with pytest.raises(ValueError, match="t2i_scores has shape"):
    ranking.recall_at_k(i2t, i2t, INTERLEAVED_3)
  with pytest.raises(ValueError, match="image 2 has 4 captions"):
    ranking.recall_at_k(i2t, i2t.T, np.where(np.arange(15) == 14, 0, INTERLEAVED_3))


# ---------------------------------------------------------------- top-k and ITM re-ranking

def test_top_k_indices_order_and_ties():
  scores = np.array([[0.1, 0.9, 0.5, 0.9, 0.3],
                     [0.5, 0.2, 0.5, 0.5, 0.9]])
  # Row 0: 0.9 (1), 0.9 (3), 0.5 (2). Row 1: 0.9 (4), then the lowest indices among the three 0.5s.
  np.testing.assert_array_equal(ranking.top_k_indices(scores, 3), [[1, 3, 2], [4, 0, 2]])
  many_ties = np.random.default_rng(0).integers(0, 4, size=(40, 25)).astype(float)
  for k in (1, 7, 25):
    np.testing.assert_array_equal(ranking.top_k_indices(many_ties, k),
                                  np.argsort(-many_ties, axis=1, kind="stable")[:, :k])


def test_itm_rerank_scores_places_logits_at_candidates():
  itc = np.random.default_rng(0).normal(size=(2, 5))
  candidates = np.array([[3, 1], [0, 4]])
  logits = np.array([[2.0, 1.5], [0.3, -0.2]])
  np.testing.assert_array_equal(ranking.itm_rerank_scores(itc, candidates, logits),
                                [[-100, 1.5, -100, 2.0, -100],
                                 [0.3, -100, -100, -100, -0.2]])
  assert np.all(ranking.itm_rerank_scores(itc, candidates, logits, fill=-7.0)[:, 2] == -7.0)


# ---------------------------------------------------------------- NDCG

def test_ndcg_hand_computed_graded_relevance():
  relevance = np.array([[3.0, 2.0, 0.0, 1.0]])
  scores = np.array([[0.8, 0.9, 0.1, 0.5]])  # ranking [1, 0, 3, 2]: gains 2, 3, 1, 0
  # DCG@4  = 2/log2(2) + 3/log2(3) + 1/log2(4) + 0/log2(5) = 2 + 1.89279 + 0.5 = 4.39279
  # IDCG@4 = 3/log2(2) + 2/log2(3) + 1/log2(4) + 0/log2(5) = 3 + 1.26186 + 0.5 = 4.76186
  dcg = [2, 2 + 3 / LOG2_3, 2 + 3 / LOG2_3 + 0.5]
  idcg = [3, 3 + 2 / LOG2_3, 3 + 2 / LOG2_3 + 0.5]
  expected = {1: 100 * dcg[0] / idcg[0], 2: 100 * dcg[1] / idcg[1], 4: 100 * dcg[2] / idcg[2],
              10: 100 * dcg[2] / idcg[2]}  # K > G: the whole gallery
  assert ranking.ndcg_at_k(scores, relevance, ks=(1, 2, 4, 10)) == pytest.approx(expected)
  assert expected[4] == pytest.approx(92.2494, abs=1e-4)


def test_ndcg_perfect_and_reversed():
  relevance = np.array([[3.0, 2.0, 1.0, 0.0], [0.0, 0.5, 0.0, 1.0]])
  assert ranking.ndcg_at_k(relevance, relevance, ks=(1, 4)) == pytest.approx({1: 100, 4: 100})
  # Reversed, row 0: gains 0, 1, 2, 3 -> DCG@4 = 1/log2(3) + 2/2 + 3/log2(5) = 2.92296.
  # Row 1: gains 0, 0, 0.5, 1 -> DCG@4 = 0.5/2 + 1/log2(5); IDCG@4 = 1 + 0.5/log2(3).
  row0 = (1 / LOG2_3 + 1 + 3 / math.log2(5)) / (3 + 2 / LOG2_3 + 0.5)
  row1 = (0.25 + 1 / math.log2(5)) / (1 + 0.5 / LOG2_3)
  assert ranking.ndcg_at_k(-relevance, relevance, ks=(1, 4)) == pytest.approx(
      {1: 0.0, 4: 100 * (row0 + row1) / 2})


def test_ndcg_ties_rank_by_gallery_index():
  # All scores equal: the ranking is [0, 1, 2, 3], the relevant item 1 sits at rank 1.
  # NDCG@1 = 0; NDCG@4 = (1/log2(3)) / 1 = 63.093.
  result = ranking.ndcg_at_k(np.zeros((1, 4)), np.array([[0.0, 1.0, 0.0, 0.0]]), ks=(1, 4))
  assert result == pytest.approx({1: 0.0, 4: 100 / LOG2_3})


def test_ndcg_query_without_relevant_items_counts_zero():
  relevance = np.array([[1.0, 0.0, 0.0], [0.0, 0.0, 0.0]])  # query 1: IDCG = 0 -> NDCG 0
  scores = np.array([[0.9, 0.1, 0.0], [0.3, 0.2, 0.1]])
  assert ranking.ndcg_at_k(scores, relevance, ks=(2,)) == pytest.approx({2: 50.0})


def test_ndcg_exclusion_removes_item_from_ranking_and_ideal():
  scores = np.array([[0.9, 0.1, 0.5]])
  relevance = np.array([[5.0, 1.0, 0.0]])
  exclude = np.array([[True, False, False]])
  # Without item 0: ranking [2, 1], gains 0, 1 -> DCG@2 = 1/log2(3); IDCG@2 = 1 (not 5 + ...).
  assert ranking.ndcg_at_k(scores, relevance, ks=(1, 2, 3), exclude=exclude) == pytest.approx(
      {1: 0.0, 2: 100 / LOG2_3, 3: 100 / LOG2_3})


def test_ndcg_partial_last_block_matches_one_block():
  rng = np.random.default_rng(1)
  scores, relevance = rng.normal(size=(7, 30)), rng.uniform(size=(7, 30))
  exclude = rng.uniform(size=(7, 30)) < 0.2
  one_block = ranking.ndcg_at_k(scores, relevance, ks=(1, 5, 50), exclude=exclude, block=100)
  assert ranking.ndcg_at_k(scores, relevance, ks=(1, 5, 50), exclude=exclude,
                           block=3) == pytest.approx(one_block)  # blocks of 3, 3, 1


# ---------------------------------------------------------------- single-modal protocols

STANDARD_2 = np.repeat(np.arange(2), 5)  # captions 0-4: image 0, 5-9: image 1
STANDARD_3 = np.repeat(np.arange(3), 5)  # caption 5i is image i's first
FIRST_3 = np.array([0, 5, 10])
A = 1 / LOG2_3  # the discount of rank 1


def test_i2i_removed_self_uses_first_caption_relevance():
  image_emb = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 1.0]])
  # Cosines by query: 0 -> (1: 0.6, 2: 0.0); 1 -> (0: 0.6, 2: 0.8); 2 -> (0: 0.0, 1: 0.8).
  # Rankings without self: 0 -> [1, 2], 1 -> [2, 0], 2 -> [1, 0].
  first_caption = np.array([12, 4, 0])
  rel = np.full((15, 3), 9.0)  # rows other than the first captions must not be read
  rel[first_caption] = [[0.0, 0.5, 0.2],   # query 0: gains 0.5, 0.2: ideal
                        [0.3, 0.0, 0.6],   # query 1: gains 0.6, 0.3: ideal
                        [0.1, 0.4, 0.0]]   # query 2: gains 0.4, 0.1: ideal
  # Self scores highest (cosine 1) with relevance 0: ranked, it would make every NDCG@1 0.
  assert ranking.i2i_ndcg(image_emb, rel, first_caption, ks=(1, 2),
                          self_rule="removed") == pytest.approx(
      {"i2i_ndcg@1": 100.0, "i2i_ndcg@2": 100.0})


def test_t2t_removed_self_uses_query_image_column():
  text_emb = np.random.default_rng(2).normal(size=(10, 4))
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  first_caption = np.array([0, 5])
  # rel[c, i] = 1 for every caption c but the query itself; the other column is 0. Any ranking of
  # the 9 other captions is ideal, so NDCG = 100 iff the query (cosine 1, relevance 0) is excluded
  # and the relevance is read from column i.
  rel = np.ones((10, 2))
  rel[first_caption, [0, 1]] = 0.0
  assert ranking.t2t_ndcg(text_emb, rel, first_caption, STANDARD_2, ks=(1, 9),
                          self_rule="removed") == pytest.approx(
      {"t2t_ndcg@1": 100.0, "t2t_ndcg@9": 100.0})


def test_i2i_zeroed_self_takes_a_top_slot_without_gain():
  image_emb = np.array([[1.0, 0.0], [-0.6, 0.8], [-0.6, -0.8]])
  # Cosines: (0, 1) = (0, 2) = -0.6, (1, 2) = -0.28: all below the zeroed self score 0, so every
  # query ranks itself first: 0 -> [0, 1, 2], 1 -> [1, 2, 0], 2 -> [2, 1, 0].
  rel = np.zeros((15, 3))
  rel[FIRST_3] = [[0.9, 0.5, 0.2],   # the self relevances 0.9 are zeroed: out of the IDCG too
                  [0.3, 0.9, 0.6],
                  [0.1, 0.4, 0.9]]
  # Zeroed, NDCG@1 = 0 for all. NDCG@2: query 0 gains (0, 0.5) -> 0.5A / (0.5 + 0.2A);
  # query 1 (0, 0.6) -> 0.6A / (0.6 + 0.3A); query 2 (0, 0.4) -> 0.4A / (0.4 + 0.1A).
  # NDCG@3: query 0 (0, 0.5, 0.2) -> (0.5A + 0.2/2) / (0.5 + 0.2A); query 1 (0, 0.6, 0.3) ->
  # (0.6A + 0.15) / (0.6 + 0.3A); query 2 (0, 0.4, 0.1) -> (0.4A + 0.05) / (0.4 + 0.1A).
  at_2 = [0.5 * A / (0.5 + 0.2 * A), 0.6 * A / (0.6 + 0.3 * A), 0.4 * A / (0.4 + 0.1 * A)]
  at_3 = [(0.5 * A + 0.1) / (0.5 + 0.2 * A), (0.6 * A + 0.15) / (0.6 + 0.3 * A),
          (0.4 * A + 0.05) / (0.4 + 0.1 * A)]
  assert ranking.i2i_ndcg(image_emb, rel, FIRST_3, ks=(1, 2, 3)) == pytest.approx(
      {"i2i_ndcg@1": 0.0, "i2i_ndcg@2": 100 * np.mean(at_2), "i2i_ndcg@3": 100 * np.mean(at_3)})
  assert np.mean(at_2) == pytest.approx(0.5095, abs=1e-4)  # (0.5038 + 0.4796 + 0.5450) / 3
  # Removed: 0 -> [1, 2], 1 -> [2, 0], 2 -> [1, 0] rank the gains in their ideal order.
  assert ranking.i2i_ndcg(image_emb, rel, FIRST_3, ks=(1, 2), self_rule="removed") == (
      pytest.approx({"i2i_ndcg@1": 100.0, "i2i_ndcg@2": 100.0}))


def test_t2t_zeroed_self_takes_a_top_slot_without_gain():
  text_emb = np.tile([-0.6, -0.8], (15, 1))
  text_emb[0] = [1.0, 0.0]  # query 0: cosine -0.6 with every other caption, below its zeroed self
  rel = np.zeros((15, 3))
  rel[[0, 1], 0] = [0.9, 1.0]  # queries 5 and 10 have no relevant caption: NDCG 0
  # Query 0, zeroed: [0, 1, 2, ...], gains (0, 1) -> NDCG@1 0, NDCG@2 A / 1. Removed: caption 1
  # (relevance 1) first -> 1 and 1.
  def t2t(self_rule):
    return ranking.t2t_ndcg(text_emb, rel, FIRST_3, STANDARD_3, ks=(1, 2), self_rule=self_rule)
  assert t2t("zeroed") == pytest.approx({"t2t_ndcg@1": 0.0, "t2t_ndcg@2": 100 * A / 3})
  assert t2t("removed") == pytest.approx({"t2t_ndcg@1": 100 / 3, "t2t_ndcg@2": 100 / 3})


def test_single_modal_rejects_unknown_self_rule():
  with pytest.raises(ValueError, match="self_rule"):
    ranking.i2i_ndcg(np.eye(3), np.ones((15, 3)), FIRST_3, self_rule="kept")


# ---------------------------------------------------------------- mixed protocol

def test_mixed_calibrated_scores_everything_by_cosine_without_self():
  image_emb = np.eye(4)[:2]                  # images e0, e1
  text_emb = np.tile(np.eye(4)[3], (10, 1))  # captions 1-9: e3
  text_emb[0] = [0.8, 0.6, 0.0, 0.0]         # caption 0: cos 0.8 with image 0, 0.6 with image 1
  rel = np.zeros((10, 2))
  rel[0, 1] = 1.0  # the only relevance: caption 0 against image 1's references
  # NDCG@1 is 1 if a query's top item is relevant (IDCG@1 = 1 for every query here).
  # Image query 0 (relevant: image 1, cos 0): top = caption 0 (0.8) -> 0.
  # Image query 1 (relevant: caption 0): top = caption 0 (0.6) -> 1.
  # Text query 0 (relevant: image 1, cos 0.6): top = image 0 (0.8) -> 0.
  # Text query 5 (relevant: caption 0, cos 0): top = caption 1 (cos 1, lowest index) -> 0.
  assert ranking.mixed_ndcg(image_emb, text_emb, rel, np.array([0, 5]), STANDARD_2, ks=(1,),
                            mode="calibrated") == pytest.approx(
      {"mixed_img_ndcg@1": 50.0, "mixed_txt_ndcg@1": 0.0, "mixed_ndcg@1": 25.0})


def _faithful(rel, i2t=None, t2i=None, ks=(1,)):
  """Faithful mixed NDCG on 3 images and 15 captions whose cosines are 1 with themselves and 0
  with the others of their modality; cross-modal scores -100 unless given."""
  return ranking.mixed_ndcg(np.eye(3), np.eye(15), rel, FIRST_3, STANDARD_3, ks=ks,
                            mode="faithful",
                            i2t_scores=np.full((3, 15), -100.0) if i2t is None else i2t,
                            t2i_scores=np.full((15, 3), -100.0) if t2i is None else t2i)


def test_mixed_faithful_ranks_the_query_itself():
  rel = np.zeros((15, 3))
  rel[0, [0, 1]] = [0.6, 0.8]  # caption 0 (image 0's first) against images 0 and 1
  # Every query ranks itself first (cosine 1), then its modality by index, then the other at -100.
  # Image query 0: images 0, 1, 2 (relevance rel[0, j]: 0.6, 0.8, 0), then captions (rel[c, 0]:
  #   caption 0 0.6). @1: 0.6 / 0.8; @2: (0.6 + 0.8A) / (0.8 + 0.6A). Without self: 1 and 1.
  # Image query 1: images 1, 0, 2 (rel[5, j] = 0), captions (rel[c, 1]: caption 0 0.8) -> 0, 0.
  # Text query 0: captions 0, 1, ... (rel[c, 0]: caption 0 0.6), then images (rel[5a, 0]: image 0
  #   0.6). @1: 0.6 / 0.6 = 1; @2: gains (0.6, 0) / ideal (0.6, 0.6) = 1 / (1 + A).
  #   Without self: 0, 0.
  # Text query 5: captions 5 (rel[5, 1] = 0), 0 (rel[0, 1] = 0.8), ...; images (rel[5a, 1]: image 0
  #   0.8). @1: 0; @2: 0.8A / (0.8 + 0.8A) = A / (1 + A). Without self: 1, 1.
  # Image query 2, text query 10: no relevant item -> 0.
  img = [0.75 / 3, (0.6 + 0.8 * A) / (0.8 + 0.6 * A) / 3]
  txt = [1 / 3, (1 / (1 + A) + A / (1 + A)) / 3]
  assert _faithful(rel, ks=(1, 2)) == pytest.approx(
      {"mixed_img_ndcg@1": 100 * img[0], "mixed_txt_ndcg@1": 100 * txt[0],
       "mixed_ndcg@1": 50 * (img[0] + txt[0]), "mixed_img_ndcg@2": 100 * img[1],
       "mixed_txt_ndcg@2": 100 * txt[1], "mixed_ndcg@2": 50 * (img[1] + txt[1])})
  assert 100 * img[1] == pytest.approx(31.2456, abs=1e-4)  # 1.10474 / 1.17856 / 3


def test_mixed_faithful_text_query_scores_image_a_by_its_first_captions_row():
  rel = np.zeros((15, 3))
  rel[10, 0] = 1.0  # caption 10 (image 2's first) against image 0
  t2i = np.full((15, 3), -100.0)
  t2i[10, 0] = 5.0  # caption 10 scored image 0
  t2i[0, 1] = 4.0   # caption 0 scored image 1
  # Text query 0: image a is scored t2i[5a, 0]: image 2 gets 5 and tops the captions (cosines <= 1);
  #   its relevance rel[10, 0] = 1 = IDCG@1 -> 1. The row t2i[0, a] would put image 1 (4,
  #   relevance rel[5, 0] = 0) first -> 0.
  # Text query 5: images t2i[5a, 1]: image 0 (4) first, but nothing in its row is relevant -> 0.
  # Text query 10: captions first (self, rel[10, 2] = 0), images at -100 -> 0.
  # Image queries: their own image first, relevance rel[5i, i] = 0 -> 0.
  assert _faithful(rel, t2i=t2i) == pytest.approx(
      {"mixed_img_ndcg@1": 0.0, "mixed_txt_ndcg@1": 100 / 3, "mixed_ndcg@1": 100 / 6})


def test_mixed_faithful_text_query_reads_image_relevance_transposed():
  rel = np.zeros((15, 3))
  rel[5, 0] = 1.0  # caption 5 (image 1's first) against image 0; rel[0, 1] stays 0
  t2i = np.full((15, 3), -100.0)
  t2i[5, 0] = 5.0  # text query 0 ranks image 1 first (t2i[5a, 0], a = 1)
  # Text query 0: image 1 first with relevance rel[5a, i] = rel[5, 0] = 1 = IDCG@1 -> 1;
  #   the untransposed rel[0, 1] = 0 would give 0.
  # Text query 5: images at -100 (t2i[5a, 1]), self first (rel[5, 1] = 0) -> 0; so would it with
  #   the untransposed relevance, whose rel[5, 0] = 1 then belongs to image 0 in this row.
  # Image query 0: self (rel[0, 0] = 0) first -> 0. Image query 1: self (rel[5, 1] = 0) first,
  #   image 0 (rel[5, 0] = 1) second -> 0. Image query 2 and text query 10: nothing relevant.
  assert _faithful(rel, t2i=t2i) == pytest.approx(
      {"mixed_img_ndcg@1": 0.0, "mixed_txt_ndcg@1": 100 / 3, "mixed_ndcg@1": 100 / 6})
  # Image 1 scored 1, tied with text query 0's own cosine: the captions come first in the row, so
  # the query itself (rel[0, 0] = 0) wins the tie -> 0.
  t2i[5, 0] = 1.0
  assert _faithful(rel, t2i=t2i)["mixed_txt_ndcg@1"] == 0.0


def test_mixed_faithful_image_query_reads_i2t_row():
  rel = np.zeros((15, 3))
  rel[3, 0] = 1.0  # caption 3 (of image 0) against image 0
  i2t = np.full((3, 15), -100.0)
  i2t[0, 3] = 2.0  # image 0's re-ranking scored caption 3 above every cosine
  # Image query 0: caption 3 (2) first, relevance rel[3, 0] = 1 -> 1. Text query 0: caption 0
  #   (self, rel[0, 0] = 0) first -> 0. All other queries have nothing relevant.
  assert _faithful(rel, i2t=i2t) == pytest.approx(
      {"mixed_img_ndcg@1": 100 / 3, "mixed_txt_ndcg@1": 0.0, "mixed_ndcg@1": 100 / 6})


def test_mixed_rejects_bad_mode_and_missing_scores():
  image_emb, text_emb, rel, first_caption, text_to_image = _random_split(seed=4)
  with pytest.raises(ValueError, match="mode"):
    ranking.mixed_ndcg(image_emb, text_emb, rel, first_caption, text_to_image, mode="other")
  with pytest.raises(ValueError, match="i2t_scores"):
    ranking.mixed_ndcg(image_emb, text_emb, rel, first_caption, text_to_image, mode="faithful")
  with pytest.raises(ValueError, match=r"t2i_scores of shape \(20, 4\)"):
    ranking.mixed_ndcg(image_emb, text_emb, rel, first_caption, text_to_image, mode="faithful",
                       i2t_scores=np.zeros((4, 20)), t2i_scores=np.zeros((4, 20)))


# ---------------------------------------------------------------- plain-loop reference

def _random_split(seed, n_images=4, dim=8):
  """Normalized embeddings, relevance, and a shuffled 5-captions-per-image correspondence."""
  rng = np.random.default_rng(seed)
  text_to_image = rng.permutation(np.repeat(np.arange(n_images), 5))
  first_caption = np.array([np.flatnonzero(text_to_image == i)[0] for i in range(n_images)])
  image_emb, text_emb = rng.normal(size=(n_images, dim)), rng.normal(size=(5 * n_images, dim))
  image_emb /= np.linalg.norm(image_emb, axis=1, keepdims=True)
  text_emb /= np.linalg.norm(text_emb, axis=1, keepdims=True)
  rel = rng.uniform(size=(5 * n_images, n_images))
  rel[rng.uniform(size=rel.shape) < 0.4] = 0.0  # many irrelevant pairs
  return image_emb, text_emb, rel, first_caption, text_to_image


def _loop_ndcg(gallery, k):
  """gallery: list of (score, gallery position, relevance), the query already left out."""
  ranked = sorted(gallery, key=lambda item: (-item[0], item[1]))
  dcg = sum(item[2] / math.log2(r + 2) for r, item in enumerate(ranked[:k]))
  ideal = sorted((item[2] for item in gallery), reverse=True)
  idcg = sum(g / math.log2(r + 2) for r, g in enumerate(ideal[:k]))
  return dcg / idcg if idcg > 0 else 0.0


def _loop_calibrated(image_emb, text_emb, rel, first_caption, i, k, text_query):
  """NDCG@k of image i's (or its first caption's) query: images then captions, all by cosine,
  the query left out."""
  q = first_caption[i]
  query = text_emb[q] if text_query else image_emb[i]
  gallery = [(float(query @ image_emb[j]), j, rel[q, j]) for j in range(len(image_emb))
             if text_query or j != i]
  gallery += [(float(query @ text_emb[c]), len(image_emb) + c, rel[c, i])
              for c in range(len(text_emb)) if not text_query or c != q]
  return _loop_ndcg(gallery, k)


def _loop_faithful(image_emb, text_emb, rel, first_caption, i2t, t2i, i, k, text_query):
  """The reference's row for image i's (or its first caption's) query, the query included."""
  n_images, n_captions, q = len(image_emb), len(text_emb), first_caption[i]
  if text_query:  # captions, then images scored and judged through their own first caption
    gallery = [(float(text_emb[q] @ text_emb[c]), c, rel[c, i]) for c in range(n_captions)]
    gallery += [(t2i[first_caption[a], i], n_captions + a, rel[first_caption[a], i])
                for a in range(n_images)]
  else:
    gallery = [(float(image_emb[i] @ image_emb[j]), j, rel[q, j]) for j in range(n_images)]
    gallery += [(i2t[i, c], n_images + c, rel[c, i]) for c in range(n_captions)]
  return _loop_ndcg(gallery, k)


@pytest.mark.parametrize("mode", ["calibrated", "faithful"])
def test_mixed_matches_loop_reference(mode):
  image_emb, text_emb, rel, first_caption, text_to_image = _random_split(seed=5, n_images=5)
  itc = image_emb @ text_emb.T
  rng = np.random.default_rng(6)
  texts_of_image = np.argsort(-itc, axis=1)[:, :3]
  images_of_text = np.argsort(-itc.T, axis=1)[:, :2]
  i2t = ranking.itm_rerank_scores(itc, texts_of_image, rng.normal(size=texts_of_image.shape))
  t2i = ranking.itm_rerank_scores(itc.T, images_of_text, rng.normal(size=images_of_text.shape))
  ks = (1, 5, 10, 50)
  result = ranking.mixed_ndcg(image_emb, text_emb, rel, first_caption, text_to_image, ks=ks,
                              mode=mode, i2t_scores=i2t, t2i_scores=t2i, block=2)
  for k in ks:
    def loop(text_query, k=k):
      if mode == "faithful":
        return [_loop_faithful(image_emb, text_emb, rel, first_caption, i2t, t2i, i, k, text_query)
                for i in range(5)]
      return [_loop_calibrated(image_emb, text_emb, rel, first_caption, i, k, text_query)
              for i in range(5)]
    img, txt = 100 * np.mean(loop(False)), 100 * np.mean(loop(True))
    assert result[f"mixed_img_ndcg@{k}"] == pytest.approx(img)
    assert result[f"mixed_txt_ndcg@{k}"] == pytest.approx(txt)
    assert result[f"mixed_ndcg@{k}"] == pytest.approx((img + txt) / 2)


@pytest.mark.parametrize("self_rule", ["zeroed", "removed"])
def test_single_modal_match_loop_reference(self_rule):
  image_emb, text_emb, rel, first_caption, text_to_image = _random_split(seed=7, n_images=6)
  ks = (1, 3, 50)
  i2i = ranking.i2i_ndcg(image_emb, rel, first_caption, ks=ks, self_rule=self_rule, block=4)
  t2t = ranking.t2t_ndcg(text_emb, rel, first_caption, text_to_image, ks=ks, self_rule=self_rule,
                         block=4)

  def gallery(scores, relevance, own):
    """The query's own item zeroed (score and relevance 0) or left out."""
    if self_rule == "zeroed":
      return [(0.0, g, 0.0) if g == own else (s, g, r)
              for g, (s, r) in enumerate(zip(scores, relevance))]
    return [(s, g, r) for g, (s, r) in enumerate(zip(scores, relevance)) if g != own]
  for k in ks:
    assert i2i[f"i2i_ndcg@{k}"] == pytest.approx(100 * np.mean([_loop_ndcg(gallery(
        [float(image_emb[i] @ image_emb[j]) for j in range(6)], rel[first_caption[i]], i), k)
        for i in range(6)]))
    assert t2t[f"t2t_ndcg@{k}"] == pytest.approx(100 * np.mean([_loop_ndcg(gallery(
        [float(text_emb[first_caption[i]] @ text_emb[c]) for c in range(30)], rel[:, i],
        first_caption[i]), k) for i in range(6)]))


# ---------------------------------------------------------------- validation

def test_fewer_than_five_captions_is_an_error():
  text_to_image = np.repeat(np.arange(10), 5)
  text_to_image[[35, 36]] = 0  # image 7 keeps captions 37, 38, 39
  with pytest.raises(ValueError, match="image 7 has 3 captions; every test image needs 5"):
    ranking.check_captions_per_image(text_to_image, 10)
  ranking.check_captions_per_image(np.repeat(np.arange(10), 5), 10)
  with pytest.raises(ValueError, match="image 1 has 4 captions"):
    ranking.t2t_ndcg(np.eye(10), np.ones((10, 2)), np.array([0, 5]), np.array([0] * 6 + [1] * 4))
  with pytest.raises(ValueError, match="first caption 5 of image 0 belongs to image 1"):
    ranking.t2t_ndcg(np.eye(10), np.ones((10, 2)), np.array([5, 0]), STANDARD_2)
