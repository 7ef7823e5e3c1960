"""Frozen teachers: each a model, its parameters, its own preprocessing and tokenizer, feature
dimension and a fingerprint of its weights, obtained from the config.

A teacher with `init` weights (converted weights: `models/weights.py`) loads them onto the devices; one
without is pre-trained on the dataset's scene attributes (the synthetic data has them), with the
same resumable loop as the student. Teachers are never trained after that: their parameters are a
separate, non-differentiated input of the student's train step.
"""

import dataclasses
import functools
import hashlib
import os
from collections.abc import Callable
from typing import Any

import jax
import numpy as np
import optax
from jax.experimental import multihost_utils

from rebalance_jax.config.spec import Experiment, TeacherSpec, with_vocab_size
from rebalance_jax.data import pipeline, text
from rebalance_jax.data.dataset import Dataset
from rebalance_jax.infra import logs
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.recipe import workdirs
from rebalance_jax.recipe.teachers.network import Teacher
from rebalance_jax.training import loop


@dataclasses.dataclass(frozen=True, eq=False)
class FrozenTeacher:
  modality: str
  tower: towers.TowerSpec
  model: Teacher
  params: Any
  weights_sha256: str
  preprocessing: dict  # what turns a record into its input (recorded with its features)
  # A text teacher: (captions, train) -> {"ids", "mask"} of its tokenizer, cleaned to the
  # training or evaluation word limit.
  encode: Callable | None = None

  @property
  def dim(self) -> int:
    return towers.output_dim(self.tower)

  def features(self, params, *inputs):
    """g^v of uint8 images (preprocessed as this teacher's tower says), or g^t of (ids, mask)."""
    if self.modality == "image":
      inputs = (towers.preprocess_images(self.tower.config, *inputs),)
    return self.model.apply({"params": params}, *inputs, method=Teacher.features)


def weights_sha256(params) -> str:
  """SHA-256 of every leaf's name and bytes (a collective for leaves sharded over processes)."""
  digest = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if isinstance(leaf, jax.Array) and not leaf.is_fully_addressable:
      leaf = multihost_utils.process_allgather(leaf, tiled=True)
    digest.update(jax.tree_util.keystr(path).encode())
    digest.update(np.ascontiguousarray(np.asarray(leaf)).tobytes())
  return digest.hexdigest()


def obtain_teachers(exp: Experiment, data: Dataset, mesh, workdir: str) -> dict[str, FrozenTeacher]:
  """Both teachers of `exp`: loaded from their `init` weights, or pre-trained (or resumed, or
  read when finished) in `workdir`/teachers."""
  t = exp.teachers
  vocab_size = data.vocab_size
  if t.vocab_file:
    if not os.path.isfile(os.path.expanduser(t.vocab_file)):
      raise InputError(f"config.teachers.vocab_file={t.vocab_file!r} does not exist")
    tokenizer = text.load_tokenizer(t.vocab_file)
    vocab = text.check_vocab(t.vocab_file)
    vocab_size = vocab["size"]
    max_tokens = t.text.tower.config.max_tokens
    encode = lambda captions, train: dict(zip(("ids", "mask"), text.tokenize(
        tokenizer, captions, max_tokens, data.max_words_train if train else data.max_words_eval,
        data.append_sep)))
  else:
    encode, max_tokens, vocab = data.encode, data.max_tokens, data.vocab
  preprocessing = {
      "text": {"vocab_sha256": vocab["sha256"], "max_tokens": max_tokens,
               "max_words": data.max_words_train, "append_sep": data.append_sep},
      "image": {"view": t.image_view, "resize": "bicubic", **{
          k: getattr(t.image.tower.config, k) for k in ("image_size", "mean", "std")}}}
  text_tower = with_vocab_size(t.text.tower, vocab_size)
  teachers = {}
  for spec, tower in ((t.image, t.image.tower), (t.text, text_tower)):
    if tower.init:
      model = Teacher(tower)
      like = jax.eval_shape(functools.partial(towers.init_params, tower), jax.random.key(0))
      loaded = {"encoder": towers.load_init(tower, like, spec.field)}
      params = jax.device_put(loaded, exp.param_rules.param_shardings(loaded, mesh))
    else:
      model, params = _pretrained(exp, spec, tower, data, encode, mesh, workdir)
    teachers[spec.modality] = FrozenTeacher(spec.modality, tower, model, params,
                                            weights_sha256(params),
                                            preprocessing[spec.modality],
                                            encode if spec.modality == "text" else None)
  return teachers


def _pretrained(exp: Experiment, spec: TeacherSpec, tower, data: Dataset, encode, mesh,
                workdir: str):
  """(model, params) of a teacher pre-trained to predict the scene attributes."""
  train = data.train
  if train.attributes is None:
    raise InputError(f"{spec.field}.init is empty and config.data.name={exp.data.name!r} has no "
                     "scene attributes to pre-train a teacher on: point it at converted weights")
  t = exp.teachers
  model = Teacher(tower, train.attributes.shape[1])
  if spec.modality == "image":
    num_examples, rows = train.num_images, pipeline.image_rows(train, with_attributes=True)
  else:
    num_examples = train.num_captions
    captions = pipeline.caption_rows(train, functools.partial(encode, train=True))
    rows = lambda r, step: {**captions(r), "attributes":
                      train.attributes[train.caption_image[r]].astype(np.float32)}
  name = f"teacher_{spec.modality}"
  seed = loop.stage_seed(exp.seed, name)
  init = jax.jit(model.init)(jax.random.key(seed), *towers.dummy_inputs(tower))["params"]
  schedule = optax.warmup_cosine_decay_schedule(0.0, t.lr, max(t.num_steps // 10, 1), t.num_steps)
  checkpointer = workdirs.checkpointer(exp, workdir, name, data.content, keep=1)
  stage = loop.Stage(
      name=name, loss_fn=functools.partial(_attribute_loss, model, tower), tx=optax.adamw(
          schedule, weight_decay=1e-4), schedule=schedule, total_steps=t.num_steps,
      batch_size=t.batch_size, batch_size_field="config.teachers.batch_size",
      batches=pipeline.TrainBatches(num_examples, t.batch_size, seed, rows),
      checkpointer=checkpointer,
      writer=logs.MetricWriter(os.path.join(checkpointer.directory, "logs")),
      checkpoint_every=t.num_steps, log_every=max(t.num_steps // 5, 1), seed=seed,
      param_rules=exp.param_rules)
  try:
    return model, loop.run_stage(stage, init, None, mesh)["params"]
  finally:
    stage.writer.close()
    stage.checkpointer.close()


def _attribute_loss(model: Teacher, tower, params, batch, frozen, rng):
  del frozen, rng
  if tower.modality == "image":
    inputs = (towers.preprocess_images(tower.config, batch["image"]),)
  else:
    inputs = (batch["ids"], batch["mask"])
  loss = optax.sigmoid_binary_cross_entropy(model.apply({"params": params}, *inputs),
                                            batch["attributes"]).mean()
  return loss, {"loss/attributes": loss}
