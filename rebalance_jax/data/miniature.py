"""Miniature dataset trees in the real layouts of docs/method.md §6, for tests and for trying the real
pipeline without the real data.

The images are real JPEGs (quality 90) of `synthetic` scenes, each resized to its own non-square
size of 64-128 pixels, and their captions are the scenes' true captions, so retrieval is
learnable. Everything is deterministic in `seed`; the trees' scenes differ (`scene_seed`).

* Flickr30K-like: `images/<id>.jpg`, the Karpathy `dataset_flickr30k.json`, and the reference's
  lists `flickr30k_{train,val,test}.json` (train: one pair per caption, image_id the numeric id);
* COCO-like: `train2014/COCO_train2014_<cocoid>.jpg` (the train split) and `val2014/...` (restval,
  val, test), `dataset_coco.json` with filepath, cocoid and imgid; about a third of the images have
  6 or 7 captions, as some real ones do;
* VizWiz-like: `train/VizWiz_train_<8 digits>.jpg`, `val/...`, `annotations/{train,val}.json`
  with image ids continuing from train into val, as the official files. In each split image i's
  fifth caption is pre-canned when i % 3 == 1, its first is rejected (spam text) when i % 3 == 2,
  and the last image has only pre-canned captions.

  python -m rebalance_jax.data.miniature --out=/tmp/miniature
writes all three and prints the flags that point a real config at them.
"""

import json
import os
import shlex

import jax
import numpy as np
from absl import app, flags
from PIL import Image

from rebalance_jax.data import synthetic, text
from rebalance_jax.data.text import clean_caption
from rebalance_jax.models import towers, weights

PRECANNED = "Quality issues are too severe to recognize visual content."
REJECTED = "i cant tell what this is lol"
_SCENE_SIZE = 96
_SIDES = (64, 128)  # the range of each image's width and height
TREES = ("flickr30k", "coco", "vizwiz")


def scene_seed(tree: str, seed: int) -> int:
  """The SyntheticConfig.seed of a tree's scenes."""
  return len(TREES) * seed + TREES.index(tree)


def _scenes(tree: str, seed: int, captions_per_image: int, **sizes) -> dict[str, dict]:
  """{split: synthetic.generate_split(...)} for the splits in `sizes` (num_train=..., ...)."""
  config = synthetic.SyntheticConfig(image_size=_SCENE_SIZE, captions_per_image=captions_per_image,
                                     seed=scene_seed(tree, seed), **{"num_test": 1, **sizes})
  return {split: synthetic.generate_split(config, split)
          for split in synthetic.SPLITS if f"num_{split}" in sizes}


def _save_jpeg(path: str, image: np.ndarray, rng: np.random.Generator) -> None:
  """`image` resized to a random non-square size, saved as a JPEG of quality 90."""
  width, height = (int(s) for s in rng.integers(_SIDES[0], _SIDES[1] + 1, size=2))
  if width == height:
    height += 1 if height < _SIDES[1] else -1
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(image).resize((width, height), Image.BICUBIC).save(path, "JPEG", quality=90)


def _write_json(path: str, value) -> str:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w", encoding="utf-8") as f:
    json.dump(value, f)
  return path


def _interleaved(rng: np.random.Generator, counts: dict[str, int]) -> list[tuple[str, int]]:
  """(split, index in split) of every image in a random file order that keeps each split's order."""
  labels = rng.permutation([split for split, n in counts.items() for _ in range(n)])
  seen = dict.fromkeys(counts, 0)
  order = []
  for split in labels:
    order.append((str(split), seen[split]))
    seen[split] += 1
  return order


def _karpathy_entry(imgid: int, first_sentid: int, split: str, filename: str, captions,
                    **extra) -> dict:
  sentids = list(range(first_sentid, first_sentid + len(captions)))
  sentences = [{"tokens": clean_caption(c, 10**6).split(), "raw": c, "imgid": imgid, "sentid": s}
               for s, c in zip(sentids, captions)]
  return {**extra, "sentids": sentids, "filename": filename, "imgid": imgid, "split": split,
          "sentences": sentences}


