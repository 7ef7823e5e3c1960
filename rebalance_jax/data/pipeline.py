"""The input pipeline: sampling, reading records, tokenizing and batching, with grain.

Training order is a pure function of the step: the global batch at step s is a slice of a seeded
permutation of epoch s // steps_per_epoch (`train_batch_indices`), and each process reads only its
own contiguous rows of it. A resumed run therefore sees exactly the batches the uninterrupted run
would have, and 1 process sees the same global batches as 2, with no iterator state to save.
grain runs the per-step batch assembly in reader threads with prefetch.

Evaluation reads a split in global batches padded to the batch size (`padded_batches`); the
padding rows repeat the last row and are marked invalid.
"""

from collections.abc import Callable, Iterator, Sequence

import grain
import jax
import numpy as np

from rebalance_jax.data import sources
from rebalance_jax.data.dataset import Dataset
from rebalance_jax.data.sources import Split
from rebalance_jax.infra import sharding

# Batches assembled ahead of the train step, and the threads assembling them.
PREFETCH_BATCHES = 4
READ_THREADS = 2


def train_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Example indices of the global batch at `step`: a fresh seeded permutation per epoch, the
  last partial batch dropped."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size:(position + 1) * batch_size]


def text_lengths(data: Dataset, batch_rows: Callable[[int], np.ndarray],
                 buckets: Sequence[int]) -> Callable[[int], int]:
  """step -> the length the captions of the step's global batch (`batch_rows(step)`) are padded
  to: the smallest of `buckets` (lengths below max_tokens) that holds the batch's longest
  caption, else max_tokens. Every process reads the whole global batch's captions, so all pad to
  the same length (and run the same compiled step)."""
  lengths = [*buckets, data.max_tokens]

  def length(step: int) -> int:
    if not buckets:
      return data.max_tokens
    captions = [data.train.captions[c] for c in batch_rows(step)]
    longest = int(data.encode(captions, train=True)["mask"].sum(axis=1).max())
    return next(n for n in lengths if n >= longest)
  return length


def pair_rows(data: Dataset, seed: int, extra: Callable | None = None,
              text_length: Callable[[int], int] | None = None) -> Callable:
  """(rows, step) -> host batch of those training pairs (rows: caption indices): image (uint8),
  ids, mask, image_id, and `extra(image rows, caption rows, captions)` (e.g. teacher features)
  if given. With data.augment='reference' the image is the augmented view drawn from
  (seed, step, row), so a row's view at a step never depends on the process reading it. Captions
  are padded to `text_length(step)` tokens (`text_lengths`), else to max_tokens."""
  split = data.train

  def load(rows, step):
    image_rows = split.caption_image[rows]
    if data.augment == "reference":
      images = split.images.train_views(image_rows, [(seed, step, int(r)) for r in rows])
    else:
      images = np.asarray(split.images[image_rows])
    captions = [split.captions[c] for c in rows]
    tokens = data.encode(captions, train=True)
    if text_length is not None:
      length = text_length(step)  # reads the whole global batch's captions: once per batch
      tokens = {k: v[:, :length] for k, v in tokens.items()}
    batch = {"image": images, **tokens, "image_id": split.image_ids[image_rows]}
    if extra is not None:
      batch.update(extra(image_rows, rows, captions))
    return batch
  return load


def image_rows(split: Split, with_attributes: bool = False, size: int | None = None,
               view: str = "resize") -> Callable[..., dict]:
  """rows (image indices) -> host batch of those images (viewed at `size` if given, resized or
  centre-cropped: see `sources.at_size`), and their scene attributes."""
  images = split.images if size is None else sources.at_size(split.images, size, view)

  def load(rows, step=None):
    del step  # the evaluation view
    batch = {"image": np.asarray(images[rows])}
    if with_attributes:
      batch["attributes"] = split.attributes[rows].astype(np.float32)
    return batch
  return load


def caption_rows(split: Split, encode: Callable[[list[str]], dict]) -> Callable[..., dict]:
  """rows (caption indices) -> host batch of those captions' tokens (`encode(captions)`)."""
  return lambda rows, step=None: encode([split.captions[c] for c in rows])


class TrainBatches:
  """This process's rows of each step's global batch of `num_examples` examples;
  `load_rows(rows, step)` reads them. Which rows are this process's is fixed when it is made (in
  the process itself: grain's worker processes are not part of the JAX job)."""

  def __init__(self, num_examples: int, batch_size: int, seed: int,
               load_rows: Callable[[np.ndarray, int], dict], num_workers: int = 0):
    self.num_examples, self.batch_size, self.seed = num_examples, batch_size, seed
    self.num_workers = num_workers
    self._load_rows = load_rows
    self._process_rows = sharding.process_slice(batch_size)

  def local_rows(self, step: int) -> np.ndarray:
    indices = train_batch_indices(self.num_examples, self.batch_size, step, self.seed)
    return indices[self._process_rows]

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    return self._load_rows(self.local_rows(step), step)

  def iterate(self, start: int, end: int) -> grain.DatasetIterator:
    """The batches of steps start..end-1, in order, assembled ahead by grain: in reader threads,
    or in `num_workers` worker processes (`close()` the iterator to stop them)."""
    batches = _read_ahead(grain.MapDataset.range(start, end).map(self))
    if self.num_workers:
      batches = batches.mp_prefetch(grain.MultiprocessingOptions(
          num_workers=self.num_workers,
          per_worker_buffer_size=max(PREFETCH_BATCHES // self.num_workers, 1)))
    return iter(batches)


def _read_ahead(dataset: grain.MapDataset) -> grain.IterDataset:
  return dataset.to_iter_dataset(grain.ReadOptions(num_threads=READ_THREADS,
                                                   prefetch_buffer_size=PREFETCH_BATCHES))


def read_ahead(items: Sequence, load: Callable) -> grain.DatasetIterator:
  """load(item) of each item, in order, computed ahead by grain's reader threads (`close()` the
  iterator to stop them)."""
  return iter(_read_ahead(grain.MapDataset.source(list(items)).map(load)))


def padded_batches(num_rows: int, batch_size: int, start: int = 0
                   ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
  """(first global row, this process's row indices, their validity) of each global batch covering
  rows start..num_rows-1; the last batch is padded with copies of the last row (invalid), so
  every process runs the same number of steps. Rows that fit in less than one batch make one
  batch padded only to a multiple of the device count (what the batch sharding needs): 5 test
  images cost 8 forward passes on 8 devices, not `batch_size`."""
  if num_rows - start < batch_size:
    devices = jax.device_count()
    batch_size = max(devices, -(-(num_rows - start) // devices) * devices)
  for first in range(start, num_rows, batch_size):
    local = np.arange(first, first + batch_size)[sharding.process_slice(batch_size)]
    yield first, np.minimum(local, num_rows - 1), local < num_rows
