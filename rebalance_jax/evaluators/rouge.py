"""ROUGE-L graded relevance between captions and images (docs/method.md §7), COCO-caption convention.

For a candidate caption c and the reference captions r_1..r_m of image j (`pycocoevalcap` Rouge):
  P = max_k LCS(c, r_k) / |c|,  R = max_k LCS(c, r_k) / |r_k|,
  rel[c, j] = (1 + β²)·P·R / (R + β²·P), or 0 when P or R is 0 (β = 1.2).
The max precision and the max recall may come from different references. c is always the candidate.

Tokens: `clean_caption` (lower-cased, punctuation replaced by spaces, apostrophes split, whitespace
split), matched exactly. Differences from other implementations:
- pycocoevalcap splits PTB-tokenized text on spaces, so punctuation marks count as tokens there;
  here they are stripped.
- rouge_score (Google) reports β = 1 F-measures, and its tokenizer keeps only [a-z0-9] runs (any
  other character, e.g. an accented letter or `_`, splits or vanishes) and can stem
  (use_stemmer=True); clean_caption keeps Unicode letters and digits and never stems. On ASCII
  text without `_` the two tokenizations agree, and so do the LCS precisions and recalls.

Speed: LCS lengths use the bit-parallel algorithm of Allison & Dix / Hyyrö, vectorized over a block
of (caption, reference) pairs. Each reference is a bitmask over its token positions (64 per uint64
word); a table gives, for every token id, its match mask in each reference of the block, so reading
the masks of one candidate token for all pairs is a row gather. Per candidate token the state of
every pair is updated with V ← (V + U) | (V − U), U = V & match, and at the end LCS = the number of
zero bits of V among the reference's positions. Captions are sorted by length so a block only runs
as many steps as its longest caption; images are sorted by their longest reference so that masks of
more than one word are needed in few blocks. COCO-5K (25,000 × 5,000 × 5 LCS) takes about 30 s on one
CPU core (bench/eval_speed.py --rouge_captions 25000 --rouge_images 5000).
"""

import hashlib
import json
import os
from collections.abc import Sequence

import numpy as np
from absl import logging

from rebalance_jax.data.text import clean_caption
from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError

_MAX_WORDS = 10_000
_WORD_BITS = 64
_CAPTION_BLOCK = 128    # captions per block
_REFERENCE_BLOCK = 256  # about this many references (whole images) per block: 4 × 256 KiB of state
_ALL_ONES = np.uint64(2**64 - 1)


def rouge_l_matrix(captions: Sequence[str], references: Sequence[Sequence[str]],
                   beta: float = 1.2) -> np.ndarray:
  """(num_captions, num_images) float32: rel[c, j] = ROUGE-L F of captions[c] against references[j]
  (COCO convention: max precision and max recall over the references).

  Raises InputError (a ValueError) naming the index of an empty caption or reference, or of an image
  without references.
  """
  caption_tokens, reference_tokens = _tokenize(captions, references)
  return _rouge_l(caption_tokens, reference_tokens, beta)


def relevance_matrix(captions: Sequence[str], references: Sequence[Sequence[str]],
                     cache_dir: str | None, beta: float = 1.2) -> np.ndarray:
  """rouge_l_matrix, cached on disk at cache_dir/rouge_l_<sha256>.npy; cache_dir None = no cache.

  The name's hash covers the cleaned captions, the cleaned references and beta; the file's content
  hash is stored beside it (`files.write_checked`). A cache file that fails its content check or is
  not the expected matrix is recomputed and rewritten.
  """
  if cache_dir is None:
    return rouge_l_matrix(captions, references, beta)
  caption_tokens, reference_tokens = _tokenize(captions, references)
  key = json.dumps([caption_tokens, reference_tokens, float(beta)], ensure_ascii=False)
  path = os.path.join(cache_dir, f"rouge_l_{hashlib.sha256(key.encode()).hexdigest()}.npy")
  shape = (len(captions), len(references))
  if files.is_intact(path):
    rel = np.load(path, allow_pickle=False)
    if rel.shape == shape and rel.dtype == np.float32:
      return rel
  if os.path.exists(path):
    logging.warning("ROUGE-L cache file %s fails its content check; computing it again", path)
  rel = _rouge_l(caption_tokens, reference_tokens, beta)
  files.write_checked(path, lambda f: np.save(f, rel))
  return rel


def _tokenize(captions, references) -> tuple[list[list[str]], list[list[list[str]]]]:
  """Cleaned word lists of the captions and of each image's references, validated."""
  caption_tokens = [clean_caption(c, _MAX_WORDS).split() for c in captions]
  for i, tokens in enumerate(caption_tokens):
    if not tokens:
      raise InputError(f"caption {i} is empty after cleaning: {captions[i]!r}")
  reference_tokens = [[clean_caption(r, _MAX_WORDS).split() for r in refs] for refs in references]
  for j, refs in enumerate(reference_tokens):
    if not refs:
      raise InputError(f"image {j} has no reference captions")
    for k, tokens in enumerate(refs):
      if not tokens:
        raise InputError(f"image {j} reference {k} is empty after cleaning: {references[j][k]!r}")
  return caption_tokens, reference_tokens


