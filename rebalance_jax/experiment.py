"""From a config to the experiment's objects: validation, checkpoint fingerprint, student model,
and a stage's parameters from its checkpoint. Shared by `train` and `evaluate`."""

import os

import ml_collections

from rebalance_jax import checkpointing, objective, sharding, trainer
from rebalance_jax.errors import InputError
from rebalance_jax.models.student import Student, StudentConfig
from rebalance_jax.models.towers import TextConfig, VitConfig
from rebalance_jax.optim import make_optimizer

STAGES = ("stage1", "stage2")
_CHOICES = {
    "loss.lambda_mode": ("raw", "sigmoid"),
    "loss.tau2_mode": ("learned", "clamped", "fixed"),
    "loss.distance": ("mae", "mse"),
    "loss.itm_negatives": ("device", "global"),
    "teachers.mode": ("precomputed", "online"),
    "model.dual_relation": ("image", "text", "both"),
}
# The config fields each phase's outputs depend on (a later phase on the earlier ones too). A
# checkpoint written under other values of these fields is refused.
_DATA = ("seed", "data", "tokenizer")
FINGERPRINT_FIELDS = {
    "teachers": _DATA + ("teachers",),
    "stage1": _DATA + ("model", "optim", "loss.itm_negatives", "stage1"),
    "stage2": _DATA + ("model", "optim", "loss", "stage1", "stage2", "teachers"),
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
  for field in ("checkpoint.every_steps", "log_every", "eval.batch_size", "teachers.num_steps",
                "teachers.batch_size"):
    value = config
    for key in field.split("."):
      value = value[key]
    if value <= 0:
      raise InputError(f"config.{field}={value} must be positive")
  low, high = config.loss.tau2_range
  if not 0 < low <= high:
    raise InputError(f"config.loss.tau2_range={tuple(config.loss.tau2_range)} must be (low, high) "
                     "with 0 < low <= high")
  if config.loss.lambda_mode == "sigmoid" and not 0 < config.model.lam_init < 1:
    raise InputError(f"config.model.lam_init={config.model.lam_init} must lie in (0, 1) with "
                     "config.loss.lambda_mode='sigmoid'")


def fingerprint(config: ml_collections.ConfigDict, phase: str) -> dict:
  """The config fields that `phase` ("teachers", "stage1", "stage2") depends on, by dotted name."""
  values = {}
  for field in FINGERPRINT_FIELDS[phase]:
    node = config
    for key in field.split("."):
      node = node[key]
    values[field] = node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node
  for field in _LOCATION_FIELDS:
    values["data"].pop(field.split(".")[1], None)
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


def stage_checkpointer(config: ml_collections.ConfigDict, workdir: str,
                       stage: str) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(os.path.join(workdir, stage, "checkpoints"),
                                    fingerprint(config, stage), config.checkpoint.keep)


def load_stage_params(config: ml_collections.ConfigDict, workdir: str, stage: str, params_like,
                      num_examples: int, mesh, step: int | None = None):
  """A stage's student parameters at `step` (default: its latest checkpoint)."""
  checkpointer = stage_checkpointer(config, workdir, stage)
  try:
    step = checkpointer.latest_step() if step is None else step
    if step is None:
      raise InputError(f"no {stage} checkpoint in {checkpointer.directory}")
    tx, _ = make_optimizer(config.optim, params_like,
                           trainer.steps_for(config[stage], num_examples))
    state = checkpointer.restore(step, trainer.abstract_state(params_like, tx, mesh,
                                                              param_rules(config)))
    return state["params"], step
  finally:
    checkpointer.close()
