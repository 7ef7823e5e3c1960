"""The paper's datasets (docs/method.md §6): Flickr30K, MS-COCO and VizWiz-Captions from local files.

`prepare(data)` parses the annotation files (`annotations.py`: Karpathy split files, the reference
implementation's JSON lists, VizWiz-Captions), verifies every image and writes the prepared
dataset (`prepared.py`) once, under a directory named by the annotations' content hashes; `load`
reads it as a `sources.Source`, applying the split conventions of config.data.<name>:

  flickr30k  Karpathy train / val / test; add_val_to_train: [ref] trains on the val images too
  coco       Karpathy train + restval (use_restval) / val / test; COCO-1K is config.eval.subsets
  vizwiz     official train; test: the first test_images images of the official val split; val:
             the rest of the official val split (val="rest"), or the test images as [ref] ("test")

Every evaluation image keeps its first eval_captions_per_image captions (5); preparing treats an
evaluation image with fewer as a bad example, except on VizWiz, where the excluded captions make
that common: those images are left out of evaluation and listed in prepared.json.
"""

import hashlib
import json
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax.data import annotations, prepared, sources
from rebalance_jax.infra import files, logs
from rebalance_jax.infra.errors import InputError

FORMATS = ("karpathy", "reference", "vizwiz")
# config.data.<name>: the split conventions, with their defaults ([ref]'s, except where noted).
OPTIONS = {
    # add_val_to_train: [ref] trains on the val images too (then val selects on training data).
    "flickr30k": dict(format="karpathy", add_val_to_train=False, eval_captions_per_image=5),
    "coco": dict(format="karpathy", use_restval=True, eval_captions_per_image=5),
    # val: "rest" (the official val images after the test ones: held out); [ref] "test" (the
    # test images themselves, so that selecting on val selects on test).
    "vizwiz": dict(format="vizwiz", test_images=1000, val="rest", include_rejected=False,
                   include_precanned=False, eval_captions_per_image=5),
}

# The config.data fields holding each format's annotation files.
_ANNOTATION_FIELDS = {"karpathy": ("annotation_file",),
                      "reference": ("train_file", "val_file", "test_file"),
                      "vizwiz": ("train_file", "val_file")}
# The prepared splits of each format that serve evaluation.
_EVAL_SPLITS = {"karpathy": ("val", "test"), "reference": ("val", "test"), "vizwiz": ("val",)}


def annotation_paths(data) -> dict[str, str]:
  """{config field: path} of the annotation files the dataset's format reads; each must exist."""
  paths = {}
  for field in ("image_root",) + _ANNOTATION_FIELDS[options(data)["format"]]:
    path = getattr(data, field)
    if not path:
      raise InputError(f"config.data.{field} is not set: pass "
                       f"--config.data.{field}=/path/on/this/machine")
    expanded = os.path.expanduser(path)
    if not os.path.exists(expanded):
      raise InputError(f"config.data.{field}={path!r} does not exist")
    kind, is_kind = ("a directory", os.path.isdir) if field == "image_root" else ("a file",
                                                                                os.path.isfile)
    if not is_kind(expanded):
      raise InputError(f"config.data.{field}={path!r} is not {kind}")
    paths[field] = expanded
  return paths


def preparation(data) -> dict:
  """What a prepared dataset is made from: format, the annotation files' SHA-256, the
  preparation options. Its hash names the prepared directory and is the data's identity."""
  o = options(data)
  annotation_files = {field: path for field, path in annotation_paths(data).items()
                      if field != "image_root"}
  record = {"dataset": data.name, "format": o["format"],
            "annotations": {field: {"file": os.path.basename(path),
                                    "sha256": files.file_digest(path)}
                            for field, path in annotation_files.items()},
            "on_bad_example": data.on_bad_example,
            "eval_captions_per_image": o["eval_captions_per_image"]}
  if o["format"] == "vizwiz":
    record.update(include_rejected=o["include_rejected"], include_precanned=o["include_precanned"])
  return record


def identity(record: dict) -> str:
  return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()


def prepared_dir(data, record: dict) -> str:
  """config.data.prepared_dir, or <cache_dir>/prepared/<name>-<identity> by default."""
  if data.prepared_dir:
    return os.path.normpath(os.path.expanduser(data.prepared_dir))
  return os.path.join(os.path.expanduser(data.cache_dir), "prepared",
                      f"{data.name}-{identity(record)[:16]}")


