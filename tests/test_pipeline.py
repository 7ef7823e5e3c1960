"""The input pipeline: step-indexed order, per-process rows, record sources (the synthetic one,
and toy ones registered by these tests alone: one of arrays, one of encoded images that gets the
reference augmentation), and the splits' shapes."""

import io

import numpy as np
import pytest
from PIL import Image

from rebalance_jax.config import spec
from rebalance_jax.data import pipeline, prepared, sources, transforms
from rebalance_jax.data.dataset import load_dataset
from rebalance_jax.infra.errors import InputError


def test_train_batches_are_epoch_permutations_and_depend_only_on_step():
  steps_per_epoch = 10 // 3
  epoch0 = np.concatenate([pipeline.train_batch_indices(10, 3, s, seed=1) for s in range(3)])
  assert len(set(epoch0)) == 9  # no repeats within an epoch; the partial batch is dropped
  again = pipeline.train_batch_indices(10, 3, 1, seed=1)
  np.testing.assert_array_equal(again, epoch0[3:6])
  next_epoch = pipeline.train_batch_indices(10, 3, steps_per_epoch, seed=1)
  assert not np.array_equal(next_epoch, epoch0[:3])


def test_total_steps_from_epochs_or_explicit_steps():
  stage = spec.StageSpec("s", "", (), num_steps=0, num_epochs=2, batch_size=4,
                         objective=spec.ObjectiveSpec({"itc": 1.0}))
  assert stage.total_steps(10) == 4
  assert spec.StageSpec("s", "", (), 7, 2, 4, stage.objective).total_steps(10) == 7
  with pytest.raises(InputError, match=r"config\.stages\.s\.batch_size=4 exceeds the 3 training"):
    stage.total_steps(3)


def test_synthetic_splits_are_flickr_shaped_and_memory_mapped(tiny_config):
  data = load_dataset(spec.from_config(tiny_config).data)
  synthetic = tiny_config.data.synthetic
  assert data.train.num_captions == synthetic.num_train * synthetic.captions_per_image
  assert data.test.num_images == synthetic.num_test
  assert isinstance(data.train.images, np.memmap)  # read by row, never loaded whole
  np.testing.assert_array_equal(data.test.image_to_texts[3], [15, 16, 17, 18, 19])
  batch = pipeline.pair_rows(data, seed=0)(np.array([0, 7]), 0)
  np.testing.assert_array_equal(batch["image_id"], [0, 1])  # five captions per image
  np.testing.assert_array_equal(batch["image"][1], data.train.images[1])
  assert batch["ids"].shape == (2, tiny_config.data.max_tokens)
  assert data.vocab_size <= tiny_config.tokenizer.vocab_size


def test_captions_pad_to_the_smallest_bucket_holding_the_global_batchs_longest(tiny_config):
  max_tokens = tiny_config.data.max_tokens
  tiny_config.data.text_buckets = (4, 6, 30, 12)  # unsorted; those >= max_tokens are dropped
  exp = spec.from_config(tiny_config)
  buckets = tuple(b for b in (4, 6, 12) if b < max_tokens)
  assert exp.data.text_buckets == buckets
  data = load_dataset(exp.data)
  longest = data.encode(list(data.train.captions), train=True)["mask"].sum(1)
  short, long = int(np.argmin(longest)), int(np.argmax(longest))
  expected = lambda rows: next(n for n in (*buckets, max_tokens) if n >= longest[rows].max())
  global_rows = {0: np.array([short, long]), 1: np.array([short])}
  length = pipeline.text_lengths(data, global_rows.__getitem__, exp.data.text_buckets)
  assert length(0) == expected(global_rows[0]) and length(1) == expected(global_rows[1])
  load = pipeline.pair_rows(data, 0, text_length=length)
  # A process holding only the short caption pads it as the whole global batch needs.
  batch = load(np.array([short]), 0)
  assert batch["ids"].shape == batch["mask"].shape == (1, expected(global_rows[0]))
  full = data.encode([data.train.captions[short]], train=True)
  np.testing.assert_array_equal(batch["ids"], full["ids"][:, :length(0)])
  assert full["mask"][:, length(0):].sum() == 0  # nothing cut
  assert pipeline.text_lengths(data, global_rows.__getitem__, ())(0) == max_tokens
  assert expected(global_rows[0]) > expected(global_rows[1])  # the data has both kinds


