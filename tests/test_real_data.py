"""The real-data pipeline on generated miniature Flickr30K-, COCO- and VizWiz-like trees: parsing
and split conventions, preparing (TFDS ArrayRecord), per-process rows, resume order, bad input,
and the teacher-feature job feeding a stage-2 run."""

import json
import logging
import os
import pathlib
import re
import shutil
import subprocess
import sys
import threading
import time

import numpy as np
import pytest
from conftest import REPO, load_config

from rebalance_jax.config import spec
from rebalance_jax.data import miniature, pipeline, prepared, real
from rebalance_jax.data.dataset import load_dataset
from rebalance_jax.infra import files
from rebalance_jax.infra.errors import InputError
from rebalance_jax.recipe import phases
from rebalance_jax.recipe.teachers import feature_job

CONFIGS = {"flickr30k": "configs/flickr.py:tiny", "coco": "configs/coco.py:tiny",
           "vizwiz": "configs/vizwiz.py:tiny"}


@pytest.fixture(scope="module")
def trees(tmp_path_factory):
  return miniature.write_miniatures(str(tmp_path_factory.mktemp("miniature")))


def real_config(name, paths, cache_dir, annotation="karpathy", **options):
  """configs/<name>.py:tiny pointed at a miniature tree."""
  config = load_config(CONFIGS[name])
  config.data.cache_dir = str(cache_dir)
  config.data.image_root = paths["image_root"]
  if name == "vizwiz":
    config.data.update(train_file=paths["train_file"], val_file=paths["val_file"])
  elif annotation == "karpathy":
    config.data.annotation_file = paths["karpathy_file"]
  else:
    config.data[name].format = "reference"
    config.data.update(train_file=paths["train_file"], val_file=paths["val_file"],
                       test_file=paths["test_file"])
  config.data[name].update(options)
  return config


def test_karpathy_and_reference_flickr_give_the_same_splits(trees, tmp_path):
  karpathy = load_dataset(spec.from_config(
      real_config("flickr30k", trees["flickr30k"], tmp_path)).data)
  lists = load_dataset(spec.from_config(
      real_config("flickr30k", trees["flickr30k"], tmp_path, annotation="reference")).data)
  for data in (karpathy, lists):
    assert (data.train.num_images, data.val.num_images, data.test.num_images) == (24, 6, 6)
    assert data.train.num_captions == 24 * 5 and data.test.num_captions == 6 * 5
    np.testing.assert_array_equal(data.test.image_to_texts[2], [10, 11, 12, 13, 14])
  assert karpathy.train.captions == lists.train.captions
  assert karpathy.test.captions == lists.test.captions
  # The same decoded pixels whichever annotation format named the file.
  np.testing.assert_array_equal(karpathy.test.images[[0, 5]], lists.test.images[[0, 5]])
  assert karpathy.test.images[0].shape == (64, 64, 3)
  assert karpathy.identity != lists.identity  # other annotation files: another dataset identity
  # [ref]'s convention: the val images join training.
  config = real_config("flickr30k", trees["flickr30k"], tmp_path, add_val_to_train=True)
  assert load_dataset(spec.from_config(config).data).train.num_images == 30


def test_coco_trains_on_restval_and_tests_on_five_captions(trees, tmp_path):
  config = real_config("coco", trees["coco"], tmp_path)
  data = load_dataset(spec.from_config(config).data)
  with open(trees["coco"]["karpathy_file"]) as f:
    images = json.load(f)["images"]
  by_split = {s: [i for i in images if i["split"] == s] for s in ("train", "restval", "test")}
  assert data.train.num_images == len(by_split["train"]) + len(by_split["restval"]) == 26
  assert data.train.num_captions == sum(len(i["sentences"]) for i in by_split["train"] +
                                        by_split["restval"])  # all of a training image's 5-7
  assert data.test.num_captions == 5 * data.test.num_images  # the first 5 of each
  assert data.test.captions[:5] == tuple(s["raw"] for s in by_split["test"][0]["sentences"][:5])
  config.data.coco.use_restval = False
  assert load_dataset(spec.from_config(config).data).train.num_images == 20


