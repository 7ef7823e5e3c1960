"""The annotation readers on the miniature trees (known answers) and on every kind of bad input."""

import copy
import json
import os
import re

import numpy as np
import pytest

from rebalance_jax.data import annotations, miniature, synthetic
from rebalance_jax.data.annotations import BadExamples, ImageEntry
from rebalance_jax.infra.errors import InputError


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  return miniature.write_miniatures(str(tmp_path_factory.mktemp("miniature")))


def _true_captions(tree: str, split: str, captions_per_image: int = 5, **sizes) -> list[list[str]]:
  config = synthetic.SyntheticConfig(image_size=96, captions_per_image=captions_per_image,
                                     seed=miniature.scene_seed(tree, 0), **{"num_test": 1, **sizes})
  return synthetic.generate_split(config, split)["captions"]


def _check_images(entries: list[ImageEntry], image_root: str) -> None:
  bad = BadExamples("error")
  for entry in entries:
    data = annotations.read_image(os.path.join(image_root, entry.file), entry.where, bad)
    assert data[:2] == b"\xff\xd8"  # a JPEG


def _write(path, value) -> str:
  path.write_text(json.dumps(value))
  return str(path)


# ------------------------------------------------------------------------------- known answers


def test_flickr_karpathy_and_lists_agree_with_the_scenes(trees):
  paths, bad = trees["flickr30k"], BadExamples("error")
  karpathy = annotations.read_karpathy(paths["karpathy_file"], bad)
  assert {split: len(e) for split, e in karpathy.items()} == {"train": 24, "restval": 0, "val": 6,
                                                              "test": 6}
  sizes = {"num_train": 24, "num_val": 6, "num_test": 6}
  for split in ("train", "val", "test"):
    truth = _true_captions("flickr30k", split, **sizes)
    assert [e.captions for e in karpathy[split]] == [tuple(c) for c in truth]
  first = karpathy["train"][0]
  assert first.where == "dataset_flickr30k.json: images[0]" and first.file.endswith(".jpg")
  imgids = sorted(int(e.image_id) for split in karpathy.values() for e in split)
  assert imgids == list(range(36))  # the imgid, unique
  lists = annotations.read_reference_lists(paths["train_file"], paths["val_file"],
                                           paths["test_file"], bad)
  for split in ("train", "val", "test"):
    assert [(e.file, e.captions) for e in lists[split]] == [(e.file, e.captions)
                                                            for e in karpathy[split]]
  assert all(e.image_id == e.file[:-len(".jpg")] for e in lists["train"])  # grouped by photo id
  assert all(e.image_id == e.file for e in lists["test"])
  assert lists["train"][1].where == "flickr30k_train.json: [5]"
  _check_images(karpathy["train"] + karpathy["val"] + karpathy["test"], paths["image_root"])
  assert bad.count == 0


def test_coco_karpathy_restval_paths_and_caption_counts(trees):
  paths = trees["coco"]
  splits = annotations.read_karpathy(paths["karpathy_file"], BadExamples("error"))
  assert {split: len(e) for split, e in splits.items()} == {"train": 20, "restval": 6, "val": 6,
                                                            "test": 6}
  train_scenes = _true_captions("coco", "train", 7, num_train=26, num_val=6, num_test=6)
  for split, start in (("train", 0), ("restval", 20)):
    for i, entry in enumerate(splits[split]):
      assert entry.captions == tuple(train_scenes[start + i][:len(entry.captions)])
  counts = [len(e.captions) for split in splits.values() for e in split]
  assert set(counts) == {5, 6, 7}
  assert all(e.file.startswith("train2014/COCO_train2014_") for e in splits["train"])
  for split in ("restval", "val", "test"):
    assert all(e.file.startswith("val2014/COCO_val2014_") for e in splits[split])
  entries = [e for split in splits.values() for e in split]
  assert all(e.image_id == str(int(e.file[-16:-4])) for e in entries)  # the cocoid
  assert len({e.image_id for e in entries}) == 38
  _check_images(entries, paths["image_root"])