def prepare(data, record: dict | None = None) -> tuple[str, dict]:
  """Writes the prepared dataset of `data` (a spec.DataSpec) unless a complete one made from the
  same annotations is there (`record`: its `preparation`, if known). Returns (its directory, its
  prepared.json record)."""
  record = record or preparation(data)
  directory = prepared_dir(data, record)
  existing = _complete(directory, record, data.image_root)  # written last: complete, no lock
  if existing is not None:
    return directory, existing
  # One lock per prepared dataset: preparing another dataset in the same cache goes on; a second
  # preparation of this one waits, then finds it complete.
  waiting = lambda holder: logging.info("prepare: waiting for %s, which prepares %s", holder,
                                        directory)
  with files.WorkdirLock(os.path.dirname(directory), f"preparation of {data.name}", wait=True,
                         name=f".{os.path.basename(directory)}.lock", on_wait=waiting):
    existing = _complete(directory, record, data.image_root)
    if existing is not None:
      return directory, existing
    o = options(data)
    paths = annotation_paths(data)
    bad = annotations.BadExamples(data.on_bad_example)
    if o["format"] == "karpathy":
      splits = annotations.read_karpathy(paths["annotation_file"], bad)
    elif o["format"] == "reference":
      splits = annotations.read_reference_lists(paths["train_file"], paths["val_file"],
                                                paths["test_file"], bad)
    else:
      splits = annotations.read_vizwiz(paths["train_file"], paths["val_file"], bad,
                                       o["include_rejected"], o["include_precanned"])
    short = {}
    for name in _EVAL_SPLITS[o["format"]]:
      splits[name], short[name] = _with_eval_captions(splits[name], o["eval_captions_per_image"],
                                                      bad, o["format"] == "vizwiz")
    logging.info("prepare: writing %s (%s) to %s", data.name,
                 ", ".join(f"{k} {len(v)} images" for k, v in splits.items()), directory)
    return directory, prepared.write(directory, splits, paths["image_root"], bad,
                                     {**record, "short_eval_images": short})


def _complete(directory: str, record: dict, image_root: str) -> dict | None:
  """The prepared.json of a complete dataset in `directory` made as `record` says from the images
  under `image_root` (`_check_images`), None if the directory is absent; anything else there is
  refused (it is never deleted)."""
  existing = prepared.read_record(directory)
  if existing is None:
    if os.path.exists(directory) and os.listdir(directory):
      raise InputError(f"config.data.prepared_dir={directory!r} exists and is not a prepared "
                       "dataset (no prepared.json): point it at a new or empty directory")
    return None
  made_from = {k: existing.get(k) for k in record}
  if made_from != record:
    differ = sorted(k for k in record if made_from[k] != record[k])
    raise InputError(f"config.data.prepared_dir={directory!r} holds a dataset prepared from other "
                     f"{', '.join(differ)} (its prepared.json says what); point "
                     "config.data.prepared_dir elsewhere or delete it")
  _check_images(directory, existing, image_root)
  return existing


_IMAGES_CHECKED = 16  # per split, evenly spread: a stat each, at every start


def _check_images(directory: str, record: dict, image_root: str) -> None:
  """The prepared images are still those under `image_root`: a sample of each split's files has
  the sizes they were prepared with. (Training reads the prepared copies; this catches an
  image_root pointed at other or re-encoded images, which would otherwise be silently ignored.)"""
  root = os.path.expanduser(image_root)
  for split in record["splits"]:
    index = prepared.read_index(directory, split)
    for row in np.unique(np.linspace(0, len(index["files"]) - 1, _IMAGES_CHECKED).astype(int)
                         if index["files"] else []):
      path = os.path.join(root, index["files"][row])
      size = os.path.getsize(path) if os.path.isfile(path) else None
      if size != index["bytes"][row]:
        now = "is missing" if size is None else f"has {size} bytes"
        raise InputError(
            f"config.data.image_root={image_root!r} holds other images than the dataset prepared "
            f"in {directory}: {index['files'][row]} {now}, prepared from {index['bytes'][row]}; "
            "point config.data.prepared_dir (or cache_dir) elsewhere to prepare these images")


def _with_eval_captions(entries, per_image: int, bad, leave_out: bool) -> tuple[list, list]:
  """(the entries with at least `per_image` captions, the files of those without). Without
  `leave_out` an evaluation image with fewer is a bad example; with it (VizWiz, whose rejected
  and pre-canned captions are excluded) it is left out of evaluation, listed in prepared.json."""
  kept, short = [], []
  for entry in entries:
    if len(entry.captions) >= per_image:
      kept.append(entry)
    elif leave_out:
      short.append(entry.file)
    else:
      bad.report(entry.where, f"{len(entry.captions)} captions; an evaluation image needs "
                 f"{per_image}")
  if short:
    logging.warning("prepare: %d evaluation images have fewer than %d captions left and are left "
                    "out of evaluation (the first: %s)", len(short), per_image, short[0])
  return kept, short


def ensure_prepared(data, record: dict) -> tuple[str, dict]:
  """`prepare` on process 0 while the others wait; then every process reads the directory (it
  must be on a filesystem they share)."""
  problem = ""
  if logs.is_main_process():
    try:
      prepare(data, record)
    except InputError as e:
      problem = str(e)
  # Process 0 decides, so that every process takes the same path through the collectives.
  if bool(multihost_utils.broadcast_one_to_all(np.array(bool(problem)))):
    raise InputError(problem or "process 0 could not prepare the dataset (its log says why)")
  directory = prepared_dir(data, record)
  existing = prepared.read_record(directory)
  if existing is None:
    raise InputError(f"{directory} is not visible to process {jax.process_index()}: "
                     "config.data.cache_dir (or prepared_dir) must be on a filesystem every "
                     "process shares")
  return directory, existing