@pytest.mark.parametrize("val", ["test", "rest"])
def test_vizwiz_tests_on_the_official_val_split(trees, tmp_path, val):
  config = real_config("vizwiz", trees["vizwiz"], tmp_path, test_images=2, val=val)
  data = load_dataset(spec.from_config(config).data)
  directory, record = real.prepare(spec.from_config(config).data)
  # Rejected and pre-canned captions are excluded; val images left with fewer than 5 are listed.
  assert record["short_eval_images"]["val"] and not any(
      "Quality issues" in c for c in data.train.captions)
  eval_images = record["splits"]["val"]["images"]
  assert data.test.num_images == 2 and data.test.num_captions == 10
  if val == "test":
    assert data.val.captions == data.test.captions  # [ref]: the same file
  else:
    assert data.val.num_images == eval_images - 2
    assert not set(data.val.captions) & set(data.test.captions)
  config.data.vizwiz.test_images = eval_images + 1
  with pytest.raises(InputError, match=r"config\.data\.vizwiz\.test_images=\d+ exceeds the \d+ "
                                       r"images of the official val split"):
    load_dataset(spec.from_config(config).data)


def _assert_replays(batches, start, end):
  """`batches.iterate(start, end)` (grain's threads or worker processes) yields exactly the
  batches `batches(step)` makes directly."""
  replay = batches.iterate(start, end)
  try:
    for step in range(start, end):
      got, expected = next(replay), batches(step)
      for key in expected:
        np.testing.assert_array_equal(got[key], expected[key])
  finally:
    replay.close()


@pytest.mark.slow
def test_each_process_reads_its_rows_and_resumed_batches_are_the_same(trees, tmp_path,
                                                                     monkeypatch):
  data = load_dataset(spec.from_config(real_config("flickr30k", trees["flickr30k"],
                                                   tmp_path)).data)
  batches = pipeline.TrainBatches(data.train.num_captions, 8, 5, pipeline.pair_rows(data, 5))
  whole = batches(3)
  assert whole["image"].shape == (8, 64, 64, 3) and whole["image"].dtype == np.uint8
  # The augmented view is a function of (seed, step, row): the same batch again, another step
  # differs, and grain's threads and worker processes replay exactly these batches.
  np.testing.assert_array_equal(batches(3)["image"], whole["image"])
  rows = batches.local_rows(3)
  assert not np.array_equal(pipeline.pair_rows(data, 5)(rows, 4)["image"], whole["image"])
  _assert_replays(batches, 2, 5)
  # Two processes: disjoint rows that make up the global batch, each row's view unchanged, also
  # when 2 worker processes (outside the JAX job) assemble process 1's.
  halves, rows, evaluated = [], [], []
  for process in (0, 1):
    monkeypatch.setattr(pipeline.sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(pipeline.sharding.jax, "process_index", lambda p=process: p)
    mine = pipeline.TrainBatches(data.train.num_captions, 8, 5, pipeline.pair_rows(data, 5),
                                 num_workers=2 * process)
    halves.append(mine(3))
    rows.append(mine.local_rows(3))
    _assert_replays(mine, 2, 5)
    evaluated += [r[valid] for _, r, valid in pipeline.padded_batches(data.test.num_images, 4)]
  assert not set(rows[0]) & set(rows[1])
  # Evaluation: every test image exactly once over both processes (padding rows are invalid).
  assert sorted(np.concatenate(evaluated).tolist()) == list(range(data.test.num_images))
  np.testing.assert_array_equal(np.concatenate(rows),
                                pipeline.train_batch_indices(data.train.num_captions, 8, 3, 5))
  for key in whole:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), whole[key])


@pytest.fixture(scope="module")
def tiny_teachers(tmp_path_factory):
  return miniature.write_tiny_teachers(str(tmp_path_factory.mktemp("tiny_teachers")))


def _with_tiny_teachers(config, tiny_teachers):
  for field, path in tiny_teachers.items():
    *sections, key = field.split(".")
    node = config
    for section in sections:
      node = node[section]
    node[key] = path
  return config