@pytest.mark.parametrize("buckets", [(0,), (3.5,)])
def test_a_bad_text_bucket_is_named(tiny_config, buckets):
  tiny_config.data.text_buckets = buckets
  with pytest.raises(InputError, match=r"config\.data\.text_buckets"):
    spec.from_config(tiny_config)


def test_bad_synthetic_config_names_the_field(tiny_config):
  tiny_config.data.synthetic.caption_keep_prob = 1.5
  with pytest.raises(InputError, match=r"config\.data\.synthetic: .*caption_keep_prob"):
    load_dataset(spec.from_config(tiny_config).data)


class _CountingRecords:
  """Images made on demand from their row; counts the rows read."""

  def __init__(self, n, size):
    self.n, self.size, self.reads = n, size, 0

  def __len__(self):
    return self.n

  def __getitem__(self, rows):
    rows = np.atleast_1d(rows)
    self.reads += len(rows)
    return np.stack([np.full((self.size, self.size, 3), r % 256, np.uint8) for r in rows])


_WORDS = ("red", "blue", "circle", "square", "left", "right")


def _toy_source(data):
  """Three splits of 24 one-colour images with five captions each, and no scene attributes."""
  splits = {}
  for offset, name in enumerate(sources.SPLITS):
    n = 24
    rng = np.random.default_rng(offset)
    captions = tuple(" ".join(rng.choice(_WORDS, 3)) for _ in range(5 * n))
    splits[name] = sources.Split(_CountingRecords(n, data.image_size), captions,
                                 np.repeat(np.arange(n, dtype=np.int32), 5),
                                 np.arange(n, dtype=np.int32) + 100)
  return sources.Source(splits, data.options["cache"], identity="toy")


@pytest.fixture
def toy_data(tiny_config, tmp_path, monkeypatch):
  sources.names()  # the built-in sources registered, then a registry of this test's own
  monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
  sources.register("toy", _toy_source)
  tiny_config.data.name = "toy"
  del tiny_config.data["synthetic"]
  tiny_config.data.toy = {"cache": str(tmp_path)}
  return load_dataset(spec.from_config(tiny_config).data)