def test_vizwiz_excludes_rejected_and_precanned_unless_included(trees):
  paths, bad = trees["vizwiz"], BadExamples("error")
  splits = annotations.read_vizwiz(paths["train_file"], paths["val_file"], bad)
  assert [len(splits["train"]), len(splits["val"])] == [23, 13]  # each split's last: pre-canned
  truth = _true_captions("vizwiz", "train", num_train=24, num_val=14)
  for i, entry in enumerate(splits["train"]):
    expected = {0: truth[i], 1: truth[i][:4], 2: truth[i][1:]}[i % 3]
    assert entry.captions == tuple(expected)
    assert entry.file == f"train/VizWiz_train_{i:08d}.jpg" and entry.image_id == str(i)
  assert [e.image_id for e in splits["val"]] == [str(24 + i) for i in range(13)]  # ids go on
  _check_images(splits["train"] + splits["val"], paths["image_root"])
  both = annotations.read_vizwiz(paths["train_file"], paths["val_file"], bad, include_rejected=True,
                                 include_precanned=True)
  assert [len(both["train"]), len(both["val"])] == [24, 14]
  assert both["train"][1].captions[4] == miniature.PRECANNED
  assert both["train"][2].captions[0] == miniature.REJECTED
  assert both["train"][23].captions == (miniature.PRECANNED,) * 5
  rejected = annotations.read_vizwiz(paths["train_file"], paths["val_file"], bad,
                                     include_rejected=True)
  assert rejected["train"][2].captions == (miniature.REJECTED, *truth[2][1:])
  assert len(rejected["train"]) == 23
  assert bad.count == 0


def test_miniatures_are_deterministic(tmp_path):
  first, second = (miniature.write_flickr_like(str(tmp_path / d), num_train=3, num_val=1,
                                               num_test=1, seed=4) for d in "ab")
  for key in ("karpathy_file", "train_file"):
    assert open(first[key]).read() == open(second[key]).read()
  names = sorted(os.listdir(first["image_root"]))
  assert names == sorted(os.listdir(second["image_root"])) and len(names) == 5
  for name in names:
    assert (open(os.path.join(first["image_root"], name), "rb").read() ==
            open(os.path.join(second["image_root"], name), "rb").read())


def test_reference_train_pairs_are_grouped_by_image_id(tmp_path):
  pairs = [{"image": "a.jpg", "caption": "a cat", "image_id": 7},
           {"image": "b.jpg", "caption": "a dog", "image_id": "b"},
           {"image": "a.jpg", "caption": "the cat", "image_id": 7}]
  train = _write(tmp_path / "train.json", pairs)
  test = _write(tmp_path / "test.json", [{"image": "c.jpg", "caption": ["a bird", "one bird"]}])
  splits = annotations.read_reference_lists(train, test, test, BadExamples("error"))
  assert splits["train"] == [ImageEntry("a.jpg", ("a cat", "the cat"), "7", "train.json: [0]"),
                             ImageEntry("b.jpg", ("a dog",), "b", "train.json: [1]")]
  assert splits["test"] == [ImageEntry("c.jpg", ("a bird", "one bird"), "c.jpg", "test.json: [0]")]


# ---------------------------------------------------------------------------------- the policy


def test_policy_must_be_error_or_skip():
  with pytest.raises(InputError, match=r"config\.data\.on_bad_example='warn' is not one of"):
    BadExamples("warn")
  bad = BadExamples("skip")
  assert bad.summary() == "no bad examples"
  for i in range(7):
    bad.report(f"f.json: [{i}]", "missing")
  assert bad.count == 7 and bad.first(2) == ["f.json: [0]: missing", "f.json: [1]: missing"]
  assert bad.summary().startswith("skipped 7 bad examples; the first: f.json: [0]: missing; ")
  assert bad.summary().endswith("f.json: [4]: missing")


# ------------------------------------------------------------------------------ Karpathy: bad input

