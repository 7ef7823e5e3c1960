"""The teacher-feature job: the frozen teachers run once over the training set (METHOD.md §3).

Features are stored per image (`image.npy`, one row per training image) and per caption
(`text.npy`, one row per training caption), not one row per pair; training reads the rows of each
batch by index from the memory-mapped files. Every process computes its own rows of each global
batch and writes them into the shared files; process 0 then records their content hashes and,
last, the manifest that marks them complete. The manifest names the teachers (their config and
weight hashes), the vocabulary and the training split's size: features written for anything else
are computed again.
"""

import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax import files, interrupts, reporting, sharding
from rebalance_jax.data import pipeline
from rebalance_jax.data.dataset import Dataset

FEATURE_FILES = {"image": "image.npy", "text": "text.npy"}
MANIFEST = "manifest.json"
_LAYOUT = "per-image and per-caption rows, float32"


class TeacherFeatures:
  """Memory-mapped feature files: `rows(batch)` reads a training batch's rows by index."""

  def __init__(self, directory: str):
    self.arrays = {m: np.load(os.path.join(directory, name), mmap_mode="r")
                   for m, name in FEATURE_FILES.items()}

  def rows(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> dict[str, np.ndarray]:
    return {"teacher_image": np.asarray(self.arrays["image"][image_rows]),
            "teacher_text": np.asarray(self.arrays["text"][caption_rows])}


def teacher_features(teachers: dict, data: Dataset, mesh, directory: str, fingerprint: dict,
                     batch_size: int) -> TeacherFeatures:
  """The teachers' features of every training image and caption: read from `directory` if they
  are there, intact and written by these teachers for this split, else computed sharded over
  devices and processes and written there."""
  train = data.train
  manifest = {"teachers": fingerprint, "layout": _LAYOUT,
              "weights": {m: t.weights_sha256 for m, t in teachers.items()},
              "rows": {"image": train.num_images, "text": train.num_captions},
              "dims": {m: t.dim for m, t in teachers.items()}}
  problem = _feature_problem(directory, manifest) if reporting.is_main_process() else None
  # Process 0 decides, so that every process takes the same path through the collectives.
  if bool(multihost_utils.broadcast_one_to_all(np.array(problem is None))):
    return TeacherFeatures(directory)
  if problem != "absent":
    logging.warning("teacher features in %s: %s; computing them again", directory, problem)
  image_teacher, text_teacher = teachers["image"], teachers["text"]
  jobs = {
      "image": (jax.jit(lambda image: image_teacher.features(image_teacher.params, image)),
                train.num_images, pipeline.image_rows(train)),
      "text": (jax.jit(lambda ids, mask: text_teacher.features(text_teacher.params, ids, mask)),
               train.num_captions, pipeline.caption_rows(train, text_teacher.encode)),
  }
  partial = {m: os.path.join(directory, name + ".partial") for m, name in FEATURE_FILES.items()}
  if reporting.is_main_process():
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, MANIFEST)):
      os.remove(os.path.join(directory, MANIFEST))  # the files below are no longer its files
    for modality, path in partial.items():
      np.lib.format.open_memmap(path, "w+", np.float32,
                                (manifest["rows"][modality], manifest["dims"][modality])).flush()
  multihost_utils.sync_global_devices("teacher features: files created")
  for modality, (fn, num_rows, load_rows) in jobs.items():
    out = np.load(partial[modality], mmap_mode="r+")
    _write_local_rows(fn, num_rows, load_rows, batch_size, mesh, out)
    out.flush()
    del out
  multihost_utils.sync_global_devices("teacher features: rows written")
  if reporting.is_main_process():
    for modality, name in FEATURE_FILES.items():
      path = os.path.join(directory, name)
      os.replace(partial[modality], path)
      files.write_digest(path)
    files.atomic_write_text(os.path.join(directory, MANIFEST),
                            json.dumps(manifest))  # last: marks the files complete
  multihost_utils.sync_global_devices("teacher features: complete")
  return TeacherFeatures(directory)


def _write_local_rows(fn, num_rows: int, load_rows, batch_size: int, mesh, out: np.ndarray):
  """out[r] = fn(rows)[r] for this process's rows r of each global batch."""
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  for start, rows, _ in pipeline.padded_batches(num_rows, batch_size):
    interrupts.check("the teacher-feature job")
    result = fn(**sharding.to_global(load_rows(rows), mesh))
    for shard in result.addressable_shards:
      if shard.replica_id:
        continue
      first = start + (shard.index[0].start or 0)
      block = np.asarray(shard.data)
      keep = min(len(block), max(num_rows - first, 0))
      out[first:first + keep] = block[:keep]  # padding rows lie past num_rows


def _feature_problem(directory: str, manifest: dict) -> str | None:
  """Why the feature files in `directory` cannot be used for `manifest` ("absent" when there are
  none), or None when they can."""
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.exists(manifest_path):
    return "absent"
  try:
    with open(manifest_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    return f"{manifest_path} is unreadable ({e})"
  if saved != json.loads(json.dumps(manifest)):
    return f"{manifest_path} names other teachers or training rows"
  for modality, name in FEATURE_FILES.items():
    path = os.path.join(directory, name)
    if not files.is_intact(path):
      return f"{path} is missing or fails its content check"
    shape = np.load(path, mmap_mode="r").shape
    if shape != (manifest["rows"][modality], manifest["dims"][modality]):
      return f"{path} has shape {shape}, not one row per training {modality} row"
  return None
