"""A prepared dataset: the images of every split as encoded bytes in TFDS ArrayRecord files, plus a
small caption index, written once by `python -m rebalance_jax.prepare` and read by row.

Layout of a prepared directory:
  prepared_images/1.0.0/     the TFDS dataset (ArrayRecord shards, dataset_info.json): one record
                             per image, {"image": encoded bytes, "file", "image_id", "captions"},
                             in annotation order (no shuffling: record i is image i)
  index-<split>.json         files, image ids, captions and image file sizes of the split (read
                             at start, so the caption-level pipeline never touches image bytes)
  prepared.json              what was prepared from which annotation files, with the bad examples
                             skipped and every other file's size (and the small files' SHA-256);
                             written last, so its presence marks a complete directory

TensorFlow is not needed: the image bytes are a plain bytes feature (not `tfds.features.Image`)
and are decoded with Pillow by `ImageFileRecords`.
"""

import concurrent.futures
import json
import os
import shutil
from collections.abc import Iterable, Sequence

import numpy as np
import tensorflow_datasets as tfds
from absl import logging

from rebalance_jax.data import transforms
from rebalance_jax.data.annotations import BadExamples, ImageEntry, read_image
from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError

PREPARED = "prepared.json"
FORMAT_VERSION = 3  # 2: prepared.json lists the files; 3: the index has the images' sizes
# Image files read and verified in parallel while preparing, and how many are read ahead.
_READ_THREADS = 8
_READ_AHEAD = 256


class PreparedImages(tfds.core.GeneratorBasedBuilder):
  """The images and captions of one dataset's splits (the examples are given, nothing is
  downloaded)."""
  VERSION = tfds.core.Version("1.0.0")

  def __init__(self, examples: dict[str, Iterable[dict]] | None = None, **kwargs):
    self._examples = examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description="Encoded images with their captions (rebalance_jax.prepare).",
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Scalar(np.object_, doc="the image file's bytes"),
            "file": tfds.features.Text(), "image_id": tfds.features.Text(),
            "captions": tfds.features.Sequence(tfds.features.Text())}),
        disable_shuffling=True)

  def _split_generators(self, dl_manager):
    del dl_manager
    return {name: self._generate_examples(examples) for name, examples in self._examples.items()}

  def _generate_examples(self, examples):
    for i, example in enumerate(examples):
      yield i, example

  # TFDS prints "Downloading and preparing dataset ..." and "... downloaded and prepared" to
  # stdout around every build; nothing is downloaded here, and prepare logs its own lines.
  def _log_download_bytes(self) -> None:
    pass

  def _log_download_done(self) -> None:
    pass


def write(directory: str, splits: dict[str, list[ImageEntry]], image_root: str,
          bad: BadExamples, record: dict) -> dict:
  """Reads and verifies every image of `splits` under `image_root`, writes the prepared dataset
  into `directory` (replacing an incomplete one) and returns its prepared.json record (`record`
  plus the split sizes and the bad examples skipped)."""
  staging = directory + ".incomplete"
  if os.path.exists(staging):
    shutil.rmtree(staging)  # a killed attempt's: only the rename below completes one
  if os.path.isdir(directory):
    os.rmdir(directory)  # empty (real._complete refuses anything else), or the rename fails
  kept = {name: [] for name in splits}  # (entry, its image file's size)
  with concurrent.futures.ThreadPoolExecutor(_READ_THREADS) as pool:
    examples = {name: _readable(entries, image_root, bad, pool, kept[name])
                for name, entries in splits.items() if entries}
    tfds.disable_progress_bar()  # prepare logs its own progress
    PreparedImages(examples, data_dir=staging, file_format="array_record").download_and_prepare()
  for name, entries in kept.items():
    logging.info("prepare: %s: %d of %d images kept", name, len(entries), len(splits[name]))
  record = {**record, "format_version": FORMAT_VERSION,
            "splits": {name: {"images": len(entries),
                              "captions": sum(len(e.captions) for e, _ in entries)}
                       for name, entries in kept.items()},
            "skipped": {"count": bad.count, "messages": bad.first(bad.count)}}
  for name, entries in kept.items():
    index = {"files": [e.file for e, _ in entries], "image_ids": [e.image_id for e, _ in entries],
             "captions": [list(e.captions) for e, _ in entries],
             "bytes": [size for _, size in entries]}
    files.atomic_write_text(os.path.join(staging, f"index-{name}.json"), json.dumps(index))
  record["files"] = _listing(staging)
  files.atomic_write_text(os.path.join(staging, PREPARED), json.dumps(record, indent=1))
  os.replace(staging, directory)
  return record


def _readable(entries: list[ImageEntry], image_root: str, bad: BadExamples, pool, kept: list):
  """The examples of the entries whose image file is readable (read `_READ_AHEAD` at a time by
  `pool`, so a split's bytes are never all in memory), appending (entry, image size) to `kept`. Bad
  images are reported to `bad` in entry order, whichever thread read them."""
  def read(entry):
    problems = BadExamples("skip")
    return read_image(os.path.join(image_root, entry.file), entry.where, problems), problems

  for start in range(0, len(entries), _READ_AHEAD):
    chunk = entries[start:start + _READ_AHEAD]
    for entry, (data, problems) in zip(chunk, pool.map(read, chunk)):
      bad.report_all(problems)
      if data is not None:
        kept.append((entry, len(data)))
        yield {"image": data, "file": entry.file, "image_id": entry.image_id,
               "captions": list(entry.captions)}