_KARPATHY = {"images": [
    {"filename": "a.jpg", "imgid": 0, "split": "train",
     "sentences": [{"raw": "a red circle"}, {"raw": "one circle"}]},
    {"filename": "b.jpg", "imgid": 1, "split": "val",
     "sentences": [{"raw": "a blue square"}, {"raw": "two squares"}, {"raw": "a square"}]},
    {"filename": "c.jpg", "filepath": "val2014", "cocoid": 42, "imgid": 2, "split": "test",
     "sentences": [{"raw": "a cross"}]},
]}


def _set(*path_and_value):
  """A mutation of the Karpathy document: set (or with value `...`, delete) images[path]."""
  *path, value = path_and_value

  def mutate(doc):
    node = doc["images"]
    for key in path[:-1]:
      node = node[key]
    if value is ...:
      del node[path[-1]]
    else:
      node[path[-1]] = value
  return mutate


_SENTENCES = ("a blue square", "two squares", "a square")
# mutation of images[1] -> (its problem under 'error', the count under 'skip', val captions kept)
_KARPATHY_CASES = {
    "empty caption": (_set(1, "sentences", 1, "raw", "!!!"),
                      ".sentences[1].raw: empty after cleaning ('!!!')", 1, _SENTENCES[::2]),
    "non-UTF-8 caption": (_set(1, "sentences", 0, "raw", "ab\ud800"),
                          ".sentences[0].raw: not valid UTF-8 text (surrogates not allowed at "
                          "character 2: 'ab\\ud800')", 1, _SENTENCES[1:]),
    "caption not a string": (_set(1, "sentences", 2, "raw", 3),
                             ".sentences[2].raw: expected a string, got an integer 3", 1,
                             _SENTENCES[:2]),
    "sentence not an object": (_set(1, "sentences", 2, ["x"]),
                               ".sentences[2]: expected an object, got a list of 1 items", 1,
                               _SENTENCES[:2]),
    "missing raw": (_set(1, "sentences", 0, "raw", ...), ".sentences[0].raw: missing", 1,
                    _SENTENCES[1:]),
    "no captions": (_set(1, "sentences", []), ".sentences: no captions", 1, None),
    "all captions bad": (_set(1, "sentences", [{"raw": ""}, {"raw": " ,"}]),
                         ".sentences[0].raw: empty after cleaning ('')", 3, None),
    "missing filename": (_set(1, "filename", ...), ".filename: missing", 1, None),
    "missing split": (_set(1, "split", ...), ".split: missing", 1, None),
    "unknown split": (_set(1, "split", "dev"), ".split: unknown split 'dev' (not one of "
                      "('train', 'restval', 'val', 'test'))", 1, None),
    "sentences not a list": (_set(1, "sentences", "a cat"),
                             ".sentences: expected a list, got a string 'a cat'", 1, None),
    "filepath not a string": (_set(1, "filepath", None), ".filepath: expected a string, got null",
                              1, None),
    "imgid a boolean": (_set(1, "imgid", True),
                        ".imgid: expected an integer or a string, got a boolean True", 1, None),
    "entry not an object": (_set(1, 5), ": expected an object, got an integer 5", 1, None),
    "image listed twice": (_set(1, "imgid", 0), ": duplicate image '0' (also "
                           "dataset_flickr30k.json: images[0])", 1, None),
}


@pytest.mark.parametrize("case", list(_KARPATHY_CASES))
def test_karpathy_bad_example(tmp_path, case):
  mutate, problem, skipped, val_captions = _KARPATHY_CASES[case]
  message = "dataset_flickr30k.json: images[1]" + problem
  doc = copy.deepcopy(_KARPATHY)
  mutate(doc)
  path = _write(tmp_path / "dataset_flickr30k.json", doc)
  with pytest.raises(InputError) as error:
    annotations.read_karpathy(path, BadExamples("error"))
  assert str(error.value) == message
  bad = BadExamples("skip")
  splits = annotations.read_karpathy(path, bad)
  assert bad.count == skipped and bad.first(1) == [message]
  assert splits["train"] == [ImageEntry("a.jpg", ("a red circle", "one circle"), "0",
                                        "dataset_flickr30k.json: images[0]")]
  assert splits["test"] == [ImageEntry("val2014/c.jpg", ("a cross",), "42",
                                       "dataset_flickr30k.json: images[2]")]
  assert [e.captions for e in splits["val"]] == ([val_captions] if val_captions else [])


