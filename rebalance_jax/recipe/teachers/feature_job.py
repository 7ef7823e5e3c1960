"""The teacher-feature job: the frozen teachers run once over the training set (docs/method.md §3).

Features are stored per image (one row per training image) and per caption (one row per training
caption), not one row per pair, in chunks of `chunk_rows` global rows: `<modality>-<chunk>.npy`
(float32 or float16), each written atomically by process 0 with its content hash, so a killed job
resumes at the missing chunks. Every process runs every batch (sharded over all devices);
the features come back replicated and process 0 writes them.

The manifest, written before the first chunk, names what the features are made from: the
teachers' config fingerprint and weight hashes, each teacher's preprocessing (image size and
normalization; tokenizer vocabulary and limits), a real dataset's identity (its annotation
files' hashes; the synthetic data is described by the config), the row counts, dimensions and
dtype. Once every chunk is written, the manifest also lists each chunk's content hash, so a
chunk changed afterwards is noticed even with a matching `.sha256` beside it. Features whose
manifest names anything else are refused, never overwritten. `TeacherFeatures.rows` reads a
training batch's rows by global index from the memory-mapped chunks.
"""

import contextlib
import functools
import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec

from rebalance_jax.config import spec
from rebalance_jax.data import pipeline
from rebalance_jax.data.dataset import Dataset, load_dataset
from rebalance_jax.infra import files, interrupts, logs, sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.recipe import workdirs
from rebalance_jax.recipe.teachers import obtain

MODALITIES = ("image", "text")
MANIFEST = "manifest.json"
CHUNKS = "chunk_sha256"  # the manifest's {chunk file: content hash}, written once all are there
FORMAT = "per-image and per-caption rows in chunks of chunk_rows global rows"
CHUNK_ROWS = 16384


def chunk_path(directory: str, modality: str, chunk: int) -> str:
  return os.path.join(directory, f"{modality}-{chunk:05d}.npy")