def load(data) -> sources.Source:
  record = preparation(data)
  directory, prepared_record = ensure_prepared(data, record)
  data_identity = identity(record)
  o = options(data)
  split = lambda spec, first=None: _split(directory, spec, data, first)
  per_image = o["eval_captions_per_image"]
  if data.name == "vizwiz":
    n = o["test_images"]
    available = prepared_record["splits"]["val"]["images"]
    if available < n:
      raise InputError(f"config.data.vizwiz.test_images={n} exceeds the {available} images of "
                       "the official val split")
    train, test = "train", split(f"val[:{n}]", per_image)
    if o["val"] == "rest" and available == n:
      raise InputError(f"config.data.vizwiz.val='rest' leaves no validation images: the official "
                       f"val split has {available}, all of them test images (test_images={n})")
    val = test if o["val"] == "test" else split(f"val[{n}:]", per_image)
  else:
    train = "train"
    restval = prepared_record["splits"].get("restval", {}).get("images")  # Karpathy files only
    if data.name == "coco" and o["use_restval"] and restval:
      train += "+restval"
    if data.name == "flickr30k" and o["add_val_to_train"]:
      train += "+val"
    val, test = split("val", per_image), split("test", per_image)
  # Derived files (a vocabulary trained on the training captions) depend on the training split.
  derived = os.path.join(os.path.expanduser(data.cache_dir), "derived",
                         f"{data.name}-{identity({'data': data_identity, 'train': train})[:16]}")
  return sources.Source({"train": split(train), "val": val, "test": test}, cache_dir=derived,
                        identity=data_identity)


def _split(directory: str, spec: str, data, captions_per_image: int | None) -> sources.Split:
  """The split `spec` (TFDS split syntax over the prepared splits, e.g. "train+restval",
  "val[:1000]"), keeping the first `captions_per_image` captions of each image if given."""
  files_, image_ids, captions = [], [], []
  for part in spec.split("+"):
    index = prepared.read_index(directory, part.split("[")[0])
    rows = _rows(part, len(index["files"]))
    files_ += [index["files"][i] for i in rows]
    image_ids += [index["image_ids"][i] for i in rows]
    captions += [index["captions"][i][:captions_per_image] for i in rows]
  if not files_:
    raise InputError(f"{directory}: split {spec} has no images")
  source = prepared.open_source(directory, spec)
  # Record i is index row i: the same count, and the first and last records name its files.
  if len(source) != len(files_) or any(
      source[i]["file"].decode() != files_[i] for i in (0, len(files_) - 1)):
    raise InputError(f"{directory}: split {spec}'s records and its index disagree; delete the "
                     "directory to prepare it again")
  records = prepared.ImageFileRecords(source, files_, data.image_size, data.crop_scale,
                                      data.randaugment, data.exif_orientation)
  ids = {}
  image_index = np.array([ids.setdefault(i, len(ids)) for i in image_ids], np.int32)
  caption_image = np.repeat(np.arange(len(captions), dtype=np.int32), [len(c) for c in captions])
  return sources.Split(records, tuple(c for caps in captions for c in caps), caption_image,
                       image_index)


def _rows(spec: str, n: int) -> range:
  """The rows of a TFDS split spec "name" or "name[a:b]" of a split of n rows."""
  if "[" not in spec:
    return range(n)
  start, stop = spec[spec.index("[") + 1:-1].split(":")
  return range(n)[slice(int(start) if start else None, int(stop) if stop else None)]


def options(data) -> dict:
  """config.data.<name> of `data` over its defaults; an unknown or invalid value is an
  InputError naming the field."""
  field = f"config.data.{data.name}"
  o = sources.options(data)
  if o["format"] not in FORMATS or (data.name == "vizwiz") != (o["format"] == "vizwiz"):
    allowed = ("vizwiz",) if data.name == "vizwiz" else ("karpathy", "reference")
    raise InputError(f"{field}.format={o['format']!r} is not one of {allowed}")
  if o["eval_captions_per_image"] < sources.CAPTIONS_PER_IMAGE:
    raise InputError(f"{field}.eval_captions_per_image={o['eval_captions_per_image']} is below "
                     f"the {sources.CAPTIONS_PER_IMAGE} the evaluation protocols need")
  if data.name == "vizwiz":
    if o["val"] not in ("test", "rest"):
      raise InputError(f"{field}.val={o['val']!r} is not one of ('test', 'rest')")
    if o["test_images"] <= 0:
      raise InputError(f"{field}.test_images={o['test_images']} must be positive")
  return o


for _name, _defaults in OPTIONS.items():
  sources.register(_name, load, options=_defaults, encoded_images=True, prepare=prepare)
