"""Trains the method end to end: teachers, teacher features, stage 1, stage 2, evaluation.

  python -m rebalance_jax.train --config=configs/demo.py --workdir=runs/demo

Each phase resumes from what the workdir already holds, so re-running the same command after an
interruption continues where it stopped. The workdir ends up with:
  teachers/{image,text}/      teacher checkpoints (never part of the student's checkpoints)
  teacher_features/           one feature row per training pair and teacher
  stage1/, stage2/            checkpoints/ and logs/ (metrics.jsonl + TensorBoard events)
  results.{json,md,png}       the evaluation protocols on the test split after each stage
"""

import functools
import os

import jax
import ml_collections
from absl import app, flags, logging
from ml_collections import config_flags

from rebalance_jax import cli, experiment, interrupts, objective, reporting, teacher_job, trainer
from rebalance_jax.data import augment
from rebalance_jax.data.datasets import RetrievalData, load_retrieval_data
from rebalance_jax.evaluators.suite import Evaluator
from rebalance_jax.models.student import STAGE2_NEW_PARAMS, Student, init_student
from rebalance_jax.optim import make_optimizer

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py (or configs/demo.py:tiny). "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")


def _student_loss(params, batch, frozen, rng, *, config, stage, model, teacher_models, mesh):
  """Preprocesses the batch on device, gets teacher features, and calls `objective.stage_loss`."""
  augment_rng, loss_rng = jax.random.split(rng)
  images = augment.random_shift(augment_rng, augment.to_float(batch["image"]),
                                config.data.augment_shift)
  teacher_features = None
  if any(t in config[stage].loss_weights for t in objective.TEACHER_TERMS):
    if config.teachers.mode == "online":
      teacher_features = (teacher_job.image_features(teacher_models, frozen, images),
                          teacher_job.text_features(teacher_models, frozen, batch["ids"],
                                                    batch["mask"]))
    else:
      teacher_features = (batch["teacher_image"], batch["teacher_text"])
  groups = mesh.devices.size if config.loss.itm_negatives == "device" else 1
  return objective.stage_loss(
      params, {**batch, "image": images}, teacher_features, loss_rng, model=model,
      loss_config=config.loss, weights=dict(config[stage].loss_weights),
      dual_relation=config.model.dual_relation, num_negative_groups=groups, mesh=mesh)


def train_student_stage(stage: str, config, workdir, data: RetrievalData, model: Student,
                        init_params, mesh, teachers: dict, features, selection_eval,
                        until_step=None):
  """Builds and runs one student stage, evaluating with `selection_eval(params)` for model
  selection unless config.eval.select_on='last'. Returns (step, params, record) of the selected
  checkpoint (`experiment.select_checkpoint`), or None when stopped at `until_step` first."""
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
      teacher_models=teachers["models"])
  periodic_eval = None
  if config.eval.select_on != "last":
    periodic_eval = trainer.PeriodicEval(
        config.eval.select_on, experiment.eval_every_steps(config, stage, data.train.num_pairs),
        selection_eval)
  run_config = trainer.Stage(
      name=stage, loss_fn=loss_fn, tx=tx, schedule=schedule, total_steps=total_steps,
      batch_size=c.batch_size, batch_size_field=f"config.{stage}.batch_size",
      make_batch=make_batch,
      checkpointer=experiment.checkpointer(config, workdir, stage, data.vocab),
      writer=reporting.MetricWriter(os.path.join(workdir, stage, "logs")),
      checkpoint_every=config.checkpoint.every_steps, log_every=config.log_every,
      seed=trainer.stage_seed(config.seed, stage), param_rules=experiment.param_rules(config),
      periodic_eval=periodic_eval)
  try:
    state = trainer.run_stage(run_config, init_params, teachers["params"] if online else None,
                              mesh, data.train.num_pairs, until_step)
    if int(state["step"]) < total_steps:
      return None
    return experiment.select_checkpoint(config, run_config.checkpointer, init_params, mesh,
                                        final_state=state)
  finally:
    run_config.writer.close()
    run_config.checkpointer.close()


def stage2_init(stage1_params, fresh_params):
  """Stage-1 parameters with the stage-2 additions (U_v, U_t, λ, τ2) freshly initialized."""
  return {k: fresh_params[k] if k in STAGE2_NEW_PARAMS else v for k, v in stage1_params.items()}


def run(config: ml_collections.ConfigDict, workdir: str, until: tuple[str, int] | None = None):
  """Runs every phase; `until=(stage, step)` stops once `stage` reaches `step` (as a preemption
  would). Returns {model name: test metrics} of the stages evaluated in the workdir so far under
  this config.eval.

  Everything that can be checked is checked before any work: the config, the workdir, batch sizes
  against devices and data, and every phase's checkpoints against the config. The workdir is
  locked for the run; SIGTERM and Ctrl-C stop it gracefully (interrupts.Interrupted).
  """
  experiment.validate_config(config)
  workdir = experiment.check_workdir(workdir)
  mesh = experiment.make_mesh(config)
  experiment.check_batch_sizes(config, mesh)
  with interrupts.catching(), experiment.workdir_lock(workdir, "training run"):
    return _run_phases(config, workdir, mesh, until)


def _run_phases(config, workdir, mesh, until):
  data = load_retrieval_data(config)
  experiment.check_data_sizes(config, data.train.num_pairs, len(data.train.images))
  experiment.check_checkpoint_configs(config, workdir, data.vocab)
  logging.info("data: %d training pairs, %d test images, %d test captions, vocabulary %d",
               data.train.num_pairs, len(data.test.images), len(data.test.ids), data.vocab_size)
  interrupts.check("data loading")

  teacher_models = teacher_job.teacher_models(config, data.vocab_size, data.train)
  teacher_params = teacher_job.pretrain_teachers(config, teacher_models, data.train, mesh,
                                                 workdir, data.vocab)
  teachers = {"models": teacher_models, "params": teacher_params}
  features = None
  if config.teachers.mode == "precomputed":
    features = teacher_job.teacher_features(config, teacher_models, teacher_params, data.train,
                                            mesh, os.path.join(workdir, "teacher_features"),
                                            data.vocab)
  interrupts.check("the teacher phases")

  model = experiment.student_model(config, data.vocab_size)
  fresh = init_student(model, jax.random.key(config.seed))
  evaluator = Evaluator(config, model, data.test, mesh, workdir)
  selection_split = data.val if config.eval.select_on == "val" else data.test
  params = fresh
  for stage in experiment.STAGES:
    until_step = until[1] if until and until[0] == stage else None
    init = fresh if stage == "stage1" else stage2_init(params, fresh)
    selected = train_student_stage(
        stage, config, workdir, data, model, init, mesh, teachers,
        features if stage == "stage2" else None,
        functools.partial(evaluator.selection_metrics, split=selection_split), until_step)
    if selected is None:
      break
    interrupts.check(f"{stage} (its final checkpoint is saved)")
    step, params, record = selected
    logging.info("%s: the model is step %d (%s)", stage, step, record["selected_by"])
    if evaluator.is_recorded(stage, record):
      logging.info("%s: step %d was evaluated before; results.json has it", stage, step)
      continue
    evaluator.add(stage, params, record)
    evaluator.write()
    # Every process computed the metrics; logging them everywhere shows that the processes agree.
    logging.info("process %d: %s rsum %.4f", jax.process_index(), stage,
                 evaluator.rows[stage]["rsum"])
  return evaluator.current_rows()


def main(argv):
  cli.run_guarded("rebalance_jax.train", argv, lambda: run(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
