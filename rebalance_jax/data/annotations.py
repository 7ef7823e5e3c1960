"""The three annotation formats of docs/method.md §6 read into image entries, and a bad-example
policy.

* Karpathy split files (`dataset_flickr30k.json`, `dataset_coco.json`);
* the reference implementation's JSON lists (train: one `{"image", "caption", "image_id"}` per
  pair; val/test: one `{"image", "caption": [...]}` per image);
* VizWiz-Captions (`annotations/train.json`, `val.json`; the images unzip to `train/` and `val/`
  beside them, e.g. `train/VizWiz_train_00000000.jpg`, so `file` is `<split>/<file_name>`
  relative to the dataset's root).

A malformed file (not JSON, the wrong top-level structure) is always an InputError naming it. A
bad example inside it (a missing or wrongly typed field, an empty caption, a string field with
bytes that are not UTF-8, an image without captions, an unreadable image) goes through
`BadExamples.report`, which raises under the policy 'error' and records and drops it under
'skip'; messages name the file and the JSON path of the field, e.g. `dataset_flickr30k.json: images[3].sentences[1].raw: empty after
cleaning ('!!!')`.
"""

import dataclasses
import io
import json
import os

from PIL import Image

from rebalance_jax.data.text import clean_caption
from rebalance_jax.infra.errors import InputError

POLICIES = ("error", "skip")
KARPATHY_SPLITS = ("train", "restval", "val", "test")
_ANY_LENGTH = 10**6  # clean_caption's word budget when only emptiness matters


@dataclasses.dataclass(frozen=True)
class ImageEntry:
  file: str                  # image path relative to the image root, as the annotation gives it
  captions: tuple[str, ...]  # raw captions in annotation order
  image_id: str              # identity: entries with equal image_id are the same image
  where: str                 # location for messages, e.g. "dataset_coco.json: images[12]"


class BadExamples:
  """What to do with a bad example: policy 'error' raises InputError, 'skip' records it."""

  def __init__(self, policy: str):
    if policy not in POLICIES:
      raise InputError(f"config.data.on_bad_example={policy!r} is not one of {POLICIES}")
    self.policy = policy
    self._reports: list[tuple[str, str]] = []

  def report(self, where: str, problem: str) -> None:
    if self.policy == "error":
      raise InputError(f"{where}: {problem}")
    self._reports.append((where, problem))

  def report_all(self, other: "BadExamples") -> None:
    """Reports what `other` recorded, in its order (e.g. a worker thread's own collector)."""
    for where, problem in other._reports:
      self.report(where, problem)

  @property
  def _messages(self) -> list[str]:
    return [f"{where}: {problem}" for where, problem in self._reports]

  @property
  def count(self) -> int:
    return len(self._reports)

  def first(self, n: int = 5) -> list[str]:
    return self._messages[:n]

  def summary(self) -> str:
    """'skipped 3 bad examples; the first: <message>; <message>; ...' (the first five)."""
    if not self._messages:
      return "no bad examples"
    plural = "" if self.count == 1 else "s"
    return f"skipped {self.count} bad example{plural}; the first: " + "; ".join(self.first())


# ------------------------------------------------------------------------------------ JSON files


def load_json(path: str) -> object:
  """The JSON value of a file; raises InputError naming the file (and where in it). Bytes that
  are not UTF-8 become lone surrogates (`surrogateescape`), so the string field holding them is
  a bad example (`_typed`), reported with its JSON path, not the whole file."""
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    raise InputError(f"annotation file not found: {path}") from None
  except OSError as e:
    raise InputError(f"annotation file {path} is unreadable ({e.strerror or e})") from None
  try:
    return json.loads(data.decode("utf-8", errors="surrogateescape"))
  except json.JSONDecodeError as e:
    raise InputError(f"{path}: malformed JSON at line {e.lineno}, column {e.colno} "
                     f"({e.msg})") from None


def _top_level(path: str, value, keys: tuple[str, ...] = ()):
  """`value` if it is a list (no `keys`) or an object whose `keys` hold lists; else InputError
  naming the file."""
  if not keys:
    if not isinstance(value, list):
      raise InputError(f"{path}: expected a JSON list at the top level, got {_describe(value)}")
    return value
  if not isinstance(value, dict):
    raise InputError(f"{path}: expected a JSON object with {' and '.join(map(repr, keys))} at the "
                     f"top level, got {_describe(value)}")
  for key in keys:
    if key not in value:
      raise InputError(f"{path}: the top-level object has no {key!r} list")
    if not isinstance(value[key], list):
      raise InputError(f"{path}: the top-level {key!r} is {_describe(value[key])}, not a list")
  return value