def test_karpathy_all_captions_bad_reports_each_and_the_image(tmp_path):
  doc = copy.deepcopy(_KARPATHY)
  _set(1, "sentences", [{"raw": ""}, {"raw": " ,"}])(doc)
  bad = BadExamples("skip")
  annotations.read_karpathy(_write(tmp_path / "k.json", doc), bad)
  assert bad.first() == ["k.json: images[1].sentences[0].raw: empty after cleaning ('')",
                         "k.json: images[1].sentences[1].raw: empty after cleaning (' ,')",
                         "k.json: images[1]: no valid captions (all 2 dropped)"]


@pytest.mark.parametrize("policy", ["error", "skip"])
def test_bytes_that_are_not_utf8_are_a_bad_caption_not_a_bad_file(tmp_path, policy):
  """A Latin-1 'é' in an otherwise UTF-8 file: that caption is the bad example."""
  path = tmp_path / "dataset_flickr30k.json"
  path.write_bytes(b'{"images": [{"filename": "a.jpg", "split": "test", "sentences": '
                   b'[{"raw": "a caf\xe9"}, {"raw": "a dog"}]}]}')
  bad = BadExamples(policy)
  message = (f"{path.name}: images[0].sentences[0].raw: not valid UTF-8 text (surrogates not "
             "allowed at character 5: 'a caf\\udce9')")
  if policy == "error":
    with pytest.raises(InputError, match=f"^{re.escape(message)}$"):
      annotations.read_karpathy(str(path), bad)
  else:
    assert annotations.read_karpathy(str(path), bad)["test"][0].captions == ("a dog",)
    assert bad.first() == [message]


def test_image_id_falls_back_to_the_file(tmp_path):
  doc = {"images": [{"filename": "x.jpg", "split": "train", "sentences": [{"raw": "a cat"}]}]}
  splits = annotations.read_karpathy(_write(tmp_path / "k.json", doc), BadExamples("error"))
  assert splits["train"][0].image_id == "x.jpg"


# ------------------------------------------------------------------- malformed files: always errors


_FILE_CASES = {
    "malformed JSON": (b'{"images": [\n  {"filename": "a.jpg",}\n]}',
                       r"malformed JSON at line 2, column 24 \(Expecting property name enclosed in "
                       r"double quotes\)"),
    "top level a list": (b"[1, 2]", r"expected a JSON object with 'images' at the top level, got a "
                         r"list of 2 items"),
    "no images": (b'{"dataset": "coco"}', r"the top-level object has no 'images' list"),
    "images not a list": (b'{"images": {"a": 1}}',
                          r"the top-level 'images' is an object with keys 'a', not a list"),
}


@pytest.mark.parametrize("case", list(_FILE_CASES))
@pytest.mark.parametrize("policy", ["error", "skip"])
def test_malformed_file_is_always_an_error(tmp_path, case, policy):
  content, message = _FILE_CASES[case]
  path = tmp_path / "dataset_coco.json"
  path.write_bytes(content)
  with pytest.raises(InputError, match=f"^{re.escape(str(path))}: {message}$"):
    annotations.read_karpathy(str(path), BadExamples(policy))


def test_missing_annotation_file_is_an_error(tmp_path):
  missing = str(tmp_path / "nowhere.json")
  with pytest.raises(InputError, match=f"^annotation file not found: {re.escape(missing)}$"):
    annotations.read_karpathy(missing, BadExamples("skip"))
  with pytest.raises(InputError, match=f"^annotation file {re.escape(str(tmp_path))} is "
                     "unreadable"):
    annotations.load_json(str(tmp_path))


