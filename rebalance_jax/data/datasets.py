"""Retrieval datasets as in-memory arrays: training pairs and 5-captions-per-image test splits.

`load_retrieval_data` is the one entry point; it dispatches on `config.data.name`. The embedded
synthetic dataset is built here; the real datasets (Flickr30K, COCO, VizWiz) validate their
configured paths, and their loaders plug in behind the same `RetrievalData` interface.
"""

import dataclasses
import os

import ml_collections
import numpy as np
from absl import logging

from rebalance_jax import files
from rebalance_jax.data import synthetic
from rebalance_jax.data import text
from rebalance_jax.errors import InputError

REAL_DATASETS = ("flickr30k", "coco", "vizwiz")
# Config fields that hold the local paths of a real dataset.
REAL_DATASET_PATHS = ("image_root", "train_file", "test_file")


@dataclasses.dataclass(frozen=True)
class PairSplit:
  """Training pairs: pair p is caption (ids[p], mask[p]) of image images[image_index[p]]."""
  images: np.ndarray       # (num_images, S, S, 3) uint8
  image_index: np.ndarray  # (num_pairs,) int32 row into images
  image_ids: np.ndarray    # (num_pairs,) int32 image id (equal ids = same image)
  ids: np.ndarray          # (num_pairs, max_tokens) int32
  mask: np.ndarray         # (num_pairs, max_tokens) int32
  attributes: np.ndarray | None = None  # (num_images, A) uint8 scene attributes, if known

  @property
  def num_pairs(self) -> int:
    return len(self.image_index)

  def batch(self, pair_indices: np.ndarray) -> dict[str, np.ndarray]:
    """Host batch of the given pairs."""
    return {
        "image": self.images[self.image_index[pair_indices]],
        "ids": self.ids[pair_indices],
        "mask": self.mask[pair_indices],
        "image_id": self.image_ids[pair_indices],
    }


@dataclasses.dataclass(frozen=True)
class EvalSplit:
  """A retrieval test set: caption c describes image text_to_image[c]."""
  images: np.ndarray          # (num_images, S, S, 3) uint8
  ids: np.ndarray             # (num_captions, max_tokens) int32
  mask: np.ndarray
  text_to_image: np.ndarray   # (num_captions,) int32
  captions: tuple[str, ...]

  @property
  def image_to_texts(self) -> np.ndarray:
    """(num_images, captions_per_image) caption indices of each image, in caption order."""
    per_image = len(self.text_to_image) // len(self.images)
    return np.argsort(self.text_to_image, kind="stable").reshape(len(self.images), per_image)

  def references(self) -> list[list[str]]:
    """The captions of each image (the references of its ROUGE-L relevance)."""
    return [[self.captions[c] for c in row] for row in self.image_to_texts]

  def first(self, num_images: int) -> "EvalSplit":
    """The sub-split of the first `num_images` images and their captions (e.g. COCO-1K)."""
    keep = self.text_to_image < num_images
    return EvalSplit(self.images[:num_images], self.ids[keep], self.mask[keep],
                     self.text_to_image[keep], tuple(np.asarray(self.captions, object)[keep]))


@dataclasses.dataclass(frozen=True)
class RetrievalData:
  train: PairSplit
  val: EvalSplit
  test: EvalSplit
  vocab_file: str
  vocab: dict  # {"size", "sha256"} of the vocabulary: part of every phase's fingerprint

  @property
  def vocab_size(self) -> int:
    return self.vocab["size"]


def load_retrieval_data(config: ml_collections.ConfigDict) -> RetrievalData:
  """Builds the dataset named by config.data.name, tokenized per config.tokenizer."""
  name = config.data.name
  if name == "synthetic":
    return _synthetic(config)
  if name in REAL_DATASETS:
    _check_real_paths(config.data)
    raise InputError(
        f"config.data.name={name!r}: the paths exist, but the {name} loader is not part of this "
        "release yet (it is tracked as the real dataset pipeline issue); use configs/demo.py.")
  raise InputError(f"config.data.name={name!r} is not one of {('synthetic',) + REAL_DATASETS}")


def _check_real_paths(data: ml_collections.ConfigDict) -> None:
  for field in REAL_DATASET_PATHS:
    path = data.get(field)
    if not path:
      raise InputError(
          f"config.data.{field} is not set: pass --config.data.{field}=/path/on/this/machine")
    if not os.path.exists(path):
      raise InputError(f"config.data.{field}={path!r} does not exist")


def _synthetic_config(data: ml_collections.ConfigDict) -> synthetic.SyntheticConfig:
  try:
    return synthetic.SyntheticConfig(**data.synthetic, image_size=data.image_size)
  except (TypeError, ValueError) as e:
    raise InputError(f"config.data.synthetic: {e}") from e


def _synthetic(config: ml_collections.ConfigDict) -> RetrievalData:
  data, tok = config.data, config.tokenizer
  scene_config = _synthetic_config(data)
  cache_dir = os.path.expanduser(data.cache_dir)
  try:
    splits = synthetic.load_or_generate(scene_config, cache_dir)
  except ValueError as e:  # a corrupt cache file: the message names it
    raise InputError(str(e)) from e
  vocab_file = tok.vocab_file
  if not vocab_file:
    vocab_file = os.path.join(cache_dir, synthetic.cache_key(scene_config),
                              f"vocab{tok.vocab_size}_{data.max_words_train}.txt")
    if not files.is_intact(vocab_file):  # absent, or not the file that was written: retrain
      if os.path.exists(vocab_file):
        logging.warning("cached vocabulary %s fails its content check; training it again",
                        vocab_file)
      train_captions = [text.clean_caption(c, data.max_words_train)
                        for caps in splits["train"]["captions"] for c in caps]
      text.train_wordpiece_vocab(train_captions, vocab_file, tok.vocab_size)
  tokenizer = text.load_tokenizer(vocab_file)

  def encode(captions, max_words):
    return text.tokenize(tokenizer, captions, data.max_tokens, max_words, tok.append_sep)

  train = splits["train"]
  per_image = len(train["captions"][0])
  num_images = len(train["images"])
  image_index = np.repeat(np.arange(num_images, dtype=np.int32), per_image)
  ids, mask = encode([c for caps in train["captions"] for c in caps], data.max_words_train)
  pairs = PairSplit(images=train["images"], image_index=image_index, image_ids=image_index,
                    ids=ids, mask=mask, attributes=train["attributes"])

  def eval_split(split):
    captions = tuple(c for caps in split["captions"] for c in caps)
    ids, mask = encode(captions, data.max_words_eval)
    text_to_image = np.repeat(np.arange(len(split["images"]), dtype=np.int32),
                              len(split["captions"][0]))
    return EvalSplit(split["images"], ids, mask, text_to_image, captions)

  return RetrievalData(pairs, eval_split(splits["val"]), eval_split(splits["test"]), vocab_file,
                       text.check_vocab(vocab_file))
