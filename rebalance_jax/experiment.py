"""From a config to the experiment's objects: validation, checkpoint fingerprint, student model,
and a stage's parameters from its checkpoint. Shared by `train` and `evaluate`."""

import contextlib
import math
import os

import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax import checkpointing, files, objective, reporting, sharding, trainer
from rebalance_jax.errors import InputError
from rebalance_jax.evaluators import ranking, retrieval
from rebalance_jax.models.student import Student, StudentConfig
from rebalance_jax.models.towers import TextConfig, VitConfig

STAGES = ("stage1", "stage2")
_CHOICES = {
    "loss.lambda_mode": ("raw", "sigmoid"),
    "loss.tau2_mode": ("learned", "clamped", "fixed"),
    "loss.distance": ("mae", "mse"),
    "loss.itm_negatives": ("device", "global"),
    "teachers.mode": ("precomputed", "online"),
    "model.dual_relation": ("image", "text", "both"),
    "eval.single_modal_self": ranking.SELF_RULES,
    "eval.select_on": ("val", "test", "last"),
}
# The config fields each phase's outputs depend on (a later phase on the earlier ones too). A
# checkpoint written under other values of these fields is refused.
_DATA = ("seed", "data", "tokenizer")
# Model selection decides which checkpoints a stage keeps and what their saved metrics mean.
_SELECTION = ("eval.select_on", "eval.select_metric", "eval.every_steps")
FINGERPRINT_FIELDS = {
    "teachers": _DATA + ("teachers",),
    "stage1": _DATA + ("model", "optim", "loss.itm_negatives", "stage1") + _SELECTION,
    "stage2": _DATA + ("model", "optim", "loss", "stage1", "stage2", "teachers") + _SELECTION,
}
# Where the data lies does not change what it is.
_LOCATION_FIELDS = ("data.cache_dir", "data.image_root")


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Raises InputError naming the field for values that would fail later or silently mislead."""
  for field, choices in _CHOICES.items():
    section, key = field.split(".")
    if config[section][key] not in choices:
      raise InputError(f"config.{field}={config[section][key]!r} is not one of {choices}")
  for tower in ("model.image", "teachers.image"):
    section, key = tower.split(".")
    if config[section][key].image_size != config.data.image_size:
      raise InputError(f"config.{tower}.image_size={config[section][key].image_size} differs from "
                       f"config.data.image_size={config.data.image_size}")
  for tower in ("model.text", "teachers.text"):
    section, key = tower.split(".")
    if config[section][key].max_tokens < config.data.max_tokens:
      raise InputError(f"config.{tower}.max_tokens={config[section][key].max_tokens} is below "
                       f"config.data.max_tokens={config.data.max_tokens}")
  for stage in STAGES:
    objective.validate_weights(config[stage].loss_weights, config.model.dual_encoder,
                               f"config.{stage}.loss_weights")
    if config[stage].num_steps <= 0 and config[stage].num_epochs <= 0:
      raise InputError(f"config.{stage}: set num_steps or num_epochs to a positive value")
  teacher_terms = set(config.stage1.loss_weights) & set(objective.TEACHER_TERMS)
  if teacher_terms:
    raise InputError(f"config.stage1.loss_weights: {sorted(teacher_terms)} need the teachers, "
                     "which only stage 2 uses")
  for field in ("checkpoint.every_steps", "checkpoint.keep", "log_every", "eval.batch_size",
                "teachers.num_steps", "teachers.batch_size"):
    if _get(config, field) <= 0:
      raise InputError(f"config.{field}={_get(config, field)} must be positive")
  for field in ("optim.lr", "teachers.lr", "optim.eps", "model.temp_init", "model.temp2_init",
                "loss.tau2_fixed"):
    value = _get(config, field)
    if not (math.isfinite(value) and value > 0):
      raise InputError(f"config.{field}={value} must be a positive finite number")
  for field, low, high in (("optim.b1", 0, 1), ("optim.b2", 0, 1), ("optim.warmup_fraction", 0, 1)):
    if not low <= _get(config, field) < high:
      raise InputError(f"config.{field}={_get(config, field)} must lie in [{low}, {high})")
  if not (math.isfinite(config.optim.weight_decay) and config.optim.weight_decay >= 0):
    raise InputError(f"config.optim.weight_decay={config.optim.weight_decay} must be >= 0")
  if config.eval.select_metric not in retrieval.metric_names():
    raise InputError(f"config.eval.select_metric={config.eval.select_metric!r} is not a metric; "
                     f"known: {sorted(retrieval.metric_names())}")
  if 0 < config.eval.itm_k < max(ranking.RECALL_KS):  # past k, positives tie at the fill: hits
    raise InputError(f"config.eval.itm_k={config.eval.itm_k} must be 0 (no re-ranking) or at least "
                     f"{max(ranking.RECALL_KS)}, the largest recall K")
  if config.eval.every_steps < 0:
    raise InputError(f"config.eval.every_steps={config.eval.every_steps} must be >= 0 (0: once "
                     "per epoch)")
  if not 0 <= config.data.augment_shift < config.data.image_size:
    raise InputError(f"config.data.augment_shift={config.data.augment_shift} must lie in "
                     f"[0, config.data.image_size={config.data.image_size})")
  low, high = config.loss.tau2_range
  if not 0 < low <= high:
    raise InputError(f"config.loss.tau2_range={tuple(config.loss.tau2_range)} must be (low, high) "
                     "with 0 < low <= high")
  if config.loss.lambda_mode == "sigmoid" and not 0 < config.model.lam_init < 1:
    raise InputError(f"config.model.lam_init={config.model.lam_init} must lie in (0, 1) with "
                     "config.loss.lambda_mode='sigmoid'")


def _get(config: ml_collections.ConfigDict, field: str):
  node = config
  for key in field.split("."):
    node = node[key]
  return node


def fingerprint(config: ml_collections.ConfigDict, phase: str, vocab: dict) -> dict:
  """What `phase` ("teachers", "stage1", "stage2") depends on: its config fields by dotted name,
  and the vocabulary's real size and content hash (`vocab`, see RetrievalData.vocab)."""
  values = {}
  for field in FINGERPRINT_FIELDS[phase]:
    node = _get(config, field)
    values[field] = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node
  for field in _LOCATION_FIELDS:
    values["data"].pop(field.split(".")[1], None)
  values["vocab"] = vocab
  return values


