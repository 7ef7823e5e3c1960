"""ROUGE-L relevance (rebalance_jax.evaluators.rouge, docs/method.md §7): hand-computed cases, a plain
Python DP on random data (references longer than one 64-bit word included), the disk cache, input
errors, and agreement with Google's rouge_score package."""

import os

import numpy as np
import pytest

from rebalance_jax.data.text import clean_caption
from rebalance_jax.evaluators import rouge
from rebalance_jax.infra import files

BETA = 1.2


def _lcs_length(a: list[str], b: list[str]) -> int:
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def _coco_rouge_l(candidate: str, references: list[str], beta: float = BETA) -> float:
  """pycocoevalcap's Rouge.calc_score, on clean_caption tokens."""
  c = clean_caption(candidate, 10_000).split()
  refs = [clean_caption(r, 10_000).split() for r in references]
  precision = max(_lcs_length(c, r) / len(c) for r in refs)
  recall = max(_lcs_length(c, r) / len(r) for r in refs)
  if precision == 0 or recall == 0:
    return 0.0
  return (1 + beta**2) * precision * recall / (recall + beta**2 * precision)


def test_identical_is_one_and_disjoint_is_zero():
  rel = rouge.rouge_l_matrix(["A dog, runs!", "two cats sleep"], [["a dog runs"], ["one red bird"]])
  np.testing.assert_allclose(rel, [[1.0, 0.0], [0.0, 0.0]], atol=1e-7)


def test_hand_computed_case_takes_max_precision_and_max_recall_from_different_references():
  # c  = "a dog runs on the grass"                       |c| = 6
  # r1 = "a dog runs"                                    LCS = 3 (a dog runs)          p = 3/6, r = 3/3
  # r2 = "a black dog runs fast on green grass today"    LCS = 5 (a dog runs on grass) p = 5/6, r = 5/9
  # P = max(1/2, 5/6) = 5/6 (from r2), R = max(1, 5/9) = 1 (from r1)
  # F = (1 + 1.44)·(5/6)·1 / (1 + 1.44·5/6) = 2.0333.../2.2 = 0.924242...   (β = 1 would give 10/11)
  references = [["a dog runs", "a black dog runs fast on green grass today"]]
  rel = rouge.rouge_l_matrix(["a dog runs on the grass"], references)
  np.testing.assert_allclose(rel, [[2.44 * (5 / 6) / 2.2]], rtol=1e-6)
  np.testing.assert_allclose(rouge.rouge_l_matrix(["a dog runs on the grass"], references, beta=1.0),
                             [[10 / 11]], rtol=1e-6)


def test_the_caption_is_the_candidate():
  # "a dog runs on the grass" vs ["a dog runs"]: P = 1/2, R = 1 -> 2.44·0.5/(1 + 1.44·0.5) = 1.22/1.72
  # "a dog runs" vs ["a dog runs on the grass"]: P = 1, R = 1/2 -> 2.44·0.5/(0.5 + 1.44)  = 1.22/1.94
  long, short = "a dog runs on the grass", "a dog runs"
  rel = rouge.rouge_l_matrix([long, short], [[short], [long]])
  np.testing.assert_allclose([rel[0, 0], rel[1, 1]], [1.22 / 1.72, 1.22 / 1.94], rtol=1e-6)


def _random_caption(rng, words, low, high):
  return " ".join(rng.choice(words, rng.integers(low, high)))


def test_agrees_with_python_dp_on_random_data():
  rng = np.random.default_rng(0)
  words = ["a", "the", "dog", "cat", "on", "red", "grass", "runs"]
  captions = [_random_caption(rng, words, 1, 25) for _ in range(60)]
  captions += [_random_caption(rng, words + ["unseen"], 60, 140) for _ in range(4)]
  references = [[_random_caption(rng, words, 1, 25) if rng.random() < 0.8
                 else _random_caption(rng, words, 60, 200) for _ in range(rng.integers(1, 7))]
                for _ in range(300)]  # references over 64 and 128 tokens: masks of 2-4 uint64 words
  rel = rouge.rouge_l_matrix(captions, references)
  assert rel.shape == (64, 300) and rel.dtype == np.float32
  pairs = [(c, j) for c in range(64) for j in rng.choice(300, 6, replace=False)]
  expected = [_coco_rouge_l(captions[c], references[j]) for c, j in pairs]
  np.testing.assert_allclose([rel[c, j] for c, j in pairs], expected, rtol=1e-6, atol=1e-7)