def _listing(directory: str) -> dict[str, dict]:
  """{relative path: {"bytes"[, "sha256"]}} of every file: the image shards by size (hashing
  gigabytes at every start would cost minutes), the small files (index, TFDS metadata) by hash."""
  listing = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      entry = {"bytes": os.path.getsize(path)}
      if ".array_record" not in name:
        entry["sha256"] = files.file_digest(path)
      listing[os.path.relpath(path, directory)] = entry
  return listing


def read_record(directory: str) -> dict | None:
  """The prepared.json of a complete prepared directory, or None if there is none. A directory
  whose files or counts are not those it was prepared with (a shard deleted or truncated, an index
  or prepared.json edited) is an InputError."""
  path = os.path.join(directory, PREPARED)
  if not os.path.exists(path):
    return None
  again = f"delete {directory} to prepare it again"
  try:
    with open(path) as f:
      record = json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{path} is unreadable ({e}); {again}") from None
  version = record.get("format_version") if isinstance(record, dict) else None
  if version != FORMAT_VERSION:
    raise InputError(f"{path}: format {version}, not this version's {FORMAT_VERSION}; {again}")
  for name, expected in record["files"].items():
    file = os.path.join(directory, name)
    if not os.path.isfile(file):
      raise InputError(f"{file} is missing from the prepared dataset; {again}")
    if os.path.getsize(file) != expected["bytes"]:
      raise InputError(f"{file} has {os.path.getsize(file)} bytes, prepared with "
                       f"{expected['bytes']}; {again}")
    if "sha256" in expected and files.file_digest(file) != expected["sha256"]:
      raise InputError(f"{file} differs from the file prepared; {again}")
  for name, counts in record["splits"].items():
    index = read_index(directory, name)
    held = {"images": len(index["files"]), "captions": sum(map(len, index["captions"]))}
    if held != counts:
      raise InputError(f"{path} says split {name} has {counts}, its index holds {held}; {again}")
  return record


def read_index(directory: str, split: str) -> dict:
  """{"files", "image_ids", "captions", "bytes"} of one prepared split."""
  path = os.path.join(directory, f"index-{split}.json")
  try:
    with open(path) as f:
      index = json.load(f)
    if not all(len(index[k]) == len(index["files"]) for k in ("image_ids", "captions", "bytes")):
      raise ValueError("its lists differ in length")
  except (OSError, ValueError, KeyError, TypeError) as e:
    raise InputError(f"{path} is unreadable ({e!r}); delete {directory} to prepare it "
                     "again") from None
  return index


def open_source(directory: str, split: str):
  """The random-access records of `split` (TFDS split syntax: "train+restval", "val[:1000]")."""
  builder = tfds.builder_from_directory(os.path.join(directory, "prepared_images",
                                                     str(PreparedImages.VERSION)))
  return builder.as_data_source(split)


class ImageFileRecords:
  """Images of prepared records by row (the `sources.ImageRecords` protocol): `records[rows]`
  decodes and resizes them to `size` (the evaluation view); `train_views` makes the training
  augmentation's views. Picklable (grain's worker processes get a copy that reopens the files)."""

  def __init__(self, source: Sequence, files: Sequence[str], size: int, crop_scale=(0.5, 1.0),
               randaugment=(2, 7), exif_orientation: str = "ignore", view: str = "resize"):
    self._source, self._files, self.size = source, files, size
    self.crop_scale, self.randaugment = tuple(crop_scale), tuple(randaugment)
    self.exif_orientation, self.view = exif_orientation, view

  def __len__(self) -> int:
    return len(self._files)

  def at_size(self, size: int, view: str = "resize") -> "ImageFileRecords":
    return ImageFileRecords(self._source, self._files, size, self.crop_scale, self.randaugment,
                            self.exif_orientation, view)

  def _decoded(self, rows: np.ndarray):
    rows = [int(r) for r in np.atleast_1d(rows)]
    for row, record in zip(rows, self._source.__getitems__(rows)):
      try:
        yield transforms.decode(record["image"], self.exif_orientation)
      except InputError as e:
        raise InputError(f"image record {row} ({self._files[row]}): {e}") from None

  def __getitem__(self, rows):
    make = transforms.eval_view if self.view == "resize" else transforms.center_crop_view
    views = np.stack([make(image, self.size) for image in self._decoded(rows)])
    return views if np.ndim(rows) else views[0]

  def train_views(self, rows: np.ndarray, seeds: Sequence[Sequence[int]]) -> np.ndarray:
    """The augmented training views (uint8, len(rows) x size x size x 3), view i drawn from
    `np.random.default_rng(seeds[i])`."""
    return np.stack([
        transforms.train_view(image, np.random.default_rng(seed), self.size, self.crop_scale,
                              self.randaugment)
        for image, seed in zip(self._decoded(rows), seeds)])