@pytest.mark.slow
def test_a_tiny_model_trains_end_to_end_on_a_miniature(trees, tiny_teachers, tmp_path):
  """prepare, the teacher-feature job, stage 1, stage 2 reading the job's features, evaluation
  (COCO's and VizWiz's splits differ only in what the tests above check; their whole runs are
  the commands of docs/datasets.md)."""
  config = real_config("flickr30k", trees["flickr30k"], tmp_path / "cache")
  _with_tiny_teachers(config, tiny_teachers)
  for stage in config.stages.values():
    stage.update(num_epochs=0, num_steps=3)
  config.checkpoint.every_steps = 3
  config.eval.every_steps = 3
  shared = tmp_path / "features"
  config.teachers.features_dir = str(shared)
  config.teachers.image_view = "center_crop"  # CLIP's own preprocessing, recorded with them
  job = feature_job.run_job(spec.from_config(config), str(tmp_path / "job"))
  with open(shared / feature_job.MANIFEST) as f:
    assert json.load(f)["preprocessing"]["image"]["view"] == "center_crop"
  data = load_dataset(spec.from_config(config).data)
  assert job.num_rows == {"image": data.train.num_images, "text": data.train.num_captions}
  written = {p: os.stat(os.path.join(shared, p)).st_mtime_ns for p in os.listdir(shared)}
  results = phases.run(spec.from_config(config), str(tmp_path / "run"))
  assert set(results) == {"stage1", "stage2"}
  assert all(np.isfinite(r["rsum"]) for r in results.values())
  with open(tmp_path / "run" / "stage2" / "logs" / "metrics.jsonl") as f:
    last = [json.loads(line) for line in f][-1]
  assert all(np.isfinite(last[f"loss/{k}"]) for k in ("iic", "ttc", "kd", "kdi", "kdt"))
  # Stage 2 read the job's features as they were: nothing in the directory was written again.
  assert {p: os.stat(os.path.join(shared, p)).st_mtime_ns for p in os.listdir(shared)} == written
  assert not os.path.exists(tmp_path / "run" / "teacher_features")


@pytest.mark.slow
def test_features_of_other_annotations_are_refused(trees, tiny_teachers, tmp_path):
  """The same annotation path with other contents (edited in place) is another dataset."""
  tree = dict(trees["flickr30k"], karpathy_file=str(tmp_path / "dataset_flickr30k.json"))
  with open(trees["flickr30k"]["karpathy_file"]) as f:
    annotations = json.load(f)
  with open(tree["karpathy_file"], "w") as f:
    json.dump(annotations, f)
  config = _with_tiny_teachers(real_config("flickr30k", tree, tmp_path / "cache"), tiny_teachers)
  config.teachers.features_dir = str(tmp_path / "features")
  feature_job.run_job(spec.from_config(config), str(tmp_path / "job"))
  annotations["images"][0]["sentences"][0]["raw"] = "an edited caption"
  with open(tree["karpathy_file"], "w") as f:
    json.dump(annotations, f)
  with pytest.raises(InputError, match=r"teacher features in .* were made from other data, "
                                       r"teachers than this config's"):
    feature_job.run_job(spec.from_config(config), str(tmp_path / "job"))


def test_records_follow_the_index_and_the_data_config_is_in_the_fingerprint(trees, tmp_path):
  config = real_config("coco", trees["coco"], tmp_path)
  exp = spec.from_config(config)
  data = load_dataset(exp.data)
  directory, _ = real.prepare(exp.data)
  for split in ("train", "restval", "val", "test"):
    index = prepared.read_index(directory, split)
    source = prepared.open_source(directory, split)
    assert [source[i]["file"].decode() for i in range(len(source))] == index["files"]
    assert [[c.decode() for c in source[i]["captions"]] for i in range(len(source))] == \
        index["captions"]
  # Checkpoints depend on the annotations' contents and on every data field that shapes a batch.
  fingerprint = exp.fingerprint("stage1", data.content)
  assert fingerprint["data_identity"] == data.identity == real.identity(real.preparation(exp.data))
  assert fingerprint["data"]["image_size"] == 64 and fingerprint["data"]["coco"]["use_restval"]
  assert "annotation_file" not in fingerprint["data"]  # by content, not by path