def test_bad_inputs_name_the_index():
  with pytest.raises(ValueError, match="caption 1 is empty"):
    rouge.rouge_l_matrix(["a dog", " ?! "], [["a dog"]])
  with pytest.raises(ValueError, match="image 1 has no reference captions"):
    rouge.rouge_l_matrix(["a dog"], [["a dog"], []])
  with pytest.raises(ValueError, match="image 0 reference 1 is empty"):
    rouge.rouge_l_matrix(["a dog"], [["a dog", "..."]])


def test_cache_is_reused_and_keyed_by_beta(tmp_path, monkeypatch):
  captions, references = ["a dog runs", "a cat"], [["a dog"], ["a cat sleeps", "the cat"]]
  first = rouge.relevance_matrix(captions, references, str(tmp_path))
  cached, digest = sorted(os.listdir(tmp_path))
  assert cached.startswith("rouge_l_") and cached.endswith(".npy") and digest == cached + ".sha256"

  def fail(*args, **kwargs):
    raise AssertionError("recomputed despite the cache")
  monkeypatch.setattr(rouge, "_rouge_l", fail)
  np.testing.assert_array_equal(rouge.relevance_matrix(["A dog runs.", "a cat"], references,
                                                       str(tmp_path)), first)  # same cleaned text
  with pytest.raises(AssertionError, match="recomputed"):
    rouge.relevance_matrix(captions, references, str(tmp_path), beta=1.0)


@pytest.mark.parametrize("tamper", ["garbage", "zeros of the right shape", "wrong shape",
                                    "digest removed"])
def test_a_tampered_cache_is_recomputed(tmp_path, tamper):
  captions, references = ["a dog runs", "a cat"], [["a dog"], ["a cat sleeps", "the cat"]]
  expected = rouge.relevance_matrix(captions, references, str(tmp_path))
  path = str(tmp_path / [n for n in os.listdir(tmp_path) if n.endswith(".npy")][0])
  if tamper == "garbage":
    with open(path, "wb") as f:
      f.write(b"not a numpy file")
  elif tamper == "digest removed":
    os.remove(path + ".sha256")
  else:  # the case: a cache of zeros silently gave NDCG 0
    np.save(path, np.zeros((2, 2) if tamper == "zeros of the right shape" else (3, 1), np.float32))
  np.testing.assert_array_equal(rouge.relevance_matrix(captions, references, str(tmp_path)),
                                expected)
  assert files.is_intact(path)  # rewritten
  np.testing.assert_array_equal(np.load(path), expected)


def test_no_cache_dir_computes_directly():
  np.testing.assert_allclose(rouge.relevance_matrix(["a dog"], [["a dog"]], None), [[1.0]])


def test_agrees_with_rouge_score_package():
  rouge_scorer = pytest.importorskip("rouge_score.rouge_scorer")
  scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
  rng = np.random.default_rng(1)
  words = ["a", "A", "dog", "Dog,", "man's", "on", "the", "grass.", "red", "two", "(big)", "runs"]
  captions = [_random_caption(rng, words, 1, 20) for _ in range(200)]
  targets = [_random_caption(rng, words, 1, 20) for _ in range(200)]
  ours = np.diagonal(rouge.rouge_l_matrix(captions, [[t] for t in targets]))
  theirs = [scorer.score(target, caption)["rougeL"] for caption, target in zip(captions, targets)]
  p, r = np.array([s.precision for s in theirs]), np.array([s.recall for s in theirs])
  f = np.where(p * r > 0, (1 + BETA**2) * p * r / np.maximum(r + BETA**2 * p, 1e-12), 0.0)
  np.testing.assert_allclose(ours, f, rtol=1e-6, atol=1e-7)
  ours_beta1 = np.diagonal(rouge.rouge_l_matrix(captions, [[t] for t in targets], beta=1.0))
  np.testing.assert_allclose(ours_beta1, [s.fmeasure for s in theirs], rtol=1e-6, atol=1e-7)