# -------------------------------------------------------------------------------------- fields


_JSON_KINDS = {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}
_KINDS = {str: "a string", list: "a list", dict: "an object", bool: "a boolean",
          (int, str): "an integer or a string"}


def _describe(value) -> str:
  """A JSON value in a few words: "a string 'abc'", "a list of 3 items", "an object with keys
  'a', 'b'"."""
  if isinstance(value, dict):
    keys = ", ".join(repr(k) for k in list(value)[:5]) + (", ..." if len(value) > 5 else "")
    return f"an object with keys {keys}" if value else "an empty object"
  if isinstance(value, list):
    return f"a list of {len(value)} items"
  if value is None:
    return "null"
  text = repr(value)
  return f"{_JSON_KINDS[type(value)]} {text if len(text) <= 40 else text[:37] + '...'}"


def _typed(bad: BadExamples, where: str, value, kind):
  """`value` if it has type `kind` (bools are not integers) and, if a string, is valid UTF-8
  text (not a lone surrogate: a "\\ud800" escape, or a byte `load_json` could not decode); else
  reported -> None."""
  if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
    bad.report(where, f"expected {_KINDS[kind]}, got {_describe(value)}")
    return None
  if isinstance(value, str):
    try:
      value.encode("utf-8")
    except UnicodeEncodeError as e:
      bad.report(where, f"not valid UTF-8 text ({e.reason} at character {e.start}: {value!r})")
      return None
  return value


def _field(bad: BadExamples, where: str, entry: dict, key: str, kind, default=None, required=True):
  """entry[key] checked to be a `kind`; None (reported) when wrong, or missing and required;
  `default` when missing and optional."""
  if key not in entry:
    if required:
      bad.report(f"{where}.{key}", "missing")
    return default
  return _typed(bad, f"{where}.{key}", entry[key], kind)


def _object(bad: BadExamples, where: str, entry) -> dict | None:
  return _typed(bad, where, entry, dict)


def _caption(bad: BadExamples, where: str, value) -> str | None:
  """`value` (at JSON path `where`) if it is a caption: a valid UTF-8 string, non-empty after
  cleaning; else reported -> None."""
  if _typed(bad, where, value, str) is None:
    return None
  if not clean_caption(value, _ANY_LENGTH):
    bad.report(where, f"empty after cleaning ({value!r})")
    return None
  return value


def _caption_field(bad: BadExamples, where: str, entry: dict, key: str) -> str | None:
  if key not in entry:
    bad.report(f"{where}.{key}", "missing")
    return None
  return _caption(bad, f"{where}.{key}", entry[key])


def _captions(bad: BadExamples, where: str, key: str, values: list) -> tuple[str, ...] | None:
  """The valid captions (not None) of an image's list entry[key]; None (reported) when none."""
  if not values:
    bad.report(f"{where}.{key}", "no captions")
    return None
  kept = tuple(c for c in values if c is not None)
  if not kept:
    bad.report(where, f"no valid captions (all {len(values)} dropped)")
    return None
  return kept


# -------------------------------------------------------------------------------------- Karpathy


def read_karpathy(path: str, bad: BadExamples) -> dict[str, list[ImageEntry]]:
  """A Karpathy split file -> {"train", "restval", "val", "test"} entries in file order.

  file: `filepath/filename` (COCO) or `filename` (Flickr30K); image_id: the cocoid, else the
  imgid, else the file.
  """
  images = _top_level(path, load_json(path), ("images",))["images"]
  name = os.path.basename(path)
  splits = {split: [] for split in KARPATHY_SPLITS}
  seen = {}  # image_id -> where: an image listed twice (in one split or two) is an error
  for i, entry in enumerate(images):
    parsed = _karpathy_image(bad, f"{name}: images[{i}]", entry)
    if parsed and _first_listing(bad, seen, parsed[1]):
      splits[parsed[0]].append(parsed[1])
  return splits