def test_wrong_top_level_of_the_other_formats(tmp_path):
  listing = _write(tmp_path / "train.json", {"images": []})
  good = _write(tmp_path / "test.json", [])
  with pytest.raises(InputError, match=f"^{re.escape(listing)}: expected a JSON list at the top "
                     "level, got an object with keys 'images'$"):
    annotations.read_reference_lists(listing, good, good, BadExamples("skip"))
  vizwiz = _write(tmp_path / "val.json", {"images": []})
  with pytest.raises(InputError, match=f"^{re.escape(vizwiz)}: the top-level object has no "
                     "'annotations' list$"):
    annotations.read_vizwiz(vizwiz, vizwiz, BadExamples("skip"))
  with pytest.raises(InputError, match=f"^{re.escape(good)}: expected a JSON object with 'images' "
                     "and 'annotations' at the top level, got a list of 0 items$"):
    annotations.read_vizwiz(good, good, BadExamples("skip"))


# ---------------------------------------------------------------------- reference lists: bad input


_PAIRS = [{"image": "a.jpg", "caption": "a cat", "image_id": 1},
          {"image": "a.jpg", "caption": "one cat", "image_id": 1},
          {"image": "b.jpg", "caption": "a dog", "image_id": 2}]
_IMAGES = [{"image": "c.jpg", "caption": ["a bird", "two birds"]},
           {"image": "d.jpg", "caption": ["a fish"]}]
_TRAIN = [("a.jpg", ("a cat", "one cat")), ("b.jpg", ("a dog",))]
_VAL = [("c.jpg", ("a bird", "two birds")), ("d.jpg", ("a fish",))]
_ONE_CAT_DROPPED = [("a.jpg", ("a cat",)), ("b.jpg", ("a dog",))]

# (train pairs, val images, message under 'error', count under 'skip', train and val kept)
_REFERENCE_CASES = {
    "missing image_id": (
        [_PAIRS[0], {"image": "a.jpg", "caption": "one cat"}, _PAIRS[2]], _IMAGES,
        "train.json: [1].image_id: missing", 1, _ONE_CAT_DROPPED, _VAL),
    "empty caption": (
        [_PAIRS[0], {**_PAIRS[1], "caption": "  "}, _PAIRS[2]], _IMAGES,
        "train.json: [1].caption: empty after cleaning ('  ')", 1, _ONE_CAT_DROPPED, _VAL),
    "image of an image_id differs": (
        [_PAIRS[0], {**_PAIRS[1], "image": "z.jpg"}, _PAIRS[2]], _IMAGES,
        "train.json: [1].image: 'z.jpg' differs from 'a.jpg', the image of image_id 1 at "
        "train.json: [0]", 1, _ONE_CAT_DROPPED, _VAL),
    "every pair of an image bad": (
        [_PAIRS[0], _PAIRS[1], {**_PAIRS[2], "caption": "?"}], _IMAGES,
        "train.json: [2].caption: empty after cleaning ('?')", 2, _TRAIN[:1], _VAL),
    "pair not an object": (
        [_PAIRS[0], _PAIRS[1], "b.jpg a dog"], _IMAGES,
        "train.json: [2]: expected an object, got a string 'b.jpg a dog'", 1, _TRAIN[:1], _VAL),
    "val image with no captions": (
        _PAIRS, [_IMAGES[0], {"image": "d.jpg", "caption": []}],
        "val.json: [1].caption: no captions", 1, _TRAIN, _VAL[:1]),
    "val captions a string": (
        _PAIRS, [_IMAGES[0], {"image": "d.jpg", "caption": "a fish"}],
        "val.json: [1].caption: expected a list, got a string 'a fish'", 1, _TRAIN, _VAL[:1]),
    "val caption not a string": (
        _PAIRS, [{"image": "c.jpg", "caption": ["a bird", 7]}, _IMAGES[1]],
        "val.json: [0].caption[1]: expected a string, got an integer 7", 1, _TRAIN,
        [("c.jpg", ("a bird",)), _VAL[1]]),
    "val image missing": (
        _PAIRS, [{"caption": ["a bird"]}, _IMAGES[1]], "val.json: [0].image: missing", 1, _TRAIN,
        _VAL[1:]),
    "val image listed twice": (
        _PAIRS, [_IMAGES[0], _IMAGES[0]], "val.json: [1]: duplicate image 'c.jpg' (also val.json: "
        "[0])", 1, _TRAIN, _VAL[:1]),
}