def student_model(config: ml_collections.ConfigDict, vocab_size: int) -> Student:
  m = config.model
  return Student(StudentConfig(
      image=VitConfig(**m.image), text=TextConfig(vocab_size=vocab_size, **m.text),
      fusion_depth=m.fusion_depth, embed_dim=m.embed_dim, dual_encoder=m.dual_encoder,
      image_teacher_dim=config.teachers.image.width, text_teacher_dim=config.teachers.text.width,
      temp_init=m.temp_init, temp2_init=m.temp2_init, lam_init=m.lam_init,
      lambda_mode=config.loss.lambda_mode))



def make_mesh(config: ml_collections.ConfigDict):
  return sharding.make_mesh(fsdp=config.mesh.fsdp)


def param_rules(config: ml_collections.ConfigDict) -> sharding.ParamRules:
  return sharding.ParamRules(tuple(tuple(r) for r in config.sharding.rules),
                             config.sharding.fsdp_min_size)


def check_workdir(workdir: str, must_exist: bool = False) -> str:
  """The absolute workdir; raises InputError for an empty flag, a file, or (with `must_exist`) a
  missing directory."""
  if not workdir:
    raise InputError("--workdir is empty: pass the run's directory")
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise InputError(f"--workdir={workdir} is a file, not a directory")
  if must_exist and not os.path.isdir(path):
    raise InputError(f"--workdir={workdir} does not exist")
  return path


def check_batch_sizes(config: ml_collections.ConfigDict, mesh) -> None:
  """Every batch size splits evenly over the devices and processes."""
  for field in [f"{stage}.batch_size" for stage in STAGES] + ["teachers.batch_size",
                                                             "eval.batch_size"]:
    sharding.check_batch_size(_get(config, field), mesh, f"config.{field}")


def check_data_sizes(config: ml_collections.ConfigDict, num_pairs: int, num_images: int) -> None:
  """No batch is larger than the training set it draws from."""
  for field, size, what in [(f"{stage}.batch_size", num_pairs, "pairs") for stage in STAGES] + [
      ("teachers.batch_size", num_images, "images")]:
    if _get(config, field) > size:
      raise InputError(f"config.{field}={_get(config, field)} exceeds the {size} training {what} "
                       f"of config.data.name={config.data.name!r}")


@contextlib.contextmanager
def workdir_lock(workdir: str, what: str):
  """Holds the workdir's lock (files.WorkdirLock) for a `what` while open. Process 0 takes it and
  every process learns whether it got it, so that a refused job stops everywhere."""
  with contextlib.ExitStack() as stack:
    refusal = ""
    if reporting.is_main_process():
      try:
        lock = stack.enter_context(files.WorkdirLock(workdir, what))
      except (InputError, OSError) as e:  # in use; or e.g. a read-only workdir
        refusal = str(e)
      else:
        if lock.warning:
          logging.warning("%s", lock.warning)
    if bool(multihost_utils.broadcast_one_to_all(np.array(bool(refusal)))):
      raise InputError(refusal or f"{workdir} is in use by another {what} (see process 0)")
    yield


# Each checkpointed phase: (fingerprint phase, directory under the workdir).
CHECKPOINT_DIRS = {
    "teacher_image": ("teachers", os.path.join("teachers", "image")),
    "teacher_text": ("teachers", os.path.join("teachers", "text")),
    **{stage: (stage, os.path.join(stage, "checkpoints")) for stage in STAGES},
}