def _first_listing(bad: BadExamples, seen: dict[str, str], entry: ImageEntry) -> bool:
  if entry.image_id in seen:
    bad.report(entry.where, f"duplicate image {entry.image_id!r} (also {seen[entry.image_id]})")
    return False
  seen[entry.image_id] = entry.where
  return True


def _karpathy_image(bad: BadExamples, where: str, entry) -> tuple[str, ImageEntry] | None:
  if _object(bad, where, entry) is None:
    return None
  split = _field(bad, where, entry, "split", str)
  if split is not None and split not in KARPATHY_SPLITS:
    bad.report(f"{where}.split", f"unknown split {split!r} (not one of {KARPATHY_SPLITS})")
    return None
  filename = _field(bad, where, entry, "filename", str)
  filepath = _field(bad, where, entry, "filepath", str, default="", required=False)
  sentences = _field(bad, where, entry, "sentences", list)
  id_keys = [key for key in ("cocoid", "imgid") if key in entry]
  bad_ids = [k for k in id_keys if _typed(bad, f"{where}.{k}", entry[k], (int, str)) is None]
  if None in (split, filename, filepath, sentences) or bad_ids:
    return None
  raws = [_caption_field(bad, f"{where}.sentences[{j}]", sentence, "raw")
          if _object(bad, f"{where}.sentences[{j}]", sentence) is not None else None
          for j, sentence in enumerate(sentences)]
  captions = _captions(bad, where, "sentences", raws)
  if captions is None:
    return None
  file = f"{filepath}/{filename}" if filepath else filename
  image_id = str(entry[id_keys[0]]) if id_keys else file
  return split, ImageEntry(file, captions, image_id, where)


# ---------------------------------------------------------------------------- reference lists


def read_reference_lists(train_file: str, val_file: str, test_file: str,
                         bad: BadExamples) -> dict[str, list[ImageEntry]]:
  """The reference's JSON lists -> {"train", "val", "test"}; the train pairs grouped into one
  entry per image_id (captions in file order, entries in order of first appearance); a val/test
  image's image_id is its path."""
  return {"train": _reference_pairs(train_file, bad),
          "val": _reference_images(val_file, bad), "test": _reference_images(test_file, bad)}


def _reference_pairs(path: str, bad: BadExamples) -> list[ImageEntry]:
  pairs = _top_level(path, load_json(path))
  name = os.path.basename(path)
  groups: dict[str, dict] = {}  # image_id -> {"file", "where", "captions"}
  for i, pair in enumerate(pairs):
    where = f"{name}: [{i}]"
    if _object(bad, where, pair) is None:
      continue
    file = _field(bad, where, pair, "image", str)
    image_id = _field(bad, where, pair, "image_id", (int, str))
    raw = _caption_field(bad, where, pair, "caption")
    if file is None or image_id is None:
      continue
    group = groups.setdefault(str(image_id), {"file": file, "where": where, "captions": []})
    if group["file"] != file:
      bad.report(f"{where}.image", f"{file!r} differs from {group['file']!r}, the image of "
                 f"image_id {image_id!r} at {group['where']}")
    elif raw is not None:
      group["captions"].append(raw)
  entries = []
  for image_id, group in groups.items():
    if group["captions"]:
      entries.append(ImageEntry(group["file"], tuple(group["captions"]), image_id, group["where"]))
    else:  # every pair of the image was bad, and reported
      bad.report(group["where"], f"no valid captions for image_id {image_id!r}")
  return entries


def _reference_images(path: str, bad: BadExamples) -> list[ImageEntry]:
  images = _top_level(path, load_json(path))
  name = os.path.basename(path)
  entries, seen = [], {}
  for i, entry in enumerate(images):
    where = f"{name}: [{i}]"
    if _object(bad, where, entry) is None:
      continue
    file = _field(bad, where, entry, "image", str)
    values = _field(bad, where, entry, "caption", list)
    if file is None or values is None:
      continue
    raws = [_caption(bad, f"{where}.caption[{j}]", value) for j, value in enumerate(values)]
    captions = _captions(bad, where, "caption", raws)
    if captions is not None and _first_listing(bad, seen, ImageEntry(file, captions, file, where)):
      entries.append(ImageEntry(file, captions, file, where))
  return entries


# ---------------------------------------------------------------------------------------- VizWiz


