"""Trains the method end to end: teachers, teacher features, stage 1, stage 2, evaluation.

  python -m rebalance_jax.train --config=configs/demo.py --workdir=runs/demo

Each phase resumes from what the workdir already holds, so re-running the same command after an
interruption continues where it stopped. The workdir ends up with:
  teachers/{image,text}/      teacher checkpoints (never part of the student's checkpoints)
  teacher_features/           one feature row per training pair and teacher
  stage1/, stage2/            checkpoints/, logs (metrics.jsonl + TensorBoard), results.json
  results.json, results.md    retrieval on the test split after each stage
"""

import functools
import json
import os
import sys

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rebalance_jax import checkpointing, evaluation, objective, reporting, sharding, teacher_job
from rebalance_jax import trainer
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import RetrievalData, load_retrieval_data
from rebalance_jax.errors import InputError
from rebalance_jax.models.student import STAGE2_NEW_PARAMS, Student, StudentConfig, init_student
from rebalance_jax.models.towers import TextConfig, VitConfig
from rebalance_jax.optim import make_optimizer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py (or configs/demo.py:tiny). "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")

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


def _student_loss(params, batch, frozen, rng, *, config, stage, model, teacher_fns, mesh):
  """Preprocesses the batch on device, gets teacher features, and calls `objective.stage_loss`."""
  augment_rng, loss_rng = jax.random.split(rng)
  images = augment.random_shift(augment_rng, augment.to_float(batch["image"]),
                                config.data.augment_shift)
  teacher_features = None
  if any(t in config[stage].loss_weights for t in objective.TEACHER_TERMS):
    if config.teachers.mode == "online":
      teacher_features = teacher_fns(frozen, images, batch["ids"], batch["mask"])
    else:
      teacher_features = (batch["teacher_image"], batch["teacher_text"])
  groups = mesh.devices.size if config.loss.itm_negatives == "device" else 1
  return objective.stage_loss(
      params, {**batch, "image": images}, teacher_features, loss_rng, model=model,
      loss_config=config.loss, weights=dict(config[stage].loss_weights),
      dual_relation=config.model.dual_relation, num_negative_groups=groups)


def _online_teacher_features(models, params, images, ids, mask):
  return (models["image"].apply({"params": params["image"]}, images, method="features"),
          models["text"].apply({"params": params["text"]}, ids, mask, method="features"))


def train_student_stage(stage: str, config, workdir, data: RetrievalData, model: Student,
                        init_params, mesh, teachers: dict, features, until_step=None):
  """Builds and runs one student stage; returns its final train state."""
  c = config[stage]
  total_steps = trainer.steps_for(c, data.train.num_pairs)
  tx, schedule = make_optimizer(config.optim, init_params, total_steps)

  def make_batch(indices):
    batch = data.train.batch(indices)
    if features is not None:
      batch["teacher_image"] = features["image"][indices]
      batch["teacher_text"] = features["text"][indices]
    return batch

  online = config.teachers.mode == "online" and stage == "stage2"
  loss_fn = functools.partial(
      _student_loss, config=config, stage=stage, model=model, mesh=mesh,
      teacher_fns=functools.partial(_online_teacher_features, teachers["models"]))
  directory = os.path.join(workdir, stage)
  run = trainer.Stage(
      name=stage, loss_fn=loss_fn, tx=tx, schedule=schedule, total_steps=total_steps,
      batch_size=c.batch_size, make_batch=make_batch,
      checkpointer=checkpointing.Checkpointer(os.path.join(directory, "checkpoints"),
                                              fingerprint(config), config.checkpoint.keep),
      writer=reporting.MetricWriter(os.path.join(directory, "logs")),
      checkpoint_every=config.checkpoint.every_steps, log_every=config.log_every,
      seed=config.seed)
  try:
    return trainer.run_stage(run, init_params, teachers["params"] if online else None, mesh,
                             data.train.num_pairs, until_step)
  finally:
    run.writer.close()
    run.checkpointer.close()


def stage2_init(stage1_params, fresh_params):
  """Stage-1 parameters with the stage-2 additions (U_v, U_t, λ, τ2) freshly initialized."""
  return {k: fresh_params[k] if k in STAGE2_NEW_PARAMS else v for k, v in stage1_params.items()}


def run(config: ml_collections.ConfigDict, workdir: str, until: tuple[str, int] | None = None):
  """Runs every phase; `until=(stage, step)` stops once `stage` reaches `step` (as a preemption
  would). Returns {stage: test metrics} for the stages that finished."""
  validate_config(config)
  workdir = os.path.abspath(os.path.expanduser(workdir))
  mesh = sharding.make_mesh()
  for stage in STAGES:
    sharding.check_batch_size(config[stage].batch_size, mesh, f"config.{stage}.batch_size")
  data = load_retrieval_data(config)
  logging.info("data: %d training pairs, %d test images, %d test captions, vocabulary %d",
               data.train.num_pairs, len(data.test.images), len(data.test.ids), data.vocab_size)

  teacher_models = teacher_job.teacher_models(config, data.vocab_size, data.train.attributes.shape[1])
  teacher_params = teacher_job.pretrain_teachers(config, teacher_models, data.train, mesh,
                                                 os.path.join(workdir, "teachers"))
  teachers = {"models": teacher_models, "params": teacher_params}
  features = None
  if config.teachers.mode == "precomputed":
    features = teacher_job.teacher_features(teacher_models, teacher_params, data.train,
                                            config.eval.batch_size, mesh,
                                            os.path.join(workdir, "teacher_features"))

  model = student_model(config, data.vocab_size)
  fresh = init_student(model, jax.random.key(config.seed))
  results = {}
  params = fresh
  for stage in STAGES:
    until_step = until[1] if until and until[0] == stage else None
    init = fresh if stage == "stage1" else stage2_init(params, fresh)
    state = train_student_stage(stage, config, workdir, data, model, init, mesh, teachers,
                                features if stage == "stage2" else None, until_step)
    if until_step is not None:
      return results
    params = state["params"]
    results[stage] = evaluation.evaluate_retrieval(model, params, data.test,
                                                   config.eval.batch_size, mesh)
    _write_results(workdir, results)
  return results


def _write_results(workdir: str, results: dict) -> None:
  table = evaluation.results_table(results)
  logging.info("test retrieval (cosine scores):\n%s", table)
  if not reporting.is_main_process():
    return
  for stage, metrics in results.items():
    with open(os.path.join(workdir, stage, "results.json"), "w") as f:
      json.dump(metrics, f, indent=1)
  with open(os.path.join(workdir, "results.json"), "w") as f:
    json.dump(results, f, indent=1)
  with open(os.path.join(workdir, "results.md"), "w") as f:
    f.write(table + "\n")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  reporting.quiet_library_logs()
  try:
    run(_CONFIG.value, _WORKDIR.value)
  except (InputError, trainer.NonFiniteLossError) as e:
    sys.exit(f"rebalance_jax.train: error: {e}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
