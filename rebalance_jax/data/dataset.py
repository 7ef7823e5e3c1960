"""A dataset ready for the pipeline: its source's splits and the tokenizer of its captions."""

import dataclasses
import os
from collections.abc import Sequence

import numpy as np
import transformers
from absl import logging

from rebalance_jax.data import sources, text
from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError


@dataclasses.dataclass(frozen=True)
class Dataset:
  train: sources.Split
  val: sources.Split
  test: sources.Split
  vocab_file: str
  vocab: dict  # {"size", "sha256"} of the vocabulary: part of every phase's fingerprint
  tokenizer: transformers.PreTrainedTokenizerBase
  max_tokens: int
  max_words_train: int
  max_words_eval: int
  append_sep: bool
  augment: str    # the training view: "shift" (on the device) or "reference" (pipeline.pair_rows)
  identity: str   # the source's content identity

  @property
  def content(self) -> dict:
    """What the phases' fingerprints learn only from the loaded data: the vocabulary, and the
    identity of a source not fully described by its config (a real dataset's annotations)."""
    return {"vocab": self.vocab, **({"data_identity": self.identity} if self.identity else {})}

  @property
  def vocab_size(self) -> int:
    return self.vocab["size"]

  def encode(self, captions: Sequence[str], train: bool) -> dict[str, np.ndarray]:
    """Token ids and mask (N, max_tokens) of captions, cleaned to the train or eval word limit."""
    ids, mask = text.tokenize(self.tokenizer, captions, self.max_tokens,
                              self.max_words_train if train else self.max_words_eval,
                              self.append_sep)
    return {"ids": ids, "mask": mask}

  def eval_encoder(self, captions: Sequence[str]) -> dict[str, np.ndarray]:
    """`encode` with the evaluation word limit (the predict contract's `encode_captions`)."""
    return self.encode(captions, train=False)


def load_dataset(data) -> Dataset:
  """The source of `data` (a spec.DataSpec) with its tokenizer: data.vocab_file, or a WordPiece
  vocabulary of data.vocab_size trained on the training captions (cached beside the data)."""
  source = sources.load(data)
  vocab_file = data.vocab_file
  if vocab_file and not os.path.isfile(os.path.expanduser(vocab_file)):
    raise InputError(f"config.tokenizer.vocab_file={vocab_file!r} does not exist")
  if not vocab_file:
    vocab_file = os.path.join(source.cache_dir,
                              f"vocab{data.vocab_size}_{data.max_words_train}.txt")
    if not files.is_intact(vocab_file):  # absent, or not the file that was written: retrain
      if os.path.exists(vocab_file):
        logging.warning("cached vocabulary %s fails its content check; training it again",
                        vocab_file)
      captions = [text.clean_caption(c, data.max_words_train)
                  for c in source.splits["train"].captions]
      text.train_wordpiece_vocab(captions, vocab_file, data.vocab_size)
  return Dataset(**source.splits, vocab_file=vocab_file, vocab=text.check_vocab(vocab_file),
                 tokenizer=text.load_tokenizer(vocab_file), max_tokens=data.max_tokens,
                 max_words_train=data.max_words_train, max_words_eval=data.max_words_eval,
                 append_sep=data.append_sep, augment=data.augment, identity=source.identity)