def read_vizwiz(train_file: str, val_file: str, bad: BadExamples, include_rejected: bool = False,
                include_precanned: bool = False) -> dict[str, list[ImageEntry]]:
  """VizWiz-Captions -> {"train", "val"}: entries in `images` order, captions in `annotations`
  order, file `train/<file_name>` or `val/<file_name>`, image_id the image's id.

  Rejected and pre-canned ('Quality issues are too severe to recognize visual content.')
  captions are left out (unchecked) unless included; an image left without captions only by that
  is dropped silently, but one with no annotations at all, or whose captions were all bad, is a
  bad example. A missing `is_rejected` / `is_precanned` flag counts as false.
  """
  include = {"is_rejected": include_rejected, "is_precanned": include_precanned}
  return {split: _vizwiz_split(path, split, bad, include)
          for split, path in (("train", train_file), ("val", val_file))}


def _vizwiz_split(path: str, split: str, bad: BadExamples, include: dict) -> list[ImageEntry]:
  data = _top_level(path, load_json(path), ("images", "annotations"))
  name = os.path.basename(path)
  # id -> {"file", "where", "captions", "excluded", "bad"}, or None: a bad entry, already reported
  images: dict[int | str, dict | None] = {}
  for i, entry in enumerate(data["images"]):
    where = f"{name}: images[{i}]"
    if _object(bad, where, entry) is None:
      continue
    image_id = _field(bad, where, entry, "id", (int, str))
    file_name = _field(bad, where, entry, "file_name", str)
    if image_id is None:
      continue
    if file_name is None:
      images.setdefault(image_id, None)
      continue
    if images.get(image_id):
      bad.report(f"{where}.id",
                 f"duplicate image id {image_id!r} (also {images[image_id]['where']})")
      continue
    images[image_id] = {"file": f"{split}/{file_name}", "where": where, "captions": [],
                        "excluded": 0, "bad": 0}
  for k, annotation in enumerate(data["annotations"]):
    _vizwiz_annotation(bad, f"{name}: annotations[{k}]", annotation, images, include)
  entries = []
  for image_id, image in images.items():
    if image is None:
      continue
    if image["captions"]:
      entries.append(ImageEntry(image["file"], tuple(image["captions"]), str(image_id),
                                image["where"]))
    elif image["bad"]:
      bad.report(image["where"],
                 f"no valid captions (bad: {image['bad']}, excluded: {image['excluded']})")
    elif not image["excluded"]:
      bad.report(image["where"], "no annotations")
  return entries


def _vizwiz_annotation(bad: BadExamples, where: str, annotation, images: dict,
                       include: dict) -> None:
  """Adds one annotation's caption to its image, or counts it excluded or bad there."""
  if _object(bad, where, annotation) is None:
    return
  image_id = _field(bad, where, annotation, "image_id", (int, str))
  if image_id is None:
    return
  if image_id not in images:
    bad.report(f"{where}.image_id", f"unknown image id {image_id!r}")
    return
  image = images[image_id]
  if image is None:  # its image's entry is bad
    return
  flags = {key: _field(bad, where, annotation, key, bool, default=False, required=False)
           for key in include}
  if None in flags.values():
    image["bad"] += 1
  elif any(flag and not include[key] for key, flag in flags.items()):
    image["excluded"] += 1
  elif _caption_field(bad, where, annotation, "caption") is None:
    image["bad"] += 1
  else:
    image["captions"].append(annotation["caption"])


# ---------------------------------------------------------------------------------------- images


def read_image(path: str, where: str, bad: BadExamples) -> bytes | None:
  """The file's bytes if it is a complete, decodable image; otherwise reported -> None.

  Pillow's verify() checks the structure, a second open + load() decodes every pixel (a
  truncated file fails there, unless PIL.ImageFile.LOAD_TRUNCATED_IMAGES is set).
  """
  try:
    with open(path, "rb") as f:
      data = f.read()
  except FileNotFoundError:
    bad.report(where, f"{path}: image file not found")
    return None
  except OSError as e:
    bad.report(where, f"{path}: image file unreadable ({e.strerror or e})")
    return None
  try:
    with Image.open(io.BytesIO(data)) as image:
      image.verify()
    with Image.open(io.BytesIO(data)) as image:
      image.load()
  except Image.UnidentifiedImageError:
    bad.report(where,
               f"{path}: not a readable image (Pillow cannot identify it; {len(data)} bytes)")
    return None
  except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
    bad.report(where, f"{path}: corrupt or truncated image ({e})")
    return None
  return data
