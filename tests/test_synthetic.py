"""Tests of the procedural image-caption dataset (rebalance_jax.data.synthetic)."""

import re

import numpy as np
import pytest

from rebalance_jax.data import synthetic
from rebalance_jax.data.synthetic import (
  ATTRIBUTE_NAMES,
  COLOURS,
  SHAPE_NOUNS,
  SIZE_WORDS,
  SyntheticConfig,
)
from rebalance_jax.infra import files

SMALL = SyntheticConfig(image_size=24, num_train=40, num_val=10, num_test=30)

_NOUN_TO_SHAPE = {noun: shape for shape, forms in SHAPE_NOUNS.items() for form in forms for noun in form}
_NOUNS = "|".join(sorted(_NOUN_TO_SHAPE, key=len, reverse=True))
_COLOUR_WORDS = "|".join(COLOURS)
_SIZE_WORD_TO_SIZE = {word: size for size, words in SIZE_WORDS.items() for word in words}
_OBJECT_MENTION = re.compile(rf"\b(?:({'|'.join(_SIZE_WORD_TO_SIZE)}) )?(?:({_COLOUR_WORDS}) )?({_NOUNS})\b")
_COUNT_MENTION = re.compile(r"\b(a single|one|two|three|four|\d) (?:object|shape|thing|item)s?\b")
_NUMBERS = {"a single": 1, "one": 1, "two": 2, "three": 3, "four": 4}
_POSITION_WORDS = {"left": "left", "right": "right", "top": "top", "upper": "top", "bottom": "bottom",
                   "lower": "bottom"}


def _true_facts(attribute_row: np.ndarray) -> set[str]:
  return {name for name, on in zip(ATTRIBUTE_NAMES, attribute_row) if on}


def _mentioned_count(caption: str) -> int | None:
  match = _COUNT_MENTION.search(caption)
  return None if match is None else _NUMBERS.get(match.group(1)) or int(match.group(1))


def _false_statements(caption: str, facts: set[str]) -> list[str]:
  """What `caption` says that the scene (its attribute names) contradicts."""
  errors = []
  words = re.findall(r"[a-z]+", caption)
  errors += [w for w in words if w in COLOURS and f"colour={w}" not in facts]
  errors += [w for w in words if w in _POSITION_WORDS and f"pos={_POSITION_WORDS[w]}" not in facts]
  for size_word, colour, noun in _OBJECT_MENTION.findall(caption):
    shape = _NOUN_TO_SHAPE[noun]
    if (colour and f"{colour} {shape}" not in facts) or f"shape={shape}" not in facts:
      errors.append(f"{colour} {noun}")
    if size_word and f"size={_SIZE_WORD_TO_SIZE[size_word]}" not in facts:
      errors.append(f"{size_word} {noun}")
  count = _mentioned_count(caption)
  if count is not None and f"count={count}" not in facts:
    errors.append(f"count {count}")
  return errors


@pytest.fixture(scope="module")
def small_splits():
  return {split: synthetic.generate_split(SMALL, split) for split in synthetic.SPLITS}


def test_attribute_names_are_unique_and_cover_the_vocabulary():
  assert len(set(ATTRIBUTE_NAMES)) == len(ATTRIBUTE_NAMES)
  for name in ["count=2", "shape=circle", "colour=red", "red circle", "size=large", "pos=left", "pos=top"]:
    assert name in ATTRIBUTE_NAMES


def test_outputs_have_the_documented_shapes_and_dtypes(small_splits):
  for split, data in small_splits.items():
    n = SMALL.split_size(split)
    assert data["images"].shape == (n, 24, 24, 3) and data["images"].dtype == np.uint8
    assert data["attributes"].shape == (n, len(ATTRIBUTE_NAMES)) and data["attributes"].dtype == np.uint8
    assert data["degraded"].shape == (n,) and data["degraded"].dtype == np.bool_
    assert len(data["captions"]) == n
    assert all(len(captions) == SMALL.captions_per_image for captions in data["captions"])


def test_attribute_vectors_describe_a_consistent_scene(small_splits):
  for row in small_splits["train"]["attributes"]:
    facts = _true_facts(row)
    counts = [int(f.split("=")[1]) for f in facts if f.startswith("count=")]
    pairs = {f for f in facts if " " in f}
    assert len(counts) == 1 and 1 <= counts[0] <= SMALL.max_objects
    assert 1 <= len(pairs) <= counts[0]
    assert {f"colour={p.split()[0]}" for p in pairs} == {f for f in facts if f.startswith("colour=")}
    assert {f"shape={p.split()[1]}" for p in pairs} == {f for f in facts if f.startswith("shape=")}


