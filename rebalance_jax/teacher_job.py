"""Teachers: pre-training the modal-independent towers and writing their features (METHOD.md §3).

`pretrain_teachers` trains the image-only teacher on images and the text-only teacher on captions,
each to predict the scene attributes (the embedded dataset's analogue of ImageNet / language
pre-training), with the same resumable loop as the student. `teacher_features` runs the frozen
towers once over every training pair and stores one feature row per pair, as the reference's
`train_*_embed_regu.npy`.
"""

import functools
import json
import os

import jax
import ml_collections
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rebalance_jax import experiment, files, reporting, sharding, trainer
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import PairSplit
from rebalance_jax.errors import InputError
from rebalance_jax.models.teachers import ImageTeacher, TextTeacher
from rebalance_jax.models.towers import TextConfig, VitConfig

FEATURE_FILES = {"image": "image.npy", "text": "text.npy"}
MANIFEST = "manifest.json"


def teacher_models(config: ml_collections.ConfigDict, vocab_size: int, train: PairSplit):
  """The two teacher towers, with heads over the dataset's scene attributes."""
  if train.attributes is None:
    raise InputError(f"dataset {config.data.name!r} has no scene attributes to pre-train teachers "
                     "on; real datasets use converted pre-trained teacher weights")
  num_attributes = train.attributes.shape[1]
  t = config.teachers
  return {"image": ImageTeacher(VitConfig(**t.image), num_attributes),
          "text": TextTeacher(TextConfig(vocab_size=vocab_size, **t.text), num_attributes)}


def _attribute_loss(model, modality: str, params, batch, frozen, rng):
  del frozen, rng
  if modality == "image":
    logits = model.apply({"params": params}, augment.to_float(batch["image"]))
  else:
    logits = model.apply({"params": params}, batch["ids"], batch["mask"])
  loss = optax.sigmoid_binary_cross_entropy(logits, batch["attributes"]).mean()
  return loss, {"loss/attributes": loss}


def pretrain_teachers(config: ml_collections.ConfigDict, models: dict, train: PairSplit,
                      mesh: Mesh, workdir: str, vocab: dict) -> dict:
  """Trains (or resumes, or loads when finished) both teachers in `workdir`; returns their
  parameters."""
  t = config.teachers
  attributes = train.attributes.astype(np.float32)
  examples = {
      "image": (len(train.images),
                lambda idx: {"image": train.images[idx], "attributes": attributes[idx]}),
      "text": (train.num_pairs,
               lambda idx: {"ids": train.ids[idx], "mask": train.mask[idx],
                            "attributes": attributes[train.image_index[idx]]}),
  }
  params = {}
  for modality, model in models.items():
    num_examples, rows = examples[modality]
    init_input = rows(np.arange(2))
    init_input.pop("attributes")
    if modality == "image":
      init_input["image"] = augment.to_float(init_input["image"])
    seed = trainer.stage_seed(config.seed, f"teacher_{modality}")
    init = model.init(jax.random.key(seed), **init_input)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.num_steps // 10, 1), t.num_steps)
    name = f"teacher_{modality}"
    checkpointer = experiment.checkpointer(config, workdir, name, vocab, keep=1)
    stage = trainer.Stage(
        name=name, loss_fn=functools.partial(_attribute_loss, model, modality),
        tx=optax.adamw(schedule, weight_decay=1e-4), schedule=schedule, total_steps=t.num_steps,
        batch_size=t.batch_size, batch_size_field="config.teachers.batch_size", make_batch=rows,
        checkpointer=checkpointer,
        writer=reporting.MetricWriter(os.path.join(checkpointer.directory, "logs")),
        checkpoint_every=t.num_steps, log_every=max(t.num_steps // 5, 1), seed=seed,
        param_rules=experiment.param_rules(config))
    try:
      params[modality] = trainer.run_stage(stage, init, None, mesh, num_examples)["params"]
    finally:
      stage.writer.close()
      stage.checkpointer.close()
  return params


def image_features(models: dict, params: dict, images):
  """g^v of float images (B, H, W, 3) in [0, 1]."""
  return models["image"].apply({"params": params["image"]}, images, method=ImageTeacher.features)


def text_features(models: dict, params: dict, ids, mask):
  """g^t of token ids (B, L)."""
  return models["text"].apply({"params": params["text"]}, ids, mask, method=TextTeacher.features)


def teacher_features(config: ml_collections.ConfigDict, models: dict, params: dict,
                     train: PairSplit, mesh: Mesh, directory: str,
                     vocab: dict) -> dict[str, np.ndarray]:
  """One row per training pair of each teacher's features: read from `directory` if they are
  there, intact and written by these teachers for these pairs, else computed sharded over devices
  and processes and written there by process 0 (each file with its content hash, the manifest
  last)."""
  manifest = {"teachers": experiment.fingerprint(config, "teachers", vocab),
              "num_pairs": train.num_pairs,
              "dims": {"image": config.teachers.image.width, "text": config.teachers.text.width}}
  problem = _feature_problem(directory, manifest) if reporting.is_main_process() else None
  # Process 0 decides, so that every process takes the same path through the collectives.
  if bool(multihost_utils.broadcast_one_to_all(np.array(problem is None))):
    return {modality: np.load(os.path.join(directory, name))
            for modality, name in FEATURE_FILES.items()}
  if problem != "absent":
    logging.warning("teacher features in %s: %s; computing them again", directory, problem)
  image_fn = jax.jit(lambda image: image_features(models, params, augment.to_float(image)))
  text_fn = jax.jit(functools.partial(text_features, models, params))
  batch_size = config.eval.batch_size
  per_image = sharding.map_in_batches(image_fn, len(train.images),
                                      lambda i: {"image": train.images[i]}, batch_size, mesh)
  features = {
      "image": per_image[train.image_index],  # every caption of an image shares its features
      "text": sharding.map_in_batches(text_fn, train.num_pairs,
                                      lambda i: {"ids": train.ids[i], "mask": train.mask[i]},
                                      batch_size, mesh),
  }
  if reporting.is_main_process():
    for modality, array in features.items():
      files.write_checked(os.path.join(directory, FEATURE_FILES[modality]),
                          lambda f, a=array: np.save(f, a.astype(np.float32)))
    files.atomic_write_text(os.path.join(directory, MANIFEST),
                            json.dumps(manifest))  # last: marks the files complete
  return features


def _feature_problem(directory: str, manifest: dict) -> str | None:
  """Why the feature files in `directory` cannot be used for `manifest` ("absent" when there are
  none), or None when they can."""
  manifest_path = os.path.join(directory, MANIFEST)
  if not os.path.exists(manifest_path):
    return "absent"
  try:
    with open(manifest_path) as f:
      saved = json.load(f)
  except (OSError, ValueError) as e:
    return f"{manifest_path} is unreadable ({e})"
  if saved != json.loads(json.dumps(manifest)):
    return f"{manifest_path} names other teachers or training pairs"
  for modality, name in FEATURE_FILES.items():
    path = os.path.join(directory, name)
    if not files.is_intact(path):
      return f"{path} is missing or fails its content check"
    shape = np.load(path, mmap_mode="r").shape
    if shape != (manifest["num_pairs"], manifest["dims"][modality]):
      return f"{path} has shape {shape}, not one row per training pair"
  return None
