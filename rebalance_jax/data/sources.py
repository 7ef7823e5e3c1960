"""Random-access record sources: a dataset's train, val and test splits as `Split`s.

A split holds its captions (text) and small index arrays in memory; its images are random-access
records, read by row when a batch needs them (the synthetic source memory-maps its cache; the real
formats decode image files). A source is a function `DataSpec -> Source` registered under its
`config.data.name`; `sources.register` adds one without touching any other module.
"""

import dataclasses
import os
from collections.abc import Callable
from typing import Protocol

import numpy as np

from rebalance_jax.data import synthetic
from rebalance_jax.infra.errors import InputError

SPLITS = ("train", "val", "test")


class ImageRecords(Protocol):
  """Images by row: `records[rows]` -> uint8 (len(rows), S, S, 3), `records[row]` -> (S, S, 3).

  Records of encoded images (`prepared.ImageFileRecords`) also have `at_size(size)` (the same
  records decoded at another size) and `train_views(rows, seeds)` (the training augmentation).
  """

  def __len__(self) -> int: ...

  def __getitem__(self, rows): ...


@dataclasses.dataclass(frozen=True)
class Split:
  """Caption c describes image caption_image[c]; training pairs are the captions."""
  images: ImageRecords
  captions: tuple[str, ...]
  caption_image: np.ndarray   # (num_captions,) int32 image row of each caption
  image_ids: np.ndarray       # (num_images,) int32; equal ids = the same image (ITC soft labels)
  attributes: np.ndarray | None = None  # (num_images, A) uint8 scene attributes, if known

  def __post_init__(self):
    if len(self.caption_image) != len(self.captions):
      raise ValueError(f"{len(self.captions)} captions but {len(self.caption_image)} image rows")
    if len(self.image_ids) != len(self.images):
      raise ValueError(f"{len(self.images)} images but {len(self.image_ids)} image ids")

  @property
  def num_images(self) -> int:
    return len(self.images)

  @property
  def num_captions(self) -> int:
    return len(self.captions)

  @property
  def image_to_texts(self) -> np.ndarray:
    """(num_images, captions_per_image) caption indices of each image, in caption order."""
    per_image = self.num_captions // self.num_images
    return np.argsort(self.caption_image, kind="stable").reshape(self.num_images, per_image)

  def references(self) -> list[list[str]]:
    """The captions of each image (the references of its ROUGE-L relevance)."""
    return [[self.captions[c] for c in row] for row in self.image_to_texts]

  def first(self, num_images: int) -> "Split":
    """The sub-split of the first `num_images` images and their captions (e.g. COCO-1K)."""
    keep = self.caption_image < num_images
    return Split(_FirstRows(self.images, num_images),
                 tuple(np.asarray(self.captions, object)[keep]), self.caption_image[keep], self.image_ids[:num_images],
                 None if self.attributes is None else self.attributes[:num_images])


class _FirstRows:
  """The first `n` records of `records`."""

  def __init__(self, records: ImageRecords, n: int):
    self._records, self._n = records, n

  def __len__(self):
    return self._n

  def __getitem__(self, rows):
    if np.any(np.asarray(rows) >= self._n):
      raise IndexError(f"row beyond the first {self._n}")
    return self._records[rows]


@dataclasses.dataclass(frozen=True)
class Source:
  splits: dict[str, Split]  # "train", "val", "test"
  cache_dir: str            # where derived files (a trained vocabulary) of this data are kept
  # Content identity of data its config does not describe (a real dataset's annotation files),
  # part of every phase's fingerprint and the teacher features' manifest; '' if none.
  identity: str


_REGISTRY: dict[str, Callable] = {}
REAL_DATASETS = ("flickr30k", "coco", "vizwiz")


def register(name: str, load: Callable) -> None:
  """Makes `load(data_spec) -> Source` the source of config.data.name=`name`."""
  _REGISTRY[name] = load


def load(data) -> Source:
  """The source named by `data.name` (a spec.DataSpec)."""
  if data.name in REAL_DATASETS:
    from rebalance_jax.data import real  # it builds on this module
    return real.load(data)
  if data.name in _REGISTRY:
    source = _REGISTRY[data.name](data)
    missing = set(SPLITS) - set(source.splits)
    if missing:
      raise InputError(f"config.data.name={data.name!r}: the source has no {sorted(missing)} split")
    return source
  raise InputError(f"config.data.name={data.name!r} is not one of "
                   f"{tuple(sorted(_REGISTRY)) + REAL_DATASETS}")


def at_size(records: ImageRecords, size: int) -> ImageRecords:
  """The records viewed at `size` (records of encoded images decode at any size); others as
  they are (the tower's preprocessing resizes them)."""
  return records.at_size(size) if hasattr(records, "at_size") else records


def _synthetic(data) -> Source:
  try:
    scene_config = synthetic.SyntheticConfig(**data.options, image_size=data.image_size)
  except (TypeError, ValueError) as e:
    raise InputError(f"config.data.synthetic: {e}") from e
  cache_dir = os.path.expanduser(data.cache_dir)
  try:
    generated = synthetic.load_or_generate(scene_config, cache_dir)
  except ValueError as e:  # a corrupt cache file: the message names it
    raise InputError(str(e)) from e
  splits = {}
  for name, split in generated.items():
    num_images, per_image = len(split["images"]), len(split["captions"][0])
    rows = np.arange(num_images, dtype=np.int32)
    splits[name] = Split(split["images"], tuple(c for caps in split["captions"] for c in caps),
                         np.repeat(rows, per_image), rows, split["attributes"])
  key = synthetic.cache_key(scene_config)
  return Source(splits, os.path.join(cache_dir, key), identity="")  # the config describes it


register("synthetic", _synthetic)