def num_chunks(num_rows: int, chunk_rows: int) -> int:
  return -(-num_rows // chunk_rows)


class TeacherFeatures:
  """The feature chunks of a complete job in `directory`, memory-mapped when first read.
  Picklable: a copy (e.g. in a grain worker process) maps the files again."""

  def __init__(self, directory: str):
    self.directory = directory
    try:
      with open(os.path.join(directory, MANIFEST)) as f:
        manifest = json.load(f)
    except FileNotFoundError:
      raise InputError(f"teacher features in {directory} are not visible to process "
                       f"{jax.process_index()}: the features directory must be on a filesystem "
                       "every process shares") from None
    self.num_rows, self.dims = manifest["rows"], manifest["dims"]
    self.chunk_rows = manifest["chunk_rows"]
    self._chunks = {}

  def __getstate__(self):
    return {"directory": self.directory}

  def __setstate__(self, state):
    self.__init__(state["directory"])

  def _chunk(self, modality: str, chunk: int) -> np.ndarray:
    if (modality, chunk) not in self._chunks:
      self._chunks[modality, chunk] = np.load(chunk_path(self.directory, modality, chunk),
                                              mmap_mode="r")
    return self._chunks[modality, chunk]

  def read(self, modality: str, rows: np.ndarray) -> np.ndarray:
    """float32 feature rows of global row indices `rows`."""
    chunk, within = np.divmod(np.asarray(rows), self.chunk_rows)
    out = np.empty((len(chunk), self.dims[modality]), np.float32)
    for c in np.unique(chunk):
      take = chunk == c
      out[take] = self._chunk(modality, int(c))[within[take]]
    return out

  def rows(self, image_rows: np.ndarray, caption_rows: np.ndarray) -> dict[str, np.ndarray]:
    """A training batch's teacher inputs: its image rows' and caption rows' features."""
    return {"teacher_image": self.read("image", image_rows),
            "teacher_text": self.read("text", caption_rows)}


def manifest_of(teachers: dict, data: Dataset, fingerprint: dict, dtype: str,
                chunk_rows: int = CHUNK_ROWS) -> dict:
  """What the features of `teachers` over `data`'s training split are made from."""
  if dtype not in spec.FEATURE_DTYPES:
    raise InputError(f"config.teachers.feature_dtype={dtype!r} is not one of "
                     f"{spec.FEATURE_DTYPES}")
  return json.loads(json.dumps({
      "format": FORMAT, "teachers": fingerprint,
      "weights": {m: t.weights_sha256 for m, t in teachers.items()},
      "preprocessing": {m: t.preprocessing for m, t in teachers.items()},
      "data": data.identity,
      "rows": {"image": data.train.num_images, "text": data.train.num_captions},
      "dims": {m: t.dim for m, t in teachers.items()}, "dtype": dtype,
      "chunk_rows": chunk_rows}))


def run_job(exp: spec.Experiment, workdir: str) -> "TeacherFeatures":
  """`python -m rebalance_jax.teachers`: the features of a config's teachers, computed (or
  completed) in its features directory, in a locked workdir."""
  if not exp.uses_teachers:
    raise InputError("no stage of config.stages distills (no iic/ttc/kd/kdi/kdt weight): there "
                     "are no teacher features to compute")
  workdir = workdirs.check_workdir(workdir)
  mesh = workdirs.make_mesh(exp)
  with interrupts.catching(), workdirs.workdir_lock(workdir, "teacher-feature job"):
    data = load_dataset(exp.data)
    workdirs.check_checkpoint_configs(exp, workdir, data.content)
    teachers = obtain.obtain_teachers(exp, data, mesh, workdir)
    features = for_experiment(exp, teachers, data, mesh, workdir)
  logging.info("teacher features in %s: %s rows (image %d-d, text %d-d) on %d devices",
               features.directory, features.num_rows, features.dims["image"],
               features.dims["text"], jax.device_count())
  return features


def features_dir(exp: spec.Experiment, workdir: str) -> str:
  """config.teachers.features_dir, or <workdir>/teacher_features."""
  return os.path.expanduser(exp.teachers.features_dir) or os.path.join(workdir, "teacher_features")


def for_experiment(exp: spec.Experiment, teachers: dict, data: Dataset, mesh,
                   workdir: str) -> TeacherFeatures:
  """`teacher_features` of an Experiment's teachers, in its features directory."""
  return teacher_features(teachers, data, mesh, features_dir(exp, workdir),
                          exp.fingerprint("teachers", data.content), exp.eval.batch_size,
                          exp.teachers.feature_dtype)


def teacher_features(teachers: dict, data: Dataset, mesh, directory: str, fingerprint: dict,
                     batch_size: int, dtype: str = "float32",
                     chunk_rows: int = CHUNK_ROWS) -> TeacherFeatures:
  """The teachers' features of every training image and caption in `directory`: computed there
  (or the missing chunks of an interrupted job) unless complete. Raises InputError if the
  directory holds features of other teachers, preprocessing or data."""
  manifest = manifest_of(teachers, data, fingerprint, dtype, chunk_rows)
  missing, problem = {}, ""
  if logs.is_main_process():
    try:
      manifest, missing = _plan(directory, manifest)
    except InputError as e:
      problem = str(e)
  # Process 0 decides (refusal, chunk size, chunks to compute), so that every process takes the
  # same path through the collectives and computes the same rows.
  refused, chunk_rows = (int(x) for x in multihost_utils.broadcast_one_to_all(
      np.array([bool(problem), manifest["chunk_rows"]], np.int64)))
  if refused:
    raise InputError(problem or "process 0 refused the teacher features (its log says why)")
  manifest = {**manifest, "chunk_rows": chunk_rows}
  todo = np.zeros((len(MODALITIES), num_chunks(max(manifest["rows"].values()), chunk_rows)), bool)
  for i, modality in enumerate(MODALITIES):
    todo[i, missing.get(modality, [])] = True
  todo = np.asarray(multihost_utils.broadcast_one_to_all(todo))
  if todo.any():
    if logs.is_main_process():
      files.atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest))
    _compute(teachers, data, mesh, directory, manifest, batch_size, todo)
  if logs.is_main_process() and (todo.any() or CHUNKS not in manifest):
    manifest[CHUNKS] = {os.path.basename(path): files.recorded_digest(path)
                        for path in _chunk_paths(directory, manifest)}
    files.atomic_write_text(os.path.join(directory, MANIFEST), json.dumps(manifest))
  multihost_utils.sync_global_devices("teacher features: complete")
  return TeacherFeatures(directory)