def write_flickr_like(root: str, num_train: int = 24, num_val: int = 6, num_test: int = 6,
                      seed: int = 0) -> dict:
  """A Flickr30K-like tree under `root`; returns its image_root, karpathy_file, train_file,
  val_file and test_file."""
  rng = np.random.default_rng([seed, 0])
  counts = {"train": num_train, "val": num_val, "test": num_test}
  scenes = _scenes("flickr30k", seed, 5, **{f"num_{split}": n for split, n in counts.items()})
  image_root = os.path.join(root, "images")
  photo_ids = 10**6 + np.cumsum(rng.integers(1, 10**5, size=sum(counts.values())))
  entries, lists = [], {split: [] for split in counts}
  for imgid, ((split, i), photo_id) in enumerate(zip(_interleaved(rng, counts), photo_ids)):
    filename, captions = f"{photo_id}.jpg", scenes[split]["captions"][i]
    _save_jpeg(os.path.join(image_root, filename), scenes[split]["images"][i], rng)
    entries.append(_karpathy_entry(imgid, 5 * imgid, split, filename, captions))
    if split == "train":
      lists[split] += [{"image": filename, "caption": c, "image_id": str(photo_id)}
                       for c in captions]
    else:
      lists[split].append({"image": filename, "caption": list(captions)})
  paths = {"image_root": image_root, "karpathy_file": _write_json(
      os.path.join(root, "dataset_flickr30k.json"), {"images": entries, "dataset": "flickr30k"})}
  for split, items in lists.items():
    paths[f"{split}_file"] = _write_json(os.path.join(root, f"flickr30k_{split}.json"), items)
  return paths


def write_coco_like(root: str, num_train: int = 20, num_restval: int = 6, num_val: int = 6,
                    num_test: int = 6, seed: int = 0) -> dict:
  """A COCO-like tree under `root` (restval drawn as extra train scenes); returns its image_root
  and karpathy_file."""
  rng = np.random.default_rng([seed, 1])
  scenes = _scenes("coco", seed, 7, num_train=num_train + num_restval, num_val=num_val,
                   num_test=num_test)
  sources = {"train": ("train", 0), "restval": ("train", num_train), "val": ("val", 0),
             "test": ("test", 0)}  # Karpathy split -> (synthetic split, first scene)
  counts = {"train": num_train, "restval": num_restval, "val": num_val, "test": num_test}
  order = _interleaved(rng, counts)
  cocoids = rng.choice(581929, size=len(order), replace=False) + 1
  entries, first_sentid = [], 0
  for imgid, ((split, i), cocoid) in enumerate(zip(order, cocoids)):
    scene_split, start = sources[split]
    folder = "train2014" if split == "train" else "val2014"
    filename = f"COCO_{folder}_{cocoid:012d}.jpg"
    num_captions = int(rng.integers(6, 8)) if rng.random() < 1 / 3 else 5
    captions = scenes[scene_split]["captions"][start + i][:num_captions]
    _save_jpeg(os.path.join(root, folder, filename), scenes[scene_split]["images"][start + i], rng)
    entries.append(_karpathy_entry(imgid, first_sentid, split, filename, captions,
                                   filepath=folder, cocoid=int(cocoid)))
    first_sentid += num_captions
  return {"image_root": root, "karpathy_file": _write_json(
      os.path.join(root, "dataset_coco.json"), {"images": entries, "dataset": "coco"})}


def _vizwiz_annotations(i: int, last: bool, captions) -> list[tuple[str, bool, bool]]:
  """(caption, is_rejected, is_precanned) of image i of a split (the module docstring's rule)."""
  rows = [(c, False, False) for c in captions]
  if last:
    return [(PRECANNED, False, True)] * len(rows)
  if i % 3 == 1:
    rows[4] = (PRECANNED, False, True)
  if i % 3 == 2:
    rows[0] = (REJECTED, True, False)
  return rows


def write_vizwiz_like(root: str, num_train: int = 24, num_val: int = 14,
                      seed: int = 0) -> dict:
  """A VizWiz-Captions-like tree under `root`; returns its image_root, train_file and val_file
  ([ref] tests on the official val split)."""
  rng = np.random.default_rng([seed, 2])
  scenes = _scenes("vizwiz", seed, 5, num_train=num_train, num_val=num_val)
  paths, image_id, annotation_id = {"image_root": root}, 0, 0
  for split, data in scenes.items():
    images, annotations = [], []
    for i, (image, captions) in enumerate(zip(data["images"], data["captions"])):
      file_name = f"VizWiz_{split}_{i:08d}.jpg"
      _save_jpeg(os.path.join(root, split, file_name), image, rng)
      images.append({"file_name": file_name, "id": image_id, "text_detected": False})
      last = i == len(data["images"]) - 1
      for caption, rejected, precanned in _vizwiz_annotations(i, last, captions):
        annotations.append({"caption": caption, "image_id": image_id, "is_precanned": precanned,
                            "is_rejected": rejected, "id": annotation_id, "text_detected": False})
        annotation_id += 1
      image_id += 1
    paths[f"{split}_file"] = _write_json(
        os.path.join(root, "annotations", f"{split}.json"),
        {"info": {"description": "VizWiz-Captions-like miniature"}, "images": images,
         "annotations": annotations})
  return paths