def _rouge_l(caption_tokens: list[list[str]], reference_tokens: list[list[list[str]]],
             beta: float) -> np.ndarray:
  if not caption_tokens or not reference_tokens:
    return np.zeros((len(caption_tokens), len(reference_tokens)), np.float32)
  vocab: dict[str, int] = {}  # id 0: padding, and words in no reference (they never match)
  reference_ids = [[[vocab.setdefault(w, len(vocab) + 1) for w in ref] for ref in refs]
                   for refs in reference_tokens]
  caption_ids = [[vocab.get(w, 0) for w in tokens] for tokens in caption_tokens]
  caption_order = np.argsort([len(c) for c in caption_ids], kind="stable")
  sorted_lengths = np.array([len(caption_ids[c]) for c in caption_order])
  sorted_captions = _padded([caption_ids[c] for c in caption_order])
  image_order = np.argsort([max(map(len, refs)) for refs in reference_ids], kind="stable")

  rel = np.empty((len(caption_ids), len(reference_ids)), np.float32)
  for images in _image_blocks(image_order, [len(refs) for refs in reference_ids]):
    block_refs = [ref for j in images for ref in reference_ids[j]]
    to_block_ids, table = _match_table(block_refs, len(vocab) + 1)
    block_captions = to_block_ids[sorted_captions]
    ref_lengths = np.array([len(ref) for ref in block_refs])
    image_starts = np.cumsum([0] + [len(reference_ids[j]) for j in images[:-1]])
    for start in range(0, len(caption_order), _CAPTION_BLOCK):
      rows = slice(start, start + _CAPTION_BLOCK)
      lengths = sorted_lengths[rows]
      lcs = _lcs_lengths(block_captions[rows, :lengths[-1]], table, ref_lengths)
      rel[np.ix_(caption_order[rows], images)] = _f_measure(lcs, lengths, ref_lengths, image_starts, beta)
  return rel


def _image_blocks(image_order: np.ndarray, reference_counts: list[int]) -> list[np.ndarray]:
  """Consecutive runs of image_order holding about _REFERENCE_BLOCK references each."""
  cumulative = np.cumsum(np.asarray(reference_counts)[image_order])
  cuts = np.searchsorted(cumulative, np.arange(_REFERENCE_BLOCK, cumulative[-1], _REFERENCE_BLOCK),
                         side="right")
  return [block for block in np.split(image_order, np.unique(cuts)) if len(block)]


def _padded(sequences: list[list[int]]) -> np.ndarray:
  ids = np.zeros((len(sequences), max(map(len, sequences))), np.int64)
  for i, seq in enumerate(sequences):
    ids[i, :len(seq)] = seq
  return ids


def _match_table(references: list[list[int]], vocab_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Match masks of the references' own words, under block-local ids (a table small enough to cache).

  Returns (to_block_ids, table): to_block_ids (vocab_size,) maps a global id to its block id (0 for
  words in none of these references); table (words, block vocabulary + 1, num_refs) uint64 has bit p
  of word w of [w, t, r] set iff references[r] has block id t at position 64·w + p.
  """
  lengths = np.array([len(ref) for ref in references])
  block_vocab, block_tokens = np.unique(np.concatenate(references), return_inverse=True)
  to_block_ids = np.zeros(vocab_size, np.int64)
  to_block_ids[block_vocab] = np.arange(1, len(block_vocab) + 1)
  table = np.zeros((-(-lengths.max() // _WORD_BITS), len(block_vocab) + 1, len(references)), np.uint64)
  positions = np.concatenate([np.arange(n) for n in lengths])
  bits = np.left_shift(np.uint64(1), (positions % _WORD_BITS).astype(np.uint64))
  index = (positions // _WORD_BITS, block_tokens + 1, np.repeat(np.arange(len(references)), lengths))
  np.bitwise_or.at(table, index, bits)
  return to_block_ids, table


def _lcs_lengths(caption_ids: np.ndarray, table: np.ndarray, ref_lengths: np.ndarray) -> np.ndarray:
  """(captions, refs) LCS lengths of the padded captions (C, L) against the references of `table`."""
  words, _, num_refs = table.shape
  state = np.full((words, len(caption_ids), num_refs), _ALL_ONES)
  match, common, rest = (np.empty_like(state[0]) for _ in range(3))
  for tokens in caption_ids.T:
    carry = None
    for w in range(words):
      v = state[w]
      np.take(table[w], tokens, axis=0, out=match)
      np.bitwise_and(v, match, out=common)  # U = V & match
      np.subtract(v, common, out=rest)      # V − U = V & ~match: no borrow across words
      np.add(v, common, out=v)              # V + U, with the carry of the word below
      if words > 1:
        overflow = v < common
        if carry is not None:
          np.add(v, carry, out=v)
          overflow |= v < carry
        carry = overflow.astype(np.uint64)
      np.bitwise_or(v, rest, out=v)
  lcs = np.zeros(state.shape[1:], np.int32)
  for w in range(words):
    lcs += np.bitwise_count(~state[w] & _position_mask(ref_lengths - w * _WORD_BITS))
  return lcs


def _position_mask(lengths: np.ndarray) -> np.ndarray:
  """uint64 masks of the lowest clip(lengths, 0, 64) bits."""
  n = np.clip(lengths, 0, _WORD_BITS).astype(np.uint64)
  low = np.left_shift(np.uint64(1), np.minimum(n, _WORD_BITS - 1)) - np.uint64(1)
  return np.where(n == _WORD_BITS, _ALL_ONES, low)


def _f_measure(lcs: np.ndarray, caption_lengths: np.ndarray, ref_lengths: np.ndarray,
               image_starts: np.ndarray, beta: float) -> np.ndarray:
  """(captions, images) F_β from max precision and max recall over each image's references."""
  precision = np.maximum.reduceat(lcs, image_starts, axis=1) / caption_lengths[:, None]
  recall = np.maximum.reduceat(lcs / ref_lengths, image_starts, axis=1)
  denominator = recall + beta**2 * precision
  f = (1 + beta**2) * precision * recall / np.where(denominator > 0, denominator, 1)
  return f.astype(np.float32)
