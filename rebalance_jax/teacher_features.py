"""The teacher-feature job: the frozen teachers run once over the training set (METHOD.md §3).

Features are stored per image (one row per training image) and per caption (one row per training
caption), not one row per pair. The job runs sharded over devices and processes in padded global
batches (`pipeline.padded_batches`); each process streams the rows it computed into its own shard
file, `<modality>-<process>-of-<processes>.npy` (no file is written by two processes, so any
shared filesystem works), with its content hash. Process 0 then writes the manifest that marks the
set complete: it names the teachers (config and weight hashes), the vocabulary, the split's size
and the layout (batch size, process count) that maps a global row to its shard.
`TeacherFeatures.rows` reads a training batch's rows by index from the memory-mapped shards.
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

MODALITIES = ("image", "text")
MANIFEST = "manifest.json"
_LAYOUT = "per-image and per-caption rows, float32, one shard per process"
# How the rows are split into shards: any layout is read back, whatever the process count now.
_LAYOUT_FIELDS = ("batch_size", "num_processes")


def shard_path(directory: str, modality: str, process: int, num_processes: int) -> str:
  return os.path.join(directory, f"{modality}-{process:05d}-of-{num_processes:05d}.npy")


class TeacherFeatures:
  """The feature shards of a complete job in `directory`, memory-mapped."""

  def __init__(self, directory: str):
    with open(os.path.join(directory, MANIFEST)) as f:
      manifest = json.load(f)
    self.batch_size, self.num_processes = manifest["batch_size"], manifest["num_processes"]
    self.num_rows = manifest["rows"]
    self._shards = {m: [np.load(shard_path(directory, m, p, self.num_processes), mmap_mode="r")
                        for p in range(self.num_processes)] for m in MODALITIES}

  def read(self, modality: str, rows: np.ndarray) -> np.ndarray:
    """Feature rows of global row indices `rows`."""
    rows = np.asarray(rows)
    per_process = self.batch_size // self.num_processes
    batch, offset = np.divmod(rows, self.batch_size)
    process, within = np.divmod(offset, per_process)
    local = batch * per_process + within
    shards = self._shards[modality]
    out = np.empty((len(rows), shards[0].shape[1]), np.float32)
    for p in np.unique(process):
      take = process == p
      out[take] = shards[p][local[take]]
    return out

  def rows(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> dict[str, np.ndarray]:
    """A training batch's teacher inputs: its image rows' and caption rows' features."""
    return {"teacher_image": self.read("image", image_rows),
            "teacher_text": self.read("text", caption_rows)}


def teacher_features(teachers: dict, data: Dataset, mesh, directory: str, fingerprint: dict,
                     batch_size: int) -> TeacherFeatures:
  """The teachers' features of every training image and caption: read from `directory` if they
  are there, intact and written by these teachers for this split, else computed sharded over
  devices and processes and written there."""
  train = data.train
  num_processes = jax.process_count()
  manifest = {"teachers": fingerprint, "layout": _LAYOUT,
              "weights": {m: t.weights_sha256 for m, t in teachers.items()},
              "rows": {"image": train.num_images, "text": train.num_captions},
              "dims": {m: t.dim for m, t in teachers.items()},
              "batch_size": batch_size, "num_processes": num_processes}
  problem = _feature_problem(directory, manifest) if reporting.is_main_process() else None
  # Process 0 decides, so that every process takes the same path through the collectives.
  if bool(multihost_utils.broadcast_one_to_all(np.array(problem is None))):
    return TeacherFeatures(directory)
  if problem != "absent":
    logging.warning("teacher features in %s: %s; computing them again", directory, problem)
  if reporting.is_main_process():
    os.makedirs(directory, exist_ok=True)
    if os.path.exists(os.path.join(directory, MANIFEST)):
      os.remove(os.path.join(directory, MANIFEST))  # the shards are about to change
  multihost_utils.sync_global_devices("teacher features: directory ready")
  sources = {"image": (train.num_images, pipeline.image_rows(train)),
             "text": (train.num_captions, pipeline.caption_rows(
                 train, lambda captions: teachers["text"].encode(captions, train=True)))}
  for modality, (num_rows, load_rows) in sources.items():
    teacher = teachers[modality]
    path = shard_path(directory, modality, jax.process_index(), num_processes)
    files.atomic_write(path, lambda f, t=teacher, n=num_rows, load=load_rows: _stream_rows(
        f, jax.jit(t.features), t.params, n, load, batch_size, mesh, manifest["dims"][t.modality]))
    files.write_digest(path)
  multihost_utils.sync_global_devices("teacher features: shards written")
  if reporting.is_main_process():
    files.atomic_write_text(os.path.join(directory, MANIFEST),
                            json.dumps(manifest))  # last: marks the shards complete
  multihost_utils.sync_global_devices("teacher features: complete")
  return TeacherFeatures(directory)


def _stream_rows(f, fn, params, num_rows: int, load_rows, batch_size: int, mesh, dim: int):
  """Writes a .npy of this process's rows of each padded global batch of fn(params, *rows)."""
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  per_process = batch_size // jax.process_count()
  num_batches = -(-num_rows // batch_size)
  np.lib.format.write_array_header_1_0(f, {
      "descr": np.lib.format.dtype_to_descr(np.dtype(np.float32)), "fortran_order": False,
      "shape": (num_batches * per_process, dim)})
  expected_start = sharding.process_slice(batch_size).start
  for start, rows, _ in pipeline.padded_batches(num_rows, batch_size):
    interrupts.check("the teacher-feature job")
    result = fn(params, *sharding.to_global(load_rows(rows), mesh).values())
    shards = sorted((s for s in result.addressable_shards if s.replica_id == 0),
                    key=lambda s: s.index[0].start or 0)
    if (shards[0].index[0].start or 0) != expected_start:
      raise RuntimeError("this process's devices do not hold its rows of the batch")
    block = np.concatenate([np.asarray(s.data) for s in shards])
    assert block.shape == (per_process, dim), block.shape
    f.write(np.ascontiguousarray(block, np.float32).tobytes())


def _feature_problem(directory: str, manifest: dict) -> str | None:
  """Why the feature shards in `directory` cannot be used for `manifest` ("absent" when there is
  no manifest), or None when they can."""
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.exists(manifest_path):
    return "absent"
  try:
    with open(manifest_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    return f"{manifest_path} is unreadable ({e})"
  content = lambda m: {k: v for k, v in m.items() if k not in _LAYOUT_FIELDS}
  if not isinstance(saved, dict) or content(saved) != content(json.loads(json.dumps(manifest))):
    return f"{manifest_path} names other teachers or training rows"
  try:  # any layout reads back: the one the shards were written with
    batch_size, num_processes = int(saved["batch_size"]), int(saved["num_processes"])
  except (KeyError, TypeError, ValueError):
    return f"{manifest_path} has no valid layout"
  per_process = batch_size // num_processes
  for modality in MODALITIES:
    num_batches = -(-manifest["rows"][modality] // batch_size)
    for process in range(num_processes):
      path = shard_path(directory, modality, process, num_processes)
      if not files.is_intact(path):
        return f"{path} is missing or fails its content check"
      shape = np.load(path, mmap_mode="r").shape
      if shape != (num_batches * per_process, manifest["dims"][modality]):
        return f"{path} has shape {shape}, not this process's rows of every batch"
  return None
