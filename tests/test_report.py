"""Tests of the recall curves (retrieval.recall_curves) and the results files (report)."""

import json

import numpy as np
import pytest

from rebalance_jax.evaluators import ranking, results, retrieval

STANDARD_3 = np.repeat(np.arange(3), 5)  # captions 5i..5i+4 belong to image i
CORRESPONDENCE = (STANDARD_3[None, :] == np.arange(3)[:, None]).astype(float)  # (3, 15)


def _reranked():
  """The re-ranked matrices of itm_k = 2 candidates per query (logits 2 and 1), -100 elsewhere."""
  # i2t: image 0 -> captions 5, 10 (no positive), image 1 -> 0, 5 (positive second), image 2 ->
  # 0, 1 (no positive). Ranks of the best positive: 2, 1, 2 -> R@1 0, R@2 1/3.
  i2t = ranking.itm_rerank_scores(np.zeros((3, 15)), np.array([[5, 10], [0, 5], [0, 1]]),
                                  np.tile([2.0, 1.0], (3, 1)))
  # t2i: captions of image 0 -> images 1, 2 (own image left out, rank 2); captions of images 1, 2
  # -> own image first (rank 0). R@1 = R@2 = 10/15.
  images_of_text = np.repeat([[1, 2], [1, 0], [2, 0]], 5, axis=0)
  t2i = ranking.itm_rerank_scores(np.zeros((15, 3)), images_of_text, np.tile([2.0, 1.0], (15, 1)))
  return i2t, t2i


def test_recall_curves_stop_the_reranked_curve_at_itm_k():
  i2t, t2i = _reranked()
  # Past K = 2 the positives left at -100 tie with every other non-candidate and the optimistic tie
  # rule counts them as hits: i2t R@3 = 100 of 15 captions, though images 0 and 2 have no positive
  # among their candidates.
  assert ranking.recall_at_k(i2t, t2i, STANDARD_3, ks=(3,))["i2t_r3"] == 100.0
  # ITC: reversed correspondence. An image's own captions (-1) rank below the 10 others (0):
  # rank 10, a hit from K = 11; a caption's image (-1) ranks below the 2 others: a hit from K = 3.
  curves = retrieval.recall_curves(-CORRESPONDENCE, STANDARD_3, (i2t, t2i), itm_k=2,
                                   ks=(1, 2, 3, 11))
  assert curves["ks"] == [1, 2, 3, 11] and curves["itm"]["max_k"] == 2
  assert curves["itc"] == {"i2t": [0.0, 0.0, 0.0, 100.0], "t2i": [0.0, 0.0, 100.0, 100.0]}
  assert curves["itm"]["i2t"] == pytest.approx([0.0, 100 / 3])
  assert curves["itm"]["t2i"] == pytest.approx([200 / 3, 200 / 3])


def test_recall_curves_without_reranking_have_itc_only():
  curves = retrieval.recall_curves(CORRESPONDENCE, STANDARD_3, ks=(1, 5))
  assert curves == {"ks": [1, 5], "itc": {"i2t": [100.0, 100.0], "t2i": [100.0, 100.0]}}


def test_results_files_and_plot_legend(tmp_path):
  i2t, t2i = _reranked()
  curves = {"stage1": retrieval.recall_curves(-CORRESPONDENCE, STANDARD_3, (i2t, t2i), itm_k=2,
                                              ks=(1, 2, 3, 11)),
            "dual": retrieval.recall_curves(CORRESPONDENCE, STANDARD_3, ks=(1, 2, 3, 11))}
  rows = {"stage1": {"i2t_r1": 0.0, "rsum": 10.0, "score_mode": "itm", "i2i_ndcg@10": 40.0},
          "dual": {"i2t_r1": 100.0, "rsum": 600.0, "score_mode": "itc", "i2i_ndcg@10": 50.0}}
  fig = results.results_figure(rows, curves)
  for ax in fig.axes[:2]:
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "stage1: ITC cosine", "stage1: ITM re-ranked (K ≤ 2)", "dual: ITC cosine"]
    itc, itm, _ = ax.get_lines()
    assert list(itc.get_xdata()) == [1, 2, 3, 11] and list(itm.get_xdata()) == [1, 2]
    assert itm.get_linestyle() == "--" and itm.get_color() == itc.get_color()

  results.write_results(str(tmp_path), rows, curves)
  with open(tmp_path / "results.png", "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  with open(tmp_path / "results.json") as f:
    saved = json.load(f)
  assert saved == {"metrics": rows, "recall_curves": curves}