def checkpointer(config: ml_collections.ConfigDict, workdir: str, phase: str, vocab: dict,
                 keep: int | None = None, read_only: bool = False) -> checkpointing.Checkpointer:
  """The Checkpointer of `phase` (a CHECKPOINT_DIRS key) in `workdir`; a student stage's also
  keeps its best checkpoint by config.eval.select_metric, unless select_on='last'."""
  fingerprint_phase, directory = CHECKPOINT_DIRS[phase]
  selects = phase in STAGES and config.eval.select_on != "last"
  return checkpointing.Checkpointer(
      os.path.join(workdir, directory), fingerprint(config, fingerprint_phase, vocab),
      config.checkpoint.keep if keep is None else keep, read_only=read_only,
      best_metric=config.eval.select_metric if selects else None)


def eval_every_steps(config: ml_collections.ConfigDict, stage: str, num_pairs: int) -> int:
  """How often a stage evaluates for model selection: config.eval.every_steps, or (0) once per
  epoch of its training pairs."""
  return config.eval.every_steps or max(num_pairs // config[stage].batch_size, 1)


def select_checkpoint(config: ml_collections.ConfigDict, reader: checkpointing.Checkpointer,
                      params_like, mesh, step: int | None = None, final_state=None):
  """(step, params, record) of a stage's checkpoint: `step` if given, else the one that
  config.eval.select_on selects (`last`: the newest intact; `val`/`test`: the best
  config.eval.select_metric on that split, or the next best if it is damaged). Only the
  parameters are read, unless they are those of `final_state` (the state the stage just finished
  with). `record` says which checkpoint and how it was chosen."""
  e = config.eval
  target = {"params": trainer.abstract_params(params_like, mesh, param_rules(config))}
  if step is not None:
    if step not in reader.all_steps():
      raise InputError(f"--step={step}: {reader.directory} has no checkpoint of that step (it "
                       f"has {reader.all_steps()})")
    candidates = [step]
  elif e.select_on == "last" and final_state is None:
    newest = reader.restore_newest(target, set_aside=False, partial=True)
    if newest is None:
      raise InputError(f"no checkpoint in {reader.directory}")
    return newest[0], newest[1]["params"], {"checkpoint_step": newest[0], "selected_by": "last"}
  elif e.select_on == "last":
    candidates = [int(final_state["step"])]
  else:
    candidates = reader.ranked_steps()
    if not candidates:
      raise InputError(f"{reader.directory} has no checkpoint evaluated on {e.select_on} (was it "
                       "trained with config.eval.select_on='last'?)")
  damaged = []
  for candidate in candidates:
    if final_state is not None and candidate == int(final_state["step"]):
      params = final_state["params"]
    else:
      try:
        params = reader.restore(candidate, target, partial=True)["params"]
      except checkpointing.DamagedCheckpointError as error:
        if candidate == candidates[-1]:
          raise
        logging.warning("%s; taking the next best checkpoint", error)
        damaged.append(candidate)
        continue
    return candidate, params, {"checkpoint_step": candidate,
                               "selected_by": _selected_by(config, reader, step, candidate, damaged)}


def _selected_by(config, reader, step, chosen, damaged) -> str:
  e = config.eval
  if step is not None:
    return "chosen with --step"
  if e.select_on == "last":
    return "last"
  how = f"best {e.select_on} {e.select_metric} ({reader.metrics(chosen)[e.select_metric]:.2f})"
  if damaged:
    how += f", after the damaged step {', '.join(map(str, damaged))}"
  return how + (", optimistic: selected on the test split" if e.select_on == "test" else "")


def check_checkpoint_configs(config: ml_collections.ConfigDict, workdir: str, vocab: dict) -> None:
  """Refuses, before any work, a workdir whose checkpoints another config wrote (any phase)."""
  for phase, (_, directory) in CHECKPOINT_DIRS.items():
    if os.path.isdir(os.path.join(workdir, directory)):
      reader = checkpointer(config, workdir, phase, vocab, read_only=True)
      try:
        reader.check_config()
      finally:
        reader.close()


def check_stage_checkpoints(workdir: str, stage: str) -> None:
  """Raises InputError unless `workdir` holds `stage`'s checkpoint directory."""
  directory = os.path.join(workdir, CHECKPOINT_DIRS[stage][1])
  if not os.path.isdir(directory):
    raise InputError(f"no {stage} checkpoints in {directory}: is --workdir the run's workdir?")


def load_stage_params(config: ml_collections.ConfigDict, workdir: str, stage: str, params_like,
                      mesh, vocab: dict, step: int | None = None):
  """(step, params, record) of a stage's selected checkpoint (`select_checkpoint`), read-only."""
  check_stage_checkpoints(workdir, stage)
  reader = checkpointer(config, workdir, stage, vocab, read_only=True)
  try:
    return select_checkpoint(config, reader, params_like, mesh, step)
  finally:
    reader.close()
