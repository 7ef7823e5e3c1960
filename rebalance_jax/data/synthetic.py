"""Procedural image-caption dataset with controllable modal imbalance.

Each image shows 1..max_objects flat-coloured shapes, one per cell of a 3x3 grid, on a muted textured
background; each image has `captions_per_image` captions written from varied templates and synonyms.
Two knobs make the modalities unequally informative, the paper's subject:

* text insufficiency: a caption mentions each (object, attribute) fact and the object count only
  with probability `caption_keep_prob`, so captions describe random subsets of the scene;
* image insufficiency: a `degrade_fraction` of images get heavy noise, a grey occluder or a blur.

Captions never state anything false. `attributes` is the multi-hot vector of the TRUE scene over
`ATTRIBUTE_NAMES`. Generation is deterministic in (config, split), and every image has its own random
stream, so image i of a split does not depend on how many images the split has.
"""

import dataclasses
import hashlib
import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
from absl import logging

from rebalance_jax.data import sources
from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError

SPLITS = ("train", "val", "test")
SHAPES = ("circle", "square", "triangle", "cross", "diamond")
# Saturated colours; every one is >= 40 away (in some channel) from the background range below.
COLOURS = {
    "red": (220, 30, 30),
    "green": (20, 180, 40),
    "blue": (30, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 40, 200),
    "orange": (250, 140, 20),
    "white": (245, 245, 245),
}
_COLOUR_NAMES = tuple(COLOURS)
SIZES = ("small", "large")
COLUMNS = ("left", "center", "right")
ROWS = ("top", "middle", "bottom")
MAX_OBJECTS = 4

ATTRIBUTE_NAMES = (
    *(f"count={n}" for n in range(1, MAX_OBJECTS + 1)),
    *(f"shape={shape}" for shape in SHAPES),
    *(f"colour={colour}" for colour in COLOURS),
    *(f"{colour} {shape}" for colour in COLOURS for shape in SHAPES),
    *(f"size={size}" for size in SIZES),
    *(f"pos={position}" for position in COLUMNS + ROWS),
)
_ATTRIBUTE_INDEX = {name: i for i, name in enumerate(ATTRIBUTE_NAMES)}