def test_generation_is_deterministic_and_byte_identical(small_splits):
  again = synthetic.generate_split(SMALL, "train")
  first = small_splits["train"]
  for key in ("images", "attributes", "degraded"):
    assert again[key].tobytes() == first[key].tobytes()
  assert again["captions"] == first["captions"]


def test_splits_and_seeds_use_different_streams(small_splits):
  train, test = small_splits["train"], small_splits["test"]
  other_seed = synthetic.generate_split(SyntheticConfig(**{**SMALL.__dict__, "seed": 1}), "train")
  for other in (test, other_seed):
    n = min(len(train["captions"]), len(other["captions"]))
    assert not np.array_equal(train["images"][:n], other["images"][:n])
    assert train["captions"][:n] != other["captions"][:n]


def test_an_image_does_not_depend_on_the_split_size(small_splits):
  fewer = synthetic.generate_split(SyntheticConfig(**{**SMALL.__dict__, "num_train": 7}), "train")
  np.testing.assert_array_equal(fewer["images"], small_splits["train"]["images"][:7])
  assert fewer["captions"] == small_splits["train"]["captions"][:7]


def test_captions_are_non_empty_ascii_and_vary_within_an_image(small_splits):
  captions = small_splits["train"]["captions"]
  assert all(c.strip() and c.isascii() and c == c.lower() for per_image in captions for c in per_image)
  varied = sum(len(set(per_image)) == len(per_image) for per_image in captions)
  assert varied >= 0.9 * len(captions)


@pytest.mark.parametrize("keep_prob", [0.0, 0.6, 1.0])
def test_captions_never_state_anything_false(keep_prob):
  cfg = SyntheticConfig(image_size=16, num_train=60, num_val=1, num_test=1, max_objects=4,
                        caption_keep_prob=keep_prob)
  data = synthetic.generate_split(cfg, "train")
  for row, captions in zip(data["attributes"], data["captions"]):
    facts = _true_facts(row)
    for caption in captions:
      assert caption and not _false_statements(caption, facts), (caption, sorted(facts))


def test_full_keep_prob_mentions_every_object_and_the_count():
  cfg = SyntheticConfig(image_size=16, num_train=40, num_val=1, num_test=1, caption_keep_prob=1.0)
  data = synthetic.generate_split(cfg, "train")
  for row, captions in zip(data["attributes"], data["captions"]):
    facts = _true_facts(row)
    pairs = [f.split() for f in facts if " " in f]
    count = next(int(f[len("count="):]) for f in facts if f.startswith("count="))
    for caption in captions:
      mentioned = {(colour, _NOUN_TO_SHAPE[noun]) for _, colour, noun in _OBJECT_MENTION.findall(caption)}
      assert all((colour, shape) in mentioned for colour, shape in pairs), (caption, pairs)
      assert _mentioned_count(caption) == count, caption


def test_zero_keep_prob_still_states_one_fact():
  cfg = SyntheticConfig(image_size=16, num_train=40, num_val=1, num_test=1, caption_keep_prob=0.0)
  for captions in synthetic.generate_split(cfg, "train")["captions"]:
    for caption in captions:
      assert _OBJECT_MENTION.search(caption) or _mentioned_count(caption), caption


@pytest.mark.parametrize("fraction, expected", [(0.0, 0.0), (1.0, 1.0), (0.3, 0.3)])
def test_degrade_fraction_sets_the_share_of_degraded_images(fraction, expected):
  cfg = SyntheticConfig(image_size=16, num_train=200, num_val=1, num_test=1, degrade_fraction=fraction)
  assert abs(synthetic.generate_split(cfg, "train")["degraded"].mean() - expected) < 0.1


def test_degradation_changes_the_pixels_but_not_the_scene():
  clean, degraded = (synthetic.generate_split(SyntheticConfig(**{**SMALL.__dict__, "degrade_fraction": f}),
                                              "train") for f in (0.0, 1.0))
  np.testing.assert_array_equal(clean["attributes"], degraded["attributes"])
  changed = np.abs(clean["images"].astype(int) - degraded["images"]).reshape(len(clean["images"]), -1)
  assert (changed.max(axis=1) > 0).all()


@pytest.mark.parametrize("image_size", [16, 32])
def test_clean_images_show_exactly_the_scene_colours(image_size):
  cfg = SyntheticConfig(image_size=image_size, num_train=40, num_val=1, num_test=1, degrade_fraction=0.3)
  data = synthetic.generate_split(cfg, "train")
  assert (~data["degraded"]).sum() > 10
  for image, row in zip(data["images"][~data["degraded"]], data["attributes"][~data["degraded"]]):
    facts = _true_facts(row)
    for name, rgb in COLOURS.items():
      close_pixels = (np.abs(image.astype(int) - rgb).max(axis=-1) <= 12).sum()
      assert (close_pixels > 0) == (f"colour={name}" in facts), (name, close_pixels)


