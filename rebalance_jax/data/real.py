"""The paper's datasets (METHOD.md §6): Flickr30K, MS-COCO and VizWiz-Captions from local files.

`prepare(data)` parses the annotation files (`annotations.py`: Karpathy split files, the reference
implementation's JSON lists, VizWiz-Captions), verifies every image and writes the prepared
dataset (`prepared.py`) once, under a directory named by the annotations' content hashes; `load`
reads it as a `sources.Source`, applying the split conventions of config.data.<name>:

  flickr30k  Karpathy train / val / test; add_val_to_train: [ref] trains on the val images too
  coco       Karpathy train + restval (use_restval) / val / test; COCO-1K is config.eval.subsets
  vizwiz     official train; test: the first test_images images of the official val split; val:
             the same images as [ref] (val="test") or the rest of the official val split ("rest")

Every evaluation image keeps its first eval_captions_per_image captions (5); preparing treats an
evaluation image with fewer as a bad example.
"""

import hashlib
import json
import os

import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax import files, reporting
from rebalance_jax.data import annotations, prepared, sources
from rebalance_jax.errors import InputError
from rebalance_jax.evaluators import ranking

FORMATS = ("karpathy", "reference", "vizwiz")
# The config.data fields holding each format's annotation files.
_ANNOTATION_FIELDS = {"karpathy": ("annotation_file",),
                      "reference": ("train_file", "val_file", "test_file"),
                      "vizwiz": ("train_file", "val_file")}
# The prepared splits each format has, and those that serve evaluation.
_EVAL_SPLITS = {"karpathy": ("val", "test"), "reference": ("val", "test"), "vizwiz": ("val",)}
# config.data.<name>: the split conventions, with their defaults.
OPTIONS = {
    "flickr30k": dict(format="karpathy", add_val_to_train=False, eval_captions_per_image=5),
    "coco": dict(format="karpathy", use_restval=True, eval_captions_per_image=5),
    "vizwiz": dict(format="vizwiz", test_images=1000, val="test", include_rejected=False,
                   include_precanned=False, eval_captions_per_image=5),
}


def options(data) -> dict:
  """config.data.<name> over its defaults; unknown or invalid values are an InputError."""
  field = f"config.data.{data.name}"
  defaults = OPTIONS[data.name]
  unknown = sorted(set(data.options) - set(defaults))
  if unknown:
    raise InputError(f"{field}: unknown fields {unknown}; it has {sorted(defaults)}")
  o = {**defaults, **data.options}
  if o["format"] not in FORMATS or (data.name == "vizwiz") != (o["format"] == "vizwiz"):
    allowed = ("vizwiz",) if data.name == "vizwiz" else ("karpathy", "reference")
    raise InputError(f"{field}.format={o['format']!r} is not one of {allowed}")
  if o["eval_captions_per_image"] < ranking.CAPTIONS_PER_IMAGE:
    raise InputError(f"{field}.eval_captions_per_image={o['eval_captions_per_image']} is below "
                     f"the {ranking.CAPTIONS_PER_IMAGE} the evaluation protocols need")
  if data.name == "vizwiz":
    if o["val"] not in ("test", "rest"):
      raise InputError(f"{field}.val={o['val']!r} is not one of ('test', 'rest')")
    if o["test_images"] <= 0:
      raise InputError(f"{field}.test_images={o['test_images']} must be positive")
  return o


def annotation_paths(data) -> dict[str, str]:
  """{config field: path} of the annotation files the dataset's format reads; each must exist."""
  paths = {}
  for field in ("image_root",) + _ANNOTATION_FIELDS[options(data)["format"]]:
    path = getattr(data, field)
    if not path:
      raise InputError(f"config.data.{field} is not set: pass "
                       f"--config.data.{field}=/path/on/this/machine")
    if not os.path.exists(os.path.expanduser(path)):
      raise InputError(f"config.data.{field}={path!r} does not exist")
    paths[field] = os.path.expanduser(path)
  return paths


def preparation(data) -> dict:
  """What a prepared dataset is made from: format, the annotation files' SHA-256, the
  preparation options. Its hash names the prepared directory and is the data's identity."""
  o = options(data)
  paths = annotation_paths(data)
  record = {"dataset": data.name, "format": o["format"],
            "annotations": {field: {"file": os.path.basename(path), "sha256": files.file_digest(path)}
                            for field, path in paths.items() if field != "image_root"},
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
    return os.path.expanduser(data.prepared_dir)
  return os.path.join(os.path.expanduser(data.cache_dir), "prepared",
                      f"{data.name}-{identity(record)[:16]}")


def prepare(data) -> tuple[str, dict]:
  """Writes the prepared dataset of `data` (a spec.DataSpec) unless a complete one made from the
  same annotations is there. Returns (its directory, its prepared.json record)."""
  record = preparation(data)
  directory = prepared_dir(data, record)
  existing = prepared.read_record(directory)
  if existing is not None:
    made_from = {k: v for k, v in existing.items() if k in record}
    if made_from != record:
      raise InputError(f"config.data.prepared_dir={directory!r} holds a dataset prepared from "
                       f"other annotations or options ({made_from} != {record}); point "
                       "config.data.prepared_dir elsewhere or delete it")
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
  record["short_eval_images"] = short
  logging.info("prepare: writing %s (%s) to %s", data.name,
               ", ".join(f"{k} {len(v)} images" for k, v in splits.items()), directory)
  record = prepared.write(directory, splits, paths["image_root"], bad, record)
  if bad.count:
    logging.warning("prepare: %s", bad.summary())
  return directory, record


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


def ensure_prepared(data) -> tuple[str, dict]:
  """`prepare` on process 0 while the others wait; then every process has the directory."""
  result = prepare(data) if reporting.is_main_process() else None
  multihost_utils.sync_global_devices("prepared dataset ready")
  if result is None:
    record = preparation(data)
    directory = prepared_dir(data, record)
    result = directory, prepared.read_record(directory)
  return result


def load(data) -> sources.Source:
  directory, record = ensure_prepared(data)
  o = options(data)
  split = lambda spec, first=None: _split(directory, spec, data, first)
  if data.name == "vizwiz":
    n = o["test_images"]
    available = record["splits"]["val"]["images"]
    if available < n:
      raise InputError(f"config.data.vizwiz.test_images={n} exceeds the {available} images of "
                       "the official val split")
    test = split(f"val[:{n}]", o["eval_captions_per_image"])
    val = test if o["val"] == "test" else split(f"val[{n}:]", o["eval_captions_per_image"])
    return sources.Source({"train": split("train"), "val": val, "test": test},
                          cache_dir=directory, identity=identity(preparation(data)))
  train = "train"
  if data.name == "coco" and o["use_restval"] and "restval" in record["splits"]:
    train += "+restval"
  if data.name == "flickr30k" and o["add_val_to_train"]:
    train += "+val"
  per_image = o["eval_captions_per_image"]
  return sources.Source({"train": split(train), "val": split("val", per_image),
                         "test": split("test", per_image)},
                        cache_dir=directory, identity=identity(preparation(data)))


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
  if len(source) != len(files_):
    raise InputError(f"{directory}: split {spec} has {len(source)} records but its index "
                     f"{len(files_)} images; delete it to prepare it again")
  records = prepared.ImageFileRecords(source, files_, data.image_size, data.crop_scale,
                                      data.randaugment)
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