@pytest.mark.parametrize("damage, message", [
    ("counts edited", r"prepared\.json says split val has \{'images': 99, 'captions': \d+\}, its "
                      r"index holds \{'images': \d+"),
    ("index edited", r"index-val\.json differs from the file prepared"),
    ("shard truncated", r"\.array_record-00000-of-00001 has \d+ bytes, prepared with \d+"),
    ("shard deleted", r"\.array_record-00000-of-00001 is missing from the prepared dataset"),
])
def test_a_prepared_dataset_changed_after_preparation_is_refused(trees, tmp_path, damage,
                                                                 message):
  data = spec.from_config(real_config("coco", trees["coco"], tmp_path)).data
  directory, _ = real.prepare(data)
  shard = next(p for p in sorted(pathlib.Path(directory).rglob("*.array_record-*"))
               if "-val." in p.name)
  if damage == "counts edited":
    record = json.loads((pathlib.Path(directory) / "prepared.json").read_text())
    record["splits"]["val"]["images"] = 99
    (pathlib.Path(directory) / "prepared.json").write_text(json.dumps(record))
  elif damage == "index edited":
    index = pathlib.Path(directory) / "index-val.json"
    text = index.read_text()
    at = text.index('"captions": [["') + len('"captions": [["')
    index.write_text(text[:at] + text[at].swapcase() + text[at + 1:])  # same size, one caption
  elif damage == "shard truncated":
    os.truncate(shard, shard.stat().st_size // 2)
  else:
    shard.unlink()
  for attempt in (lambda: real.prepare(data), lambda: load_dataset(data)):
    with pytest.raises(InputError, match=message + rf".*; delete {re.escape(directory)} to "
                                       r"prepare it again"):
      attempt()


def test_a_prepared_dataset_is_not_used_for_other_images(trees, tmp_path):
  """Training reads the prepared copies: an image_root pointed at other images is named, not
  silently ignored; the same images copied elsewhere are the same dataset."""
  tree = trees["flickr30k"]
  data = lambda root: spec.from_config(real_config("flickr30k", dict(tree, image_root=str(root)),
                                                   tmp_path)).data
  directory, _ = real.prepare(data(tree["image_root"]))
  copy = tmp_path / "copy"
  shutil.copytree(tree["image_root"], copy)
  assert real.prepare(data(copy))[0] == directory
  first = sorted(os.listdir(copy))[0]
  with open(copy / first, "ab") as f:
    f.write(b"re-encoded")
  for attempt in (lambda: real.prepare(data(copy)), lambda: load_dataset(data(copy))):
    with pytest.raises(InputError, match=rf"config\.data\.image_root='.*copy' holds other images "
                                         rf"than the dataset prepared in .*: .*{first} has \d+ "
                                         r"bytes, prepared from \d+"):
      attempt()


def test_a_preparation_in_progress_blocks_nothing_but_the_same_preparation(trees, tmp_path,
                                                                           caplog):
  """A cache shared by several jobs: a prepared dataset is read while another preparation holds
  its lock; a second preparation of the same data waits for the first, then reuses its work."""
  coco = spec.from_config(real_config("coco", trees["coco"], tmp_path)).data
  flickr = spec.from_config(real_config("flickr30k", trees["flickr30k"], tmp_path)).data
  ready, _ = real.prepare(coco)
  target = real.prepared_dir(flickr, real.preparation(flickr))
  lock = files.WorkdirLock(os.path.dirname(target), "preparation of flickr30k", wait=True,
                           name=f".{os.path.basename(target)}.lock").__enter__()
  try:
    assert real.prepare(coco)[0] == ready  # no wait: it is complete
    caplog.set_level(logging.INFO, logger="absl")
    second = []
    waiter = threading.Thread(target=lambda: second.append(real.prepare(flickr)))
    waiter.start()
    time.sleep(1.5)
    assert waiter.is_alive() and not os.path.exists(target)  # waiting for the lock's holder
  finally:
    lock.__exit__(None, None, None)
  waiter.join(timeout=60)
  assert second and second[0][0] == target and os.path.exists(os.path.join(target,
                                                                           "prepared.json"))
  assert any("prepare: waiting for a preparation of flickr30k (pid" in r.getMessage()
             for r in caplog.records)


def test_a_prepared_dir_that_is_not_one_is_refused_and_a_killed_attempt_redone(trees, tmp_path):
  config = real_config("flickr30k", trees["flickr30k"], tmp_path)
  target = tmp_path / "user_folder"
  target.mkdir()
  (target / "notes.txt").write_text("keep me")
  config.data.prepared_dir = str(target) + "/"
  with pytest.raises(InputError, match=r"config\.data\.prepared_dir='.*user_folder' exists and "
                                       r"is not a prepared dataset"):
    real.prepare(spec.from_config(config).data)
  assert (target / "notes.txt").read_text() == "keep me"  # never deleted
  config.data.prepared_dir = str(tmp_path / "prepared") + "/"
  staging = tmp_path / "prepared.incomplete"
  staging.mkdir()
  (staging / "half-written").write_bytes(b"x")  # what a killed attempt leaves
  directory, record = real.prepare(spec.from_config(config).data)
  assert directory == str(tmp_path / "prepared") and not staging.exists()
  assert record["splits"]["train"]["images"] == 24
  other = real_config("flickr30k", trees["flickr30k"], tmp_path, annotation="reference")
  other.data.prepared_dir = directory
  with pytest.raises(InputError, match=r"holds a dataset prepared from other annotations, "
                                       r"format"):
    real.prepare(spec.from_config(other).data)


@pytest.mark.parametrize("field, value, message", [
    ("data.crop_scale", (0.6, 0.5), r"config\.data\.crop_scale=\(0\.6, 0\.5\) must be"),
    ("data.randaugment", (2, 11), r"config\.data\.randaugment=\(2, 11\) must be"),
    ("data.num_workers", -1, r"config\.data\.num_workers=-1 must be >= 0"),
    ("data.on_bad_example", "ignore", r"config\.data\.on_bad_example='ignore' is not one of"),
    ("data.flickr30k.format", "vizwiz", r"config\.data\.flickr30k\.format='vizwiz' is not one"),
    ("data.flickr30k.eval_captions_per_image", 4, r"eval_captions_per_image=4 is below the 5"),
    ("data.flickr30k.split", "x", r"config\.data\.flickr30k: unknown fields \['split'\]"),
])
def test_bad_real_data_settings_name_the_field(trees, tmp_path, field, value, message):
  config = real_config("flickr30k", trees["flickr30k"], tmp_path)
  *sections, key = field.split(".")
  node = config
  for section in sections:
    node = node[section]
  node[key] = value
  with pytest.raises(InputError, match=message):
    load_dataset(spec.from_config(config).data)


def test_paths_of_the_wrong_kind_are_named(trees, tmp_path):
  tree = trees["flickr30k"]
  config = real_config("flickr30k", dict(tree, karpathy_file=str(tmp_path)), tmp_path)
  with pytest.raises(InputError, match=rf"config\.data\.annotation_file='{tmp_path}' is not a "
                                       r"file"):
    load_dataset(spec.from_config(config).data)
  config = real_config("flickr30k", dict(tree, image_root=tree["karpathy_file"]), tmp_path)
  with pytest.raises(InputError, match=r"config\.data\.image_root='.*\.json' is not a directory"):
    load_dataset(spec.from_config(config).data)


@pytest.mark.parametrize("field, value", [("augment", "reference"), ("exif_orientation", "apply")])
def test_image_file_options_need_encoded_images(tiny_config, field, value):
  tiny_config.data[field] = value  # configs/demo.py:tiny: the synthetic data
  with pytest.raises(InputError, match=rf"config\.data\.{field}='{value}' needs a source of "
                                       r"encoded images \(a real dataset\), not "
                                       r"config\.data\.name='synthetic'"):
    spec.from_config(tiny_config)


def _prepare_cli(config_file, *flags):
  return subprocess.run([sys.executable, "-m", "rebalance_jax.prepare", f"--config={config_file}",
                         *flags], cwd=REPO, capture_output=True, text=True, timeout=300)


@pytest.mark.slow
def test_prepare_names_a_bad_image_or_skips_and_reports_it(trees, tmp_path):
  tree = trees["flickr30k"]
  with open(tree["karpathy_file"]) as f:
    entries = json.load(f)["images"]
  missing, corrupt = entries[0], entries[7]
  images = tmp_path / "images"
  os.makedirs(images)
  for entry in entries:
    if entry is not missing:
      source = os.path.join(tree["image_root"], entry["filename"])
      os.symlink(source, images / entry["filename"])
  os.remove(images / corrupt["filename"])
  (images / corrupt["filename"]).write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
  paths = [f"--config.data.image_root={images}",
           f"--config.data.annotation_file={tree['karpathy_file']}",
           f"--config.data.cache_dir={tmp_path / 'cache'}"]
  failed = _prepare_cli("configs/flickr.py:tiny", *paths)
  assert failed.returncode == 1
  assert (f"rebalance_jax.prepare: error: dataset_flickr30k.json: images[0]: "
          f"{images / missing['filename']}") in failed.stderr
  skipped = _prepare_cli("configs/flickr.py:tiny", *paths, "--config.data.on_bad_example=skip")
  assert skipped.returncode == 0, skipped.stderr[-2000:]
  assert "skipped 2 bad examples" in skipped.stdout
  assert "download" not in (skipped.stdout + skipped.stderr).lower()  # nothing is downloaded
  assert f"images[7]: {images / corrupt['filename']}" in skipped.stderr
  config = real_config("flickr30k", dict(tree, image_root=str(images)), tmp_path / "cache")
  config.data.on_bad_example = "skip"
  data = load_dataset(spec.from_config(config).data)  # the prepared dataset, without the two
  good = [e for e in entries if e is not missing and e is not corrupt]
  assert [data.train.num_images, data.val.num_images, data.test.num_images] == [
      sum(e["split"] == split for e in good) for split in ("train", "val", "test")]
  directory = real.prepared_dir(spec.from_config(config).data,
                                real.preparation(spec.from_config(config).data))
  record = prepared.read_record(directory)
  assert record["skipped"]["count"] == 2 and len(record["skipped"]["messages"]) == 2