def _plan(directory: str, manifest: dict) -> tuple[dict, dict[str, list[int]]]:
  """(the manifest to use, {modality: chunks to compute}) for `directory`; a saved manifest
  keeps its chunk size."""
  path = os.path.join(directory, MANIFEST)
  saved = None
  if os.path.exists(path):
    try:
      with open(path) as f:
        saved = json.load(f)
      if not isinstance(saved, dict) or saved.get("format") != FORMAT:
        raise ValueError("not a manifest of this format")
    except (OSError, ValueError) as e:
      logging.warning("teacher features: %s is unreadable (%s); computing them again", path, e)
      saved = None
  if saved is not None:
    differ = sorted(k for k in set(manifest) | set(saved) if k not in ("chunk_rows", CHUNKS) and
                    manifest.get(k) != saved.get(k))
    if differ:
      raise InputError(
          f"teacher features in {directory} were made from other {', '.join(differ)} than this "
          "config's (its manifest.json says what); delete the directory or point "
          "config.teachers.features_dir elsewhere")
    manifest = {**manifest, "chunk_rows": saved["chunk_rows"]}
  os.makedirs(directory, exist_ok=True)
  missing, recorded = {}, (saved or {}).get(CHUNKS, {})
  for modality in MODALITIES:
    chunks = range(num_chunks(manifest["rows"][modality], manifest["chunk_rows"]))
    missing[modality] = [c for c in chunks if saved is None or not _chunk_is_complete(
        directory, modality, c, manifest, recorded)]
  if not any(missing.values()) and recorded:
    manifest[CHUNKS] = recorded
  return manifest, missing


def _chunk_paths(directory: str, manifest: dict) -> list[str]:
  return [chunk_path(directory, modality, c) for modality in MODALITIES
          for c in range(num_chunks(manifest["rows"][modality], manifest["chunk_rows"]))]


def _chunk_is_complete(directory: str, modality: str, chunk: int, manifest: dict,
                       recorded: dict) -> bool:
  """Whether a chunk is intact: its content hash is the one beside it and, once the job has
  finished, the one its manifest lists."""
  path = chunk_path(directory, modality, chunk)
  if not os.path.exists(path):
    return False
  digest = files.file_digest(path)
  if digest != files.recorded_digest(path) or recorded.get(os.path.basename(path),
                                                            digest) != digest:
    logging.warning("teacher features: %s fails its content check; computing it again", path)
    return False
  rows = min(manifest["chunk_rows"], manifest["rows"][modality] - chunk * manifest["chunk_rows"])
  array = np.load(path, mmap_mode="r")
  return array.shape == (rows, manifest["dims"][modality]) and array.dtype == manifest["dtype"]


def _compute(teachers: dict, data: Dataset, mesh, directory: str, manifest: dict,
             batch_size: int, todo: np.ndarray) -> None:
  """Computes and (process 0) writes the chunks marked in `todo`."""
  sharding.check_batch_size(batch_size, mesh, "config.eval.batch_size")
  train, chunk_rows = data.train, manifest["chunk_rows"]
  replicated = NamedSharding(mesh, PartitionSpec())
  for i, modality in enumerate(MODALITIES):
    teacher = teachers[modality]
    if modality == "image":
      load_rows = pipeline.image_rows(train, size=teacher.tower.config.image_size,
                                      view=teacher.preprocessing["view"])
    else:
      load_rows = pipeline.caption_rows(train, functools.partial(teacher.encode, train=True))
    features = jax.jit(teacher.features, out_shardings=replicated)
    num_rows = manifest["rows"][modality]
    chunks = np.flatnonzero(todo[i])
    progress = logs.Progress(f"teacher features ({modality})", len(chunks), 0)
    for done, chunk in enumerate(chunks):
      start = int(chunk) * chunk_rows
      stop = min(start + chunk_rows, num_rows)
      blocks = []
      batches = list(pipeline.padded_batches(stop, batch_size, start))
      read = lambda b, load_rows=load_rows: load_rows(b[1])
      with contextlib.closing(pipeline.read_ahead(batches, read)) as loaded:
        for (first, _, _), batch in zip(batches, loaded):
          interrupts.check("the teacher-feature job")
          out = features(teacher.params, *sharding.to_global(batch, mesh).values())
          blocks.append(np.asarray(out.addressable_data(0))[:stop - first])
      if logs.is_main_process():
        block = np.concatenate(blocks).astype(manifest["dtype"])
        files.write_checked(chunk_path(directory, modality, int(chunk)),
                            lambda f, b=block: np.save(f, b, allow_pickle=False))
      progress.report(done + 1, {}, stop - start)