def test_a_toy_source_goes_through_the_pipeline(toy_data, monkeypatch):
  assert toy_data.train.num_captions == 120 and toy_data.vocab_size > 5  # vocabulary trained on it
  batches = pipeline.TrainBatches(120, 8, seed=3,
                                  load_rows=pipeline.pair_rows(toy_data, seed=3))
  rows = pipeline.train_batch_indices(120, 8, 5, seed=3)
  batch = batches(5)
  np.testing.assert_array_equal(batch["image"][:, 0, 0, 0], rows // 5)  # caption -> its image
  np.testing.assert_array_equal(batch["image_id"], rows // 5 + 100)
  expected = toy_data.encode([toy_data.train.captions[r] for r in rows], train=True)
  np.testing.assert_array_equal(batch["ids"], expected["ids"])
  # Resuming at any step replays the same batches; grain's threads keep the order.
  replay = list(batches.iterate(4, 7))
  for step, got in zip(range(4, 7), replay):
    np.testing.assert_array_equal(got["ids"], batches(step)["ids"])
  assert toy_data.train.images.reads == 8 * 7  # 7 batches read by row, never the whole split

  # Two processes read disjoint halves that make up the one-process batch.
  halves = []
  for process in (0, 1):
    monkeypatch.setattr(pipeline.sharding.jax, "process_count", lambda: 2)
    monkeypatch.setattr(pipeline.sharding.jax, "process_index", lambda p=process: p)
    halves.append(pipeline.TrainBatches(120, 8, seed=3,
                                        load_rows=pipeline.pair_rows(toy_data, seed=3))(5))
  for key in batch:
    np.testing.assert_array_equal(np.concatenate([h[key] for h in halves]), batch[key])


def test_a_source_without_attributes_cannot_pretrain_teachers(toy_data, tiny_config, tmp_path):
  from rebalance_jax.infra import sharding
  from rebalance_jax.recipe.teachers import obtain
  exp = spec.from_config(tiny_config)
  with pytest.raises(InputError, match=r"config\.teachers\.image\.init is empty and "
                                       r"config\.data\.name='toy' has no scene attributes"):
    obtain.obtain_teachers(exp, toy_data, sharding.make_mesh(), str(tmp_path))


def test_unknown_sources_are_named(tiny_config):
  tiny_config.data.name = "flickr8k"
  with pytest.raises(InputError, match=r"config\.data\.name='flickr8k' is not one of "
                                       r"\('coco', 'flickr30k', 'synthetic', 'vizwiz'\)"):
    load_dataset(spec.from_config(tiny_config).data)


@pytest.mark.slow
def test_a_source_without_attributes_trains_a_stage_without_teachers(toy_data, tiny_config,
                                                                     tmp_path):
  """The path a real dataset takes before it has teachers: no scene attributes, no distillation
  stage, and nothing of the teachers is needed."""
  from rebalance_jax.recipe import phases
  del tiny_config.stages["stage2"]
  results = phases.run(spec.from_config(tiny_config), str(tmp_path / "run"))
  assert set(results) == {"stage1"} and 0 <= results["stage1"]["rsum"] <= 600
  assert results["stage1"]["t2t_ndcg@10"] > 0
  assert not (tmp_path / "run" / "teachers").exists()


class _JpegRows:
  """Encoded images by row, as a prepared dataset's record source reads them."""

  def __init__(self, images: list[bytes]):
    self._images = images

  def __len__(self):
    return len(self._images)

  def __getitems__(self, rows):
    return [{"image": self._images[r]} for r in rows]


def _jpeg(colour, size=(40, 30)) -> bytes:
  out = io.BytesIO()
  Image.fromarray(np.full(size[::-1] + (3,), colour, np.uint8)).save(out, "JPEG")
  return out.getvalue()


def _jpegs(split: int, n: int = 12) -> list[bytes]:
  return [_jpeg((20 * i, 255 - 20 * i, 7 * split)) for i in range(n)]


def _encoded_source(data):
  """Three splits of 12 JPEGs (five captions each) whose records decode at any size and make the
  reference training view."""
  splits = {}
  for offset, name in enumerate(sources.SPLITS):
    images = _jpegs(offset)
    n = len(images)
    records = prepared.ImageFileRecords(_JpegRows(images), [f"{name}/{i}.jpg" for i in range(n)],
                                        data.image_size, data.crop_scale, data.randaugment)
    captions = tuple(f"{_WORDS[i % 6]} {_WORDS[(i + c) % 6]} shape" for i in range(n)
                     for c in range(5))
    splits[name] = sources.Split(records, captions, np.repeat(np.arange(n, dtype=np.int32), 5),
                                 np.arange(n, dtype=np.int32))
  return sources.Source(splits, sources.options(data)["cache"], identity="encoded-toy")


def test_a_registered_source_of_encoded_images_gets_the_reference_augmentation(
    tiny_config, tmp_path, monkeypatch):
  sources.names()
  monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
  sources.register("toy_jpegs", _encoded_source, options={"cache": str(tmp_path)},
                   encoded_images=True)
  sources.register("toy_arrays", _toy_source)
  c = tiny_config
  c.data.name, c.data.augment, c.data.augment_shift = "toy_jpegs", "reference", 0
  del c.data["synthetic"]
  data = load_dataset(spec.from_config(c).data)
  assert data.train.images.at_size(16)[0].shape == (16, 16, 3)  # a teacher's own size
  rows = np.array([0, 7, 33])
  batch = pipeline.pair_rows(data, seed=5)(rows, 4)
  for image, row in zip(batch["image"], rows):
    decoded = transforms.decode(_jpegs(0)[row // 5])
    expected = transforms.train_view(decoded, np.random.default_rng((5, 4, int(row))),
                                     c.data.image_size, tuple(c.data.crop_scale),
                                     tuple(c.data.randaugment))
    np.testing.assert_array_equal(image, expected)
  c.data.name = "toy_arrays"  # a source without encoded images cannot make that view
  c.data.toy_arrays = {"cache": str(tmp_path)}
  with pytest.raises(InputError, match=r"config\.data\.augment='reference' needs a source of "
                                       r"encoded images .*config\.data\.name='toy_arrays'"):
    spec.from_config(c)