@pytest.mark.parametrize("case", list(_REFERENCE_CASES))
def test_reference_lists_bad_example(tmp_path, case):
  pairs, images, message, skipped, train, val = _REFERENCE_CASES[case]
  files = (_write(tmp_path / "train.json", pairs), _write(tmp_path / "val.json", images),
           _write(tmp_path / "test.json", _IMAGES))
  with pytest.raises(InputError) as error:
    annotations.read_reference_lists(*files, BadExamples("error"))
  assert str(error.value) == message
  bad = BadExamples("skip")
  splits = annotations.read_reference_lists(*files, bad)
  assert bad.count == skipped and bad.first(1) == [message]
  assert [(e.file, e.captions) for e in splits["train"]] == train
  assert [(e.file, e.captions) for e in splits["val"]] == val
  assert len(splits["test"]) == 2


# ------------------------------------------------------------------------------- VizWiz: bad input


_VIZWIZ_IMAGES = [{"id": 0, "file_name": "VizWiz_train_00000000.jpg"},
                  {"id": 1, "file_name": "VizWiz_train_00000001.jpg"}]
_VIZWIZ_ANNOTATIONS = [{"image_id": i, "caption": f"a photo {k}", "is_rejected": False,
                        "is_precanned": False} for i in (0, 1) for k in range(2)]
_ANNOTATION = {"image_id": 1, "caption": "a can", "is_rejected": False, "is_precanned": False}


def _vizwiz(images=_VIZWIZ_IMAGES, annotations_=_VIZWIZ_ANNOTATIONS) -> dict:
  return {"images": images, "annotations": annotations_}


def _last_annotation(**fields) -> dict:
  """The document with its last annotation (of image 1) replaced by _ANNOTATION | fields."""
  return _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS[:3] + [{**_ANNOTATION, **fields}])


# (train document, message under 'error', count under 'skip', {image_id: captions kept})
_VIZWIZ_CASES = {
    "image with no annotations": (
        _vizwiz(images=_VIZWIZ_IMAGES + [{"id": 2, "file_name": "VizWiz_train_00000002.jpg"}]),
        "train.json: images[2]: no annotations", 1, {"0": 2, "1": 2}),
    "unknown image id": (
        _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS + [{**_ANNOTATION, "image_id": 9}]),
        "train.json: annotations[4].image_id: unknown image id 9", 1, {"0": 2, "1": 2}),
    "duplicate image id": (
        _vizwiz(images=_VIZWIZ_IMAGES + [{"id": 1, "file_name": "VizWiz_train_00000002.jpg"}]),
        "train.json: images[2].id: duplicate image id 1 (also train.json: images[1])", 1,
        {"0": 2, "1": 2}),
    "missing file_name": (
        _vizwiz(images=[_VIZWIZ_IMAGES[0], {"id": 1}]),
        "train.json: images[1].file_name: missing", 1, {"0": 2}),  # its annotations go with it
    "id not an integer": (
        _vizwiz(images=[_VIZWIZ_IMAGES[0], {"id": 1.5, "file_name": "x.jpg"}]),
        "train.json: images[1].id: expected an integer or a string, got a number 1.5", 3,
        {"0": 2}),  # + its two annotations' unknown image id 1
    "empty caption": (
        _last_annotation(caption=""),
        "train.json: annotations[3].caption: empty after cleaning ('')", 1, {"0": 2, "1": 1}),
    "non-UTF-8 caption": (
        _last_annotation(caption="\udcff"),
        "train.json: annotations[3].caption: not valid UTF-8 text (surrogates not allowed at "
        "character 0: '\\udcff')", 1, {"0": 2, "1": 1}),
    "caption missing": (
        _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS[:3] + [{"image_id": 1, "is_rejected": False}]),
        "train.json: annotations[3].caption: missing", 1, {"0": 2, "1": 1}),
    "flag not a boolean": (
        _last_annotation(is_rejected="yes"),
        "train.json: annotations[3].is_rejected: expected a boolean, got a string 'yes'", 1,
        {"0": 2, "1": 1}),
    "all captions of an image bad": (
        _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS[:2] + [{**_ANNOTATION, "caption": "."},
                                                      {**_ANNOTATION, "is_precanned": True}]),
        "train.json: annotations[2].caption: empty after cleaning ('.')", 2, {"0": 2}),
    "annotation not an object": (
        _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS + [None]),
        "train.json: annotations[4]: expected an object, got null", 1, {"0": 2, "1": 2}),
}