def write_miniatures(root: str) -> dict[str, dict]:
  """All three trees (seed 0), under root/flickr30k, root/coco and root/vizwiz."""
  writers = (write_flickr_like, write_coco_like, write_vizwiz_like)
  return {tree: write(os.path.join(root, tree)) for tree, write in zip(TREES, writers)}


def _flag_lines(tree: str, paths: dict) -> list[tuple[str, str]]:
  """(annotation format, the --config.data.* flags that point configs/<tree>.py at the tree) for
  each way of reading it."""
  def flags_of(*fields: tuple[str, str]) -> str:
    return " ".join(f"--config.data.{field}={shlex.quote(paths[key])}" for field, key in fields)
  root = ("image_root", "image_root")
  if tree == "vizwiz":
    # Its val images with 5 captions left after the exclusions are few: test on 2 of them.
    return [("VizWiz-Captions", flags_of(root, ("train_file", "train_file"),
                                         ("val_file", "val_file")) +
             " --config.data.vizwiz.test_images=2")]
  lines = [("Karpathy split file", flags_of(root, ("annotation_file", "karpathy_file")))]
  if "train_file" in paths:
    lists = flags_of(root, *((key, key) for key in ("train_file", "val_file", "test_file")))
    lines.append(("the reference's JSON lists", f"--config.data.{tree}.format=reference {lists}"))
  return lines


# The tiny stand-in teachers of the configs' :tiny variant (config.defaults.tiny_reference_model):
# tower sections, and the size of the text teacher's own WordPiece vocabulary.
TINY_TEACHERS = {
    "image": dict(kind="vit", image_size=32, patch_size=8, width=48, depth=1, num_heads=4,
                  mlp_dim=96, dropout=0.0),
    "text": dict(kind="text", max_tokens=60, width=40, depth=1, num_heads=4, mlp_dim=80,
                 dropout=0.0),
}
TINY_TEACHER_VOCAB_SIZE = 512


def write_tiny_teachers(directory: str, seed: int = 0) -> dict[str, str]:
  """Randomly initialized weights of the tiny teachers of configs/<name>.py:tiny, and the text
  teacher's WordPiece vocabulary (trained on synthetic captions like the trees'). They are
  stand-ins that exercise the real-data teacher path (features from converted weights), not
  teachers that know anything. Returns {config field: path}."""
  vocab_file = os.path.join(directory, "tiny_teacher_vocab.txt")
  scenes = _scenes("flickr30k", seed + 1, 5, num_train=200)["train"]["captions"]
  text.train_wordpiece_vocab([clean_caption(c, 60) for caps in scenes for c in caps], vocab_file,
                             TINY_TEACHER_VOCAB_SIZE)
  paths = {"teachers.vocab_file": vocab_file}
  vocab_size = text.check_vocab(vocab_file)["size"]
  for i, modality in enumerate(("image", "text")):
    tower = towers.spec_from_config(TINY_TEACHERS[modality], f"config.teachers.{modality}", modality,
                                    **({"vocab_size": vocab_size} if modality == "text" else {}))
    path = os.path.join(directory, f"tiny_{modality}_teacher.safetensors")
    params = towers.init_params(tower, jax.random.key(seed + i))
    weights.save_safetensors(path, jax.tree.map(np.asarray, params))
    paths[f"teachers.{modality}.init"] = path
  return paths


_OUT = flags.DEFINE_string("out", None, "Directory to write the miniature trees under.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for tree, paths in write_miniatures(_OUT.value).items():
    print(f"{tree}: {os.path.join(_OUT.value, tree)}")
    for annotation_format, line in _flag_lines(tree, paths):
      print(f"  {annotation_format}:\n    {line}")
  teachers = " ".join(f"--config.{field}={shlex.quote(path)}" for field, path in
                      write_tiny_teachers(os.path.join(_OUT.value, "weights")).items())
  print(f"tiny stand-in teachers for configs/<name>.py:tiny:\n    {teachers}")
  print("e.g. python -m rebalance_jax.train --config=configs/flickr.py:tiny "
        "--workdir=runs/flickr30k_miniature <the flickr30k flags above> <the teacher flags>")


if __name__ == "__main__":
  flags.mark_flag_as_required("out")
  app.run(main)
