"""Caption cleaning and tokenization with a real WordPiece tokenizer (`tokenizers`/`transformers`).

Follows the reference (docs/method.md §5): lower-case, punctuation stripped, cut to a word budget, and
`[CLS] x` with no final `[SEP]` unless `append_sep` is set.
"""

import collections
import re
import threading
from collections.abc import Sequence

import numpy as np
import transformers

from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError

_PUNCTUATION = re.compile(r"[^\w\s']|_")
_SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
_WORD = re.compile(r"\w+|[^\w\s]")  # BERT's pre-tokenization: words and single punctuation marks
# The pipeline's reader threads share one Rust tokenizer, which refuses concurrent borrows.
_TOKENIZER_LOCK = threading.Lock()


def clean_caption(caption: str, max_words: int) -> str:
  """Lower-cased, punctuation replaced by spaces, whitespace collapsed, at most max_words words."""
  words = _PUNCTUATION.sub(" ", caption.lower()).replace("'", " ").split()
  return " ".join(words[:max_words])


def wordpiece_vocab(captions: Sequence[str], vocab_size: int) -> list[str]:
  """A BERT WordPiece vocabulary learned from `captions` as the `tokenizers` WordPiece trainer
  learns it (BPE merges over the words' characters, continuation pieces prefixed '##'), but
  deterministic: a tie in pair frequency goes to the pair whose text sorts first (`tokenizers`
  breaks ties by hash order, so two trainings on the same captions differ).

  Returns the special tokens, the alphabet, then one piece per merge, up to `vocab_size` tokens.
  """
  counts = collections.Counter(word for c in captions for word in _WORD.findall(c.lower()))
  words = {tuple([w[0]] + [f"##{ch}" for ch in w[1:]]): n for w, n in sorted(counts.items())}
  vocab = _SPECIAL_TOKENS + sorted({piece for pieces in words for piece in pieces})
  known = set(vocab)
  while len(vocab) < vocab_size:
    pairs = collections.Counter()
    for pieces, n in words.items():
      for pair in zip(pieces, pieces[1:]):
        pairs[pair] += n
    if not pairs:
      break  # every word is one piece
    first, second = min(pairs, key=lambda pair: (-pairs[pair], pair))
    merged = first + second[2:]
    words = {_merge(pieces, first, second, merged): n for pieces, n in words.items()}
    if merged not in known:
      vocab.append(merged)
      known.add(merged)
  return vocab


def _merge(pieces: tuple[str, ...], first: str, second: str, merged: str) -> tuple[str, ...]:
  out, i = [], 0
  while i < len(pieces):
    if i + 1 < len(pieces) and pieces[i] == first and pieces[i + 1] == second:
      out.append(merged)
      i += 2
    else:
      out.append(pieces[i])
      i += 1
  return tuple(out)


def train_wordpiece_vocab(captions: Sequence[str], vocab_file: str, vocab_size: int) -> str:
  """Writes `wordpiece_vocab(captions, vocab_size)` as a BERT vocab.txt (atomically, with its
  content hash beside it)."""
  text = "".join(token + "\n" for token in wordpiece_vocab(captions, vocab_size))
  files.write_checked(vocab_file, lambda f: f.write(text.encode()))
  return vocab_file


def check_vocab(vocab_file: str) -> dict:
  """{"size", "sha256"} of a BERT vocab.txt; raises InputError naming the file unless it holds
  distinct tokens, the special ones among them."""
  try:
    with open(vocab_file, encoding="utf-8") as f:
      tokens = f.read().splitlines()
  except FileNotFoundError:
    raise InputError(f"tokenizer vocabulary not found: {vocab_file}") from None
  except (OSError, UnicodeDecodeError) as e:
    raise InputError(f"tokenizer vocabulary {vocab_file} is unreadable ({e})") from None
  missing = [t for t in _SPECIAL_TOKENS if t not in tokens]
  if missing:
    raise InputError(f"tokenizer vocabulary {vocab_file} ({len(tokens)} tokens) lacks the special "
                     f"tokens {missing}")
  if len(set(tokens)) != len(tokens) or "" in tokens:
    raise InputError(f"tokenizer vocabulary {vocab_file} has empty or repeated lines")
  return {"size": len(tokens), "sha256": files.file_digest(vocab_file)}


def load_tokenizer(vocab_file: str) -> transformers.BertTokenizerFast:
  """The tokenizer of a vocab.txt that passes `check_vocab`."""
  check_vocab(vocab_file)
  return transformers.BertTokenizerFast(vocab_file=vocab_file, do_lower_case=True)


def tokenize(tokenizer: transformers.PreTrainedTokenizerBase, captions: Sequence[str],
             max_tokens: int, max_words: int, append_sep: bool = False) -> tuple[np.ndarray, np.ndarray]:
  """Captions -> (ids, mask), int32 arrays (N, max_tokens); row = [CLS] tokens ([SEP]) [PAD]...

  Raises InputError naming the caption index if a caption is empty after cleaning.
  """
  cleaned = [clean_caption(c, max_words) for c in captions]
  for i, c in enumerate(cleaned):
    if not c:
      raise InputError(f"caption {i} is empty after cleaning: {captions[i]!r}")
  with _TOKENIZER_LOCK:
    body = tokenizer(cleaned, add_special_tokens=False)["input_ids"]
  budget = max_tokens - 1 - int(append_sep)
  ids = np.full((len(cleaned), max_tokens), tokenizer.pad_token_id, np.int32)
  mask = np.zeros((len(cleaned), max_tokens), np.int32)
  for i, tokens in enumerate(body):
    row = [tokenizer.cls_token_id] + tokens[:budget] + ([tokenizer.sep_token_id] if append_sep else [])
    ids[i, :len(row)] = row
    mask[i, :len(row)] = 1
  return ids, mask