def test_cache_is_reused_without_regeneration(tmp_path, monkeypatch):
  first = synthetic.load_or_generate(SMALL, str(tmp_path))
  cache_files = sorted(p.name for p in (tmp_path / synthetic.cache_key(SMALL)).iterdir())
  assert cache_files == sorted(f"{s}.{ext}{digest}" for s in synthetic.SPLITS
                               for ext in ("json", "images.npy", "attributes.npy", "degraded.npy")
                               for digest in ("", ".sha256"))

  def fail(*_):
    raise AssertionError("generate_split called although the cache is complete")

  monkeypatch.setattr(synthetic, "generate_split", fail)
  second = synthetic.load_or_generate(SMALL, str(tmp_path))
  assert isinstance(second["train"]["images"], np.memmap)  # read on access, never whole
  for split in synthetic.SPLITS:
    for key in ("images", "attributes", "degraded"):
      assert second[split][key].dtype == first[split][key].dtype
      np.testing.assert_array_equal(second[split][key], first[split][key])
    assert second[split]["captions"] == first[split]["captions"]


def test_different_configs_use_different_cache_directories(tmp_path):
  other = SyntheticConfig(**{**SMALL.__dict__, "caption_keep_prob": 0.9})
  synthetic.load_or_generate(SMALL, str(tmp_path))
  synthetic.load_or_generate(other, str(tmp_path))
  assert synthetic.cache_key(SMALL) != synthetic.cache_key(other)
  assert len(list(tmp_path.iterdir())) == 2


def _record_generated_splits(monkeypatch) -> list[str]:
  """The names of the splits generated from now on (the cache missed), in order."""
  generated = []
  real_generate = synthetic.generate_split
  monkeypatch.setattr(synthetic, "generate_split", lambda cfg, split: generated.append(split) or
                      real_generate(cfg, split))
  return generated


@pytest.mark.parametrize("file_name, tamper", [
    ("train.images.npy", "truncate"), ("val.json", "truncate"), ("train.images.npy", "flip"),
    ("test.json", "flip"), ("val.attributes.npy", "flip")])
def test_a_tampered_cache_file_is_regenerated(tmp_path, monkeypatch, file_name, tamper):
  # Copied out of the memory-mapped files before one of them is truncated in place.
  first = {split: {k: np.array(v) if isinstance(v, np.ndarray) else v for k, v in data.items()}
           for split, data in synthetic.load_or_generate(SMALL, str(tmp_path)).items()}
  path = tmp_path / synthetic.cache_key(SMALL) / file_name
  content = bytearray(path.read_bytes())
  if tamper == "truncate":
    content = content[: len(content) // 2]
  else:  # same size, one byte changed: still a loadable file, but not the one written
    content[len(content) // 2] ^= 0xFF
  path.write_bytes(bytes(content))
  generated = _record_generated_splits(monkeypatch)
  second = synthetic.load_or_generate(SMALL, str(tmp_path))
  assert generated == [file_name.split(".")[0]]
  split = file_name.split(".")[0]
  np.testing.assert_array_equal(second[split]["images"], first[split]["images"])
  assert second[split]["captions"] == first[split]["captions"]
  assert files.is_intact(str(path))


def test_split_with_a_missing_file_is_regenerated(tmp_path, monkeypatch):
  first = synthetic.load_or_generate(SMALL, str(tmp_path))
  (tmp_path / synthetic.cache_key(SMALL) / "test.degraded.npy").unlink()
  generated = _record_generated_splits(monkeypatch)
  second = synthetic.load_or_generate(SMALL, str(tmp_path))
  assert generated == ["test"]
  np.testing.assert_array_equal(second["test"]["images"], first["test"]["images"])


@pytest.mark.parametrize("field, value", [
    ("image_size", 8), ("image_size", 32.0), ("num_train", 0), ("num_test", 0), ("num_val", -1),
    ("captions_per_image", 0), ("max_objects", 0), ("max_objects", 10), ("caption_keep_prob", 1.5),
    ("caption_keep_prob", -0.1), ("degrade_fraction", 2.0), ("seed", -1),
])
def test_invalid_config_raises_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    SyntheticConfig(**{field: value})


def test_unknown_split_raises():
  with pytest.raises(ValueError, match="split"):
    synthetic.generate_split(SMALL, "validation")
