"""From a config to the experiment's objects: validation, checkpoint fingerprint, student model,
and a stage's parameters from its checkpoint. Shared by `train` and `evaluate`."""

import os

import jax
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
# Config fields that do not change what a checkpoint holds.
_OPERATIONAL_FIELDS = ("data.cache_dir", "data.image_root", "data.train_file", "data.test_file",
                       "mesh", "sharding",
                       "checkpoint", "log_every", "eval")


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


def fingerprint(config: ml_collections.ConfigDict) -> dict:
  """The config minus fields that do not change what a checkpoint holds."""
  d = config.to_dict()
  for field in _OPERATIONAL_FIELDS:
    *parents, key = field.split(".")
    node = d
    for p in parents:
      node = node[p]
    node.pop(key, None)
  return d


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
                                    fingerprint(config), config.checkpoint.keep)


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
