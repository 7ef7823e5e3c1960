"""Random-access record sources: a dataset's train, val and test splits as `Split`s.

A split holds its captions (text) and small index arrays in memory; its images are random-access
records, read by row when a batch needs them (the synthetic source memory-maps its cache; the real
formats decode image files). A source is a function `DataSpec -> Source` registered under its
`config.data.name`; `sources.register` adds one without touching any other module.
"""

import dataclasses
import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import numpy as np

from rebalance_jax.infra.errors import InputError

SPLITS = ("train", "val", "test")
# Captions of every evaluation image: the retrieval protocols (docs/method.md §7) count five.
CAPTIONS_PER_IMAGE = 5


class ImageRecords(Protocol):
  """Images by row: `records[rows]` -> uint8 (len(rows), S, S, 3), `records[row]` -> (S, S, 3).

  Records of encoded images (`prepared.ImageFileRecords`) also have `at_size(size, view)` (the same
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


@dataclasses.dataclass(frozen=True)
class SourceKind:
  """A registered source.

  load: `load(data_spec) -> Source`.
  options: the defaults of its config section, config.data.<name> (None: the section is passed
    through as it is); `options(data)` checks a config's section against them.
  encoded_images: its records are encoded images that decode at any size (`at_size`) and make
    the reference training view (`train_views`): then `data.augment='reference'` applies, and
    the teachers see images at their own size.
  prepare: `prepare(data_spec) -> (directory, record)`, a one-off preparation of the files that
    `load` reads (`python -m rebalance_jax.prepare`), or None when there is nothing to prepare.
  """
  load: Callable[..., Source]
  options: Mapping[str, Any] | None = None
  encoded_images: bool = False
  prepare: Callable[..., tuple[str, dict]] | None = None


_REGISTRY: dict[str, SourceKind] = {}
# The sources that register themselves when imported, imported on the first lookup (importing
# them here would make them import this module while it is being defined).
_BUILTIN_MODULES = ("rebalance_jax.data.synthetic", "rebalance_jax.data.real")


def register(name: str, load: Callable, *, options: Mapping[str, Any] | None = None,
             encoded_images: bool = False, prepare: Callable | None = None) -> None:
  """Makes `load(data_spec) -> Source` the source of config.data.name=`name` (see SourceKind)."""
  _REGISTRY[name] = SourceKind(load, None if options is None else dict(options), encoded_images,
                               prepare)


def names() -> list[str]:
  for module in _BUILTIN_MODULES:
    importlib.import_module(module)
  return sorted(_REGISTRY)


def get(name: str) -> SourceKind:
  if name not in names():
    raise InputError(f"config.data.name={name!r} is not one of {tuple(names())}")
  return _REGISTRY[name]


def options(data) -> dict:
  """config.data.<name> of `data` (a spec.DataSpec) over its source's defaults; an unknown field
  is an InputError naming it."""
  defaults = get(data.name).options
  if defaults is None:
    return dict(data.options)
  unknown = sorted(set(data.options) - set(defaults))
  if unknown:
    raise InputError(f"config.data.{data.name}: unknown fields {unknown}; it has "
                     f"{sorted(defaults)}")
  return {**defaults, **data.options}


def load(data) -> Source:
  """The source named by `data.name` (a spec.DataSpec)."""
  source = get(data.name).load(data)
  missing = set(SPLITS) - set(source.splits)
  if missing:
    raise InputError(f"config.data.name={data.name!r}: the source has no {sorted(missing)} split")
  return source


def prepare(data) -> tuple[str, dict]:
  """Prepares the files of `data`'s source once; returns (directory, record)."""
  kind = get(data.name)
  if kind.prepare is None:
    preparable = tuple(n for n in names() if _REGISTRY[n].prepare is not None)
    raise InputError(f"config.data.name={data.name!r} has nothing to prepare (datasets that do: "
                     f"{preparable})")
  return kind.prepare(data)


def at_size(records: ImageRecords, size: int, view: str = "resize") -> ImageRecords:
  """The records viewed at `size`, squashed ("resize") or as the centre square of the image
  resized to `size` on its shorter side ("center_crop"), for records of encoded images (they
  decode at any size); others as they are (the tower's preprocessing resizes them)."""
  return records.at_size(size, view) if hasattr(records, "at_size") else records
