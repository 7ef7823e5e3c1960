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
from jax.sharding import Mesh

from rebalance_jax import checkpointing, experiment, reporting, sharding, trainer
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import PairSplit
from rebalance_jax.errors import InputError
from rebalance_jax.models.teachers import ImageTeacher, TextTeacher
from rebalance_jax.models.towers import TextConfig, VitConfig

FEATURE_FILES = {"image": "image.npy", "text": "text.npy"}


def teacher_models(config: ml_collections.ConfigDict, vocab_size: int, num_attributes: int):
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
                      mesh: Mesh, directory: str, param_rules: sharding.ParamRules) -> dict:
  """Trains (or resumes, or loads when finished) both teachers; returns their parameters."""
  if train.attributes is None:
    raise InputError(f"dataset {config.data.name!r} has no scene attributes to pre-train teachers "
                     "on; real datasets use converted pre-trained teacher weights")
  t = config.teachers
  attributes = train.attributes.astype(np.float32)
  examples = {
      "image": (len(train.images),
                lambda idx: {"image": train.images[idx], "attributes": attributes[idx]}),
      "text": (train.num_pairs,
               lambda idx: {"ids": train.ids[idx], "mask": train.mask[idx],
                            "attributes": attributes[train.image_index[idx]]}),
  }
  fingerprint = experiment.fingerprint(config)
  params = {}
  for modality, model in models.items():
    num_examples, rows = examples[modality]
    init_input = rows(np.arange(2))
    init_input.pop("attributes")
    if modality == "image":
      init_input["image"] = augment.to_float(init_input["image"])
    init = model.init(jax.random.key(config.seed), **init_input)["params"]
    schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.num_steps // 10, 1), t.num_steps)
    name = f"teacher_{modality}"
    stage = trainer.Stage(
        name=name, loss_fn=functools.partial(_attribute_loss, model, modality),
        tx=optax.adamw(schedule, weight_decay=1e-4), schedule=schedule, total_steps=t.num_steps,
        batch_size=t.batch_size,
        make_batch=rows,
        checkpointer=checkpointing.Checkpointer(
            os.path.join(directory, modality),
            {k: fingerprint[k] for k in ("seed", "data", "tokenizer", "teachers")}, keep=1),
        writer=reporting.MetricWriter(os.path.join(directory, modality, "logs")),
        checkpoint_every=t.num_steps, log_every=max(t.num_steps // 5, 1), seed=config.seed,
        param_rules=param_rules)
    state = trainer.run_stage(stage, init, None, mesh, num_examples)
    params[modality] = state["params"]
    stage.writer.close()
    stage.checkpointer.close()
  return params


def feature_fns(models: dict, params: dict):
  """Jitted frozen-teacher feature functions: image(image uint8), text(ids, mask)."""
  image_fn = lambda image: models["image"].apply(
      {"params": params["image"]}, augment.to_float(image), method=ImageTeacher.features)
  text_fn = lambda ids, mask: models["text"].apply(
      {"params": params["text"]}, ids, mask, method=TextTeacher.features)
  return jax.jit(image_fn), jax.jit(text_fn)


def teacher_features(models: dict, params: dict, train: PairSplit, batch_size: int, mesh: Mesh,
                     directory: str) -> dict[str, np.ndarray]:
  """One row per training pair of each teacher's features, read from `directory` if present,
  else computed (sharded over devices and processes) and written there by process 0."""
  if all(os.path.exists(os.path.join(directory, f)) for f in FEATURE_FILES.values()):
    return load_teacher_features(directory, train.num_pairs)
  image_fn, text_fn = feature_fns(models, params)
  per_image = sharding.map_in_batches(image_fn, len(train.images),
                                      lambda i: {"image": train.images[i]}, batch_size, mesh)
  features = {
      "image": per_image[train.image_index],  # every caption of an image shares its features
      "text": sharding.map_in_batches(text_fn, train.num_pairs,
                                      lambda i: {"ids": train.ids[i], "mask": train.mask[i]},
                                      batch_size, mesh),
  }
  if reporting.is_main_process():
    os.makedirs(directory, exist_ok=True)
    for modality, array in features.items():
      path = os.path.join(directory, FEATURE_FILES[modality])
      tmp = f"{path}.tmp.npy"
      np.save(tmp, array.astype(np.float32))
      os.replace(tmp, path)
    with open(os.path.join(directory, "manifest.json"), "w") as f:
      json.dump({"num_pairs": train.num_pairs,
                 "dims": {m: int(a.shape[1]) for m, a in features.items()}}, f)
  return features


def load_teacher_features(directory: str, num_pairs: int) -> dict[str, np.ndarray]:
  """Reads the feature files, checking they hold one row per training pair."""
  features = {}
  for modality, name in FEATURE_FILES.items():
    path = os.path.join(directory, name)
    try:
      array = np.load(path, mmap_mode="r")
    except (OSError, ValueError) as e:
      raise InputError(f"teacher feature file {path} is unreadable ({e}); delete it to recompute")
    if array.ndim != 2 or array.shape[0] != num_pairs:
      raise InputError(f"teacher feature file {path} has shape {array.shape}, expected "
                       f"({num_pairs}, D): one row per training pair; delete it to recompute")
    features[modality] = np.asarray(array)
  return features