# (singular, plural) nouns per shape, and adjectives per size.
SHAPE_NOUNS = {
    "circle": (("circle", "circles"), ("disc", "discs"), ("round shape", "round shapes")),
    "square": (("square", "squares"), ("box", "boxes"), ("block", "blocks")),
    "triangle": (("triangle", "triangles"),),
    "cross": (("cross", "crosses"), ("plus sign", "plus signs")),
    "diamond": (("diamond", "diamonds"), ("rhombus", "rhombuses")),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_THING_WORDS = ("object", "shape", "thing", "item")

_BACKGROUND_RANGE = (50, 140)
_OCCLUDER_GREY = 128.0
_NOISE_SIGMA = 50.0
_RADIUS_PER_CELL = {"small": 0.28, "large": 0.45}
_CACHE_VERSION = 2  # 2: arrays as memory-mappable .npy files


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  image_size: int = 32
  num_train: int = 3000
  num_val: int = 200
  num_test: int = 1000
  captions_per_image: int = 5
  max_objects: int = 3
  caption_keep_prob: float = 0.6
  degrade_fraction: float = 0.2
  seed: int = 0

  def __post_init__(self):
    bounds = {  # field: (lowest, highest or None); an int lowest means the field must be an int
        "image_size": (16, None), "num_train": (1, None), "num_val": (0, None), "num_test": (1, None),
        "captions_per_image": (1, None), "max_objects": (1, MAX_OBJECTS), "caption_keep_prob": (0.0, 1.0),
        "degrade_fraction": (0.0, 1.0), "seed": (0, None),
    }
    for field, (lowest, highest) in bounds.items():
      value = getattr(self, field)
      integer = isinstance(lowest, int)
      valid_type = isinstance(value, int if integer else (int, float)) and not isinstance(value, bool)
      if not valid_type or value < lowest or (highest is not None and value > highest):
        kind = "an integer" if integer else "a number"
        raise ValueError(f"SyntheticConfig.{field} must be {kind} in [{lowest}, {highest or 'inf'}], "
                         f"got {value!r}")

  def split_size(self, split: str) -> int:
    return {"train": self.num_train, "val": self.num_val, "test": self.num_test}[split]


@dataclasses.dataclass(frozen=True)
class _SceneObject:
  shape: str
  colour: str
  size: str
  column: str
  row: str


def _pick(rng: np.random.Generator, options):
  return options[rng.integers(len(options))]


# ----------------------------------------------------------------------------------------- images


class _Canvas:
  """Per-image-size constants: pixel-centre coordinates and a bilinear 4 -> S upsampling matrix."""

  def __init__(self, size: int, coarse: int = 4):
    self.size = size
    self.cell = size / 3
    self.y, self.x = np.mgrid[:size, :size] + 0.5
    t = np.clip((np.arange(size) + 0.5) * coarse / size - 0.5, 0, coarse - 1)
    low = np.minimum(t.astype(int), coarse - 2)
    self.upsample = np.zeros((size, coarse))
    self.upsample[np.arange(size), low] = low + 1 - t
    self.upsample[np.arange(size), low + 1] = t - low


def _background(rng: np.random.Generator, canvas: _Canvas) -> np.ndarray:
  """Muted grey-ish colour + linear gradient + smooth blotches + grain, clipped to _BACKGROUND_RANGE."""
  base = rng.uniform(70, 120) + rng.uniform(-15, 15, size=3)
  angle = rng.uniform(0, 2 * np.pi)
  ramp = (np.cos(angle) * canvas.x + np.sin(angle) * canvas.y) / canvas.size - 0.5
  gradient = rng.uniform(0, 30) * ramp[..., None]
  coarse = rng.normal(0, 8, size=(canvas.upsample.shape[1],) * 2 + (3,))
  blotches = (canvas.upsample @ coarse.transpose(2, 0, 1) @ canvas.upsample.T).transpose(1, 2, 0)
  grain = rng.normal(0, 3, size=(canvas.size, canvas.size, 3))
  return np.clip(base + gradient + blotches + grain, *_BACKGROUND_RANGE)


_SHAPE_MASKS: dict[str, Callable[[np.ndarray, np.ndarray, float], np.ndarray]] = {
    "circle": lambda dx, dy, r: dx * dx + dy * dy <= r * r,
    "square": lambda dx, dy, r: np.maximum(abs(dx), abs(dy)) <= 0.8 * r,
    "triangle": lambda dx, dy, r: (dy >= -r) & (dy <= 0.8 * r) & (abs(dx) <= 0.53 * (dy + r)),
    "cross": lambda dx, dy, r: (np.minimum(abs(dx), abs(dy)) <= r / 3) & (np.maximum(abs(dx), abs(dy)) <= r),
    "diamond": lambda dx, dy, r: abs(dx) + abs(dy) <= r,
}


def _place(rng: np.random.Generator, obj: _SceneObject, canvas: _Canvas) -> tuple[float, float, float]:
  """(centre x, centre y, radius), jittered but kept inside the object's grid cell."""
  radius = _RADIUS_PER_CELL[obj.size] * canvas.cell
  slack = canvas.cell / 2 - radius
  cx, cy = (np.array([COLUMNS.index(obj.column), ROWS.index(obj.row)]) + 0.5) * canvas.cell
  jx, jy = rng.uniform(-slack, slack, size=2)
  return cx + jx, cy + jy, radius


def _occlude(rng: np.random.Generator, image: np.ndarray, canvas: _Canvas, placements) -> np.ndarray:
  """Grey rectangle over most of one object."""
  cx, cy, radius = placements[rng.integers(len(placements))]
  half = radius * rng.uniform(0.8, 1.1, size=2)
  cx, cy = np.array([cx, cy]) + rng.uniform(-0.5, 0.5, size=2) * radius
  inside = (abs(canvas.x - cx) <= half[0]) & (abs(canvas.y - cy) <= half[1])
  return np.where(inside[..., None], _OCCLUDER_GREY, image)


def _blur(image: np.ndarray) -> np.ndarray:
  """Block-average downsampling by ~size/8, then nearest-neighbour upsampling."""
  size = image.shape[0]
  factor = max(2, size // 8)
  padded = np.pad(image, ((0, -size % factor),) * 2 + ((0, 0),), mode="edge")
  blocks = padded.shape[0] // factor
  small = padded.reshape(blocks, factor, blocks, factor, 3).mean(axis=(1, 3))
  return small.repeat(factor, axis=0).repeat(factor, axis=1)[:size, :size]


def _degrade(rng: np.random.Generator, image: np.ndarray, canvas: _Canvas, placements) -> np.ndarray:
  kind = rng.integers(3)
  if kind == 0:
    return image + rng.normal(0, _NOISE_SIGMA, size=image.shape)
  if kind == 1:
    return _occlude(rng, image, canvas, placements)
  return _blur(image)


def _render(rng: np.random.Generator, objects: list[_SceneObject], canvas: _Canvas, degraded: bool):
  image = _background(rng, canvas)
  placements = [_place(rng, obj, canvas) for obj in objects]
  for obj, (cx, cy, radius) in zip(objects, placements):
    mask = _SHAPE_MASKS[obj.shape](canvas.x - cx, canvas.y - cy, radius)
    image[mask] = COLOURS[obj.colour]
  if degraded:
    image = _degrade(rng, image, canvas, placements)
  return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# --------------------------------------------------------------------------------------- captions


def _position_phrases(column: str, row: str) -> tuple[tuple[str, ...], tuple[str, ...]]:
  """(phrases used in sentences, short labels) that are true for an object in cell (column, row)."""
  vertical = {"top": ("top", "upper"), "bottom": ("bottom", "lower")}
  if (column, row) == ("center", "middle"):
    return ("in the center", "in the middle"), ("center", "middle")
  if row == "middle":
    return (f"on the {column}", f"on the {column} side"), (column,)
  if column == "center":
    return (f"at the {row}", f"near the {row}"), (row,)
  corners = tuple(f"in the {v} {column}{corner}" for v in vertical[row] for corner in ("", " corner"))
  return corners + (f"on the {column}", f"at the {row}"), (f"{row} {column}",)


_POSITION_PHRASES = {(c, r): _position_phrases(c, r) for c in COLUMNS for r in ROWS}
_FACTS = ("shape", "colour", "size", "position")


def _number(rng: np.random.Generator, n: int) -> str:
  return _pick(rng, (_NUMBER_WORDS[n], str(n)))


def _noun_phrase(rng, shape: str, colour, size, multiplicity: int, article: bool) -> str:
  """'a big red circle', 'two discs', 'tiny box' (no article); colour/size None when not mentioned."""
  singular, plural = _pick(rng, SHAPE_NOUNS[shape])
  words = ([_pick(rng, SIZE_WORDS[size])] if size else []) + ([colour] if colour else [])
  words.append(plural if multiplicity > 1 else singular)
  if multiplicity > 1:
    words.insert(0, _number(rng, multiplicity))
  elif article:
    words.insert(0, "an" if words[0][0] in "aeiou" else "a")
  return " ".join(words)


def _item(rng, style: str, mention: tuple, multiplicity: int) -> str:
  shape, colour, size, cell = mention
  phrase = _noun_phrase(rng, shape, colour, size, multiplicity, article=style != "terse")
  if style == "terse":
    return f"{_pick(rng, _POSITION_PHRASES[cell][1])}: {phrase}" if cell else phrase
  if cell is None:
    return phrase if style == "plain" else f"there {'is' if multiplicity == 1 else 'are'} {phrase}"
  position = _pick(rng, _POSITION_PHRASES[cell][0])
  return f"{phrase} {position}" if style == "plain" else f"{position} there is {phrase}"


def _join(rng, style: str, items: list[str]) -> str:
  if style == "plain":
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]
  separators = (", ", "; ", " and ") if style == "position_first" else (", ", "; ")
  return _pick(rng, separators).join(items)


def _count_phrase(rng, n: int) -> str:
  number = _pick(rng, ("a single", "one", "1")) if n == 1 else _number(rng, n)
  return f"{number} {_pick(rng, _THING_WORDS)}{'s' if n > 1 else ''}"


def _caption(rng: np.random.Generator, objects: list[_SceneObject], keep_prob: float) -> str:
  """A caption stating a random subset (at least one) of the scene's true facts."""
  keep = rng.random((len(objects), len(_FACTS))) < keep_prob
  mention_count = rng.random() < keep_prob
  if not (keep.any() or mention_count):
    forced = rng.integers(keep.size + 1)
    if forced == keep.size:
      mention_count = True
    else:
      keep.flat[forced] = True
  mentions: dict[tuple, int] = {}  # identical mentions are merged: 'two red circles'
  for i in rng.permutation(len(objects)):
    if keep[i].any():
      obj, says = objects[i], dict(zip(_FACTS, keep[i]))
      mention = (obj.shape, obj.colour if says["colour"] else None, obj.size if says["size"] else None,
                 (obj.column, obj.row) if says["position"] else None)
      mentions[mention] = mentions.get(mention, 0) + 1
  style = _pick(rng, ("plain", "position_first", "terse"))
  body = _join(rng, style, [_item(rng, style, m, k) for m, k in mentions.items()]) if mentions else ""
  if not mention_count:
    frames = ("{}", "a picture of {}", "an image showing {}", "a photo with {}", "{} can be seen")
    return _pick(rng, frames).format(body) if style == "plain" else body
  count = _count_phrase(rng, len(objects))
  if not body:
    be = "is" if len(objects) == 1 else "are"
    return _pick(rng, (f"there {be} {count}", count, f"an image with {count}", f"a picture of {count}"))
  return _pick(rng, (f"{count}: {body}", f"{body}, {count} in total", f"an image with {count}: {body}"))


# ------------------------------------------------------------------------------------------ scenes


def _sample_scene(rng: np.random.Generator, max_objects: int) -> list[_SceneObject]:
  n = rng.integers(1, max_objects + 1)
  cells = rng.choice(len(COLUMNS) * len(ROWS), size=n, replace=False)
  return [
      _SceneObject(shape=_pick(rng, SHAPES), colour=_pick(rng, _COLOUR_NAMES), size=_pick(rng, SIZES),
                   column=COLUMNS[cell % 3], row=ROWS[cell // 3])
      for cell in cells
  ]


def _attributes(objects: list[_SceneObject]) -> np.ndarray:
  names = {f"count={len(objects)}"}
  for obj in objects:
    names |= {f"shape={obj.shape}", f"colour={obj.colour}", f"{obj.colour} {obj.shape}",
              f"size={obj.size}", f"pos={obj.column}", f"pos={obj.row}"}
  vector = np.zeros(len(ATTRIBUTE_NAMES), np.uint8)
  vector[[_ATTRIBUTE_INDEX[name] for name in names]] = 1
  return vector


def generate_split(cfg: SyntheticConfig, split: str) -> dict:
  """One split: images (N,S,S,3) uint8, captions N x captions_per_image str, attributes (N,A) uint8
  multi-hot of the true scene, degraded (N,) bool. Deterministic in (cfg, split)."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  n, size = cfg.split_size(split), cfg.image_size
  canvas = _Canvas(size)
  images = np.zeros((n, size, size, 3), np.uint8)
  attributes = np.zeros((n, len(ATTRIBUTE_NAMES)), np.uint8)
  degraded = np.zeros(n, bool)
  captions = []
  split_seed = np.random.SeedSequence([cfg.seed, SPLITS.index(split)])
  for i, image_seed in enumerate(split_seed.spawn(n)):
    rng = np.random.default_rng(image_seed)
    objects = _sample_scene(rng, cfg.max_objects)
    degraded[i] = rng.random() < cfg.degrade_fraction
    images[i] = _render(rng, objects, canvas, degraded[i])
    attributes[i] = _attributes(objects)
    captions.append([_caption(rng, objects, cfg.caption_keep_prob) for _ in range(cfg.captions_per_image)])
  return {"images": images, "captions": captions, "attributes": attributes, "degraded": degraded}


# ------------------------------------------------------------------------------------------- cache


def cache_key(cfg: SyntheticConfig) -> str:
  """Short hash of the config fields (and the cache format version)."""
  fields = json.dumps({"version": _CACHE_VERSION, **dataclasses.asdict(cfg)}, sort_keys=True)
  return hashlib.sha256(fields.encode()).hexdigest()[:16]


_ARRAYS = ("images", "attributes", "degraded")


def _array_path(directory: Path, split: str, key: str) -> Path:
  return directory / f"{split}.{key}.npy"


def _save_split(data: dict, directory: Path, split: str) -> None:
  files.write_checked(str(directory / f"{split}.json"),
                      lambda f: f.write(json.dumps(data["captions"]).encode()))
  for key in _ARRAYS:
    files.write_checked(str(_array_path(directory, split, key)),
                        lambda f, a=data[key]: np.save(f, a, allow_pickle=False))


def _load_split(cfg: SyntheticConfig, directory: Path, split: str) -> dict:
  """Reads a cached split, its arrays memory-mapped (read on access, never whole); raises
  ValueError naming the file if it is unreadable or inconsistent."""
  n, size = cfg.split_size(split), cfg.image_size
  expected = {"images": ((n, size, size, 3), np.uint8), "attributes": ((n, len(ATTRIBUTE_NAMES)), np.uint8),
              "degraded": ((n,), np.bool_)}
  data = {}
  for key, (shape, dtype) in expected.items():
    path = _array_path(directory, split, key)
    try:
      data[key] = np.load(path, mmap_mode="r", allow_pickle=False)
    except (OSError, ValueError, EOFError) as e:
      raise ValueError(f"corrupt cache file {path} ({e!r}); delete it to regenerate") from e
    if data[key].shape != shape or data[key].dtype != dtype:
      raise ValueError(f"cache file {path}: {key} is {data[key].dtype}{data[key].shape}, "
                       f"expected {np.dtype(dtype)}{shape}; delete it to regenerate")
  captions_path = directory / f"{split}.json"
  try:
    captions = json.loads(captions_path.read_text())
  except (OSError, ValueError) as e:
    raise ValueError(f"corrupt cache file {captions_path} ({e!r}); delete it to regenerate") from e
  if not (isinstance(captions, list) and len(captions) == n and all(
      isinstance(c, list) and len(c) == cfg.captions_per_image and all(isinstance(s, str) and s for s in c)
      for c in captions)):
    raise ValueError(f"cache file {captions_path} does not hold {n} x {cfg.captions_per_image} captions; "
                     "delete it to regenerate")
  return {**data, "captions": captions}


def load_or_generate(cfg: SyntheticConfig, cache_dir: str) -> dict[str, dict]:
  """All splits, cached as cache_dir/<cache_key(cfg)>/<split>.{json,<array>.npy}, the arrays
  memory-mapped.

  A split is read from the cache when all of its files pass their content check
  (`files.is_intact`), otherwise generated and written atomically with their content hashes (a run
  killed mid-write leaves at most a stray temp file, never a partial cache file).
  """
  directory = Path(cache_dir) / cache_key(cfg)
  directory.mkdir(parents=True, exist_ok=True)
  splits = {}
  for split in SPLITS:
    paths = [directory / f"{split}.json"] + [_array_path(directory, split, k) for k in _ARRAYS]
    if not all(files.is_intact(str(p)) for p in paths):
      if any(p.exists() for p in paths):
        logging.warning("cached %s split in %s fails its content check; generating it again",
                        split, directory)
      _save_split(generate_split(cfg, split), directory, split)
    splits[split] = _load_split(cfg, directory, split)
  return splits


def load_source(data) -> sources.Source:
  """The source of config.data.name='synthetic': its section config.data.synthetic holds the
  SyntheticConfig fields; the splits are generated once into data.cache_dir."""
  try:
    scene_config = SyntheticConfig(**data.options, image_size=data.image_size)
  except (TypeError, ValueError) as e:
    raise InputError(f"config.data.synthetic: {e}") from e
  cache_dir = os.path.expanduser(data.cache_dir)
  try:
    generated = load_or_generate(scene_config, cache_dir)
  except ValueError as e:  # a corrupt cache file: the message names it
    raise InputError(str(e)) from e
  splits = {}
  for name, split in generated.items():
    num_images, per_image = len(split["images"]), len(split["captions"][0])
    rows = np.arange(num_images, dtype=np.int32)
    splits[name] = sources.Split(split["images"], tuple(c for caps in split["captions"] for c in caps),
                                 np.repeat(rows, per_image), rows, split["attributes"])
  key = cache_key(scene_config)
  return sources.Source(splits, os.path.join(cache_dir, key), identity="")  # the config describes it


sources.register("synthetic", load_source)