@pytest.mark.parametrize("case", list(_VIZWIZ_CASES))
def test_vizwiz_bad_example(tmp_path, case):
  doc, message, skipped, kept = _VIZWIZ_CASES[case]
  train = _write(tmp_path / "train.json", doc)
  val = _write(tmp_path / "val.json", _vizwiz(images=[{"id": 5, "file_name": "v.jpg"}],
                                               annotations_=[{**_ANNOTATION, "image_id": 5}]))
  with pytest.raises(InputError) as error:
    annotations.read_vizwiz(train, val, BadExamples("error"))
  assert str(error.value) == message
  bad = BadExamples("skip")
  splits = annotations.read_vizwiz(train, val, bad)
  assert bad.count == skipped and bad.first(1) == [message]
  assert {e.image_id: len(e.captions) for e in splits["train"]} == kept
  assert splits["val"] == [ImageEntry("val/v.jpg", ("a can",), "5", "val.json: images[0]")]


def test_vizwiz_image_left_empty_by_the_flags_is_dropped_silently(tmp_path):
  doc = _vizwiz(annotations_=_VIZWIZ_ANNOTATIONS[:2] + [
      {**_ANNOTATION, "caption": "Quality issues are too severe to recognize visual content.",
       "is_precanned": True}, {**_ANNOTATION, "caption": "", "is_rejected": True}])
  path = _write(tmp_path / "train.json", doc)
  bad = BadExamples("error")
  assert [e.image_id for e in annotations.read_vizwiz(path, path, bad)["train"]] == ["0"]
  with pytest.raises(InputError, match=r"annotations\[3\]\.caption: empty after cleaning"):
    annotations.read_vizwiz(path, path, bad, include_rejected=True)  # now it is checked


# ------------------------------------------------------------------------------------ image files


@pytest.fixture
def jpeg(trees) -> bytes:
  root = trees["flickr30k"]["image_root"]
  with open(os.path.join(root, sorted(os.listdir(root))[0]), "rb") as f:
    return f.read()


_IMAGE_CASES = {
    "missing image": (None, "image file not found"),
    "corrupt JPEG": (lambda jpeg: np.random.default_rng(0).bytes(500),
                     r"not a readable image \(Pillow cannot identify it; 500 bytes\)"),
    "truncated JPEG": (lambda jpeg: jpeg[:len(jpeg) // 2], r"corrupt or truncated image \(image "
                       r"file is truncated \(\d+ bytes not processed\)\)"),
    "text file named .jpg": (lambda jpeg: b"not an image\n",
                             r"not a readable image \(Pillow cannot identify it; 13 bytes\)"),
}


@pytest.mark.parametrize("case", list(_IMAGE_CASES))
def test_bad_image_file(tmp_path, jpeg, case):
  content, problem = _IMAGE_CASES[case]
  path = tmp_path / "x.jpg"
  if content:
    path.write_bytes(content(jpeg))
  where = "dataset_flickr30k.json: images[3]"
  with pytest.raises(InputError, match=f"^{re.escape(f'{where}: {path}: ')}{problem}$"):
    annotations.read_image(str(path), where, BadExamples("error"))
  bad = BadExamples("skip")
  assert annotations.read_image(str(path), where, bad) is None
  assert bad.count == 1 and bad.first()[0].startswith(f"{where}: {path}: ")
  (tmp_path / "good.jpg").write_bytes(jpeg)
  assert annotations.read_image(str(tmp_path / "good.jpg"), where, bad) == jpeg and bad.count == 1
