"""An experiment's phases in order, each resuming from its workdir: teachers, teacher features,
every student stage, evaluation. `run` is what `python -m rebalance_jax.train` does (train.py
has its flags); other drivers (the ablation study) call it too.

The workdir ends up with:
  teachers/{image,text}/      pre-trained teacher checkpoints (never part of the student's)
  teacher_features/           per-image and per-caption rows of each teacher's features
  <stage>/                    checkpoints/ and logs/ (metrics.jsonl + TensorBoard events)
  results.{json,md,png}       the evaluation protocols on the test split after each stage
"""

import functools
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax.config import spec
from rebalance_jax.data import pipeline
from rebalance_jax.data.dataset import Dataset, load_dataset
from rebalance_jax.evaluators import predict
from rebalance_jax.infra import interrupts, logs
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models.student import Student, init_student, with_tower_weights
from rebalance_jax.recipe import workdirs
from rebalance_jax.recipe.evaluation import Evaluator, relevance_cache
from rebalance_jax.recipe.teachers import feature_job, obtain
from rebalance_jax.training import loop, objective
from rebalance_jax.training.optim import make_optimizer


def _stage_batches(exp: spec.Experiment, stage: spec.StageSpec, data: Dataset, teachers,
                   features) -> pipeline.TrainBatches:
  """The stage's training pairs, with the teacher inputs its objective needs."""
  extra = None
  if stage.objective.uses_teachers and features is not None:
    extra = lambda image_rows, caption_rows, _: features.rows(image_rows, caption_rows)
  elif stage.objective.uses_teachers and exp.teachers.vocab_file:  # online, own tokenizer
    encode = teachers["text"].encode  # not the teachers: worker processes get a copy of `extra`
    extra = lambda _, __, captions: {
        f"teacher_{k}": v for k, v in encode(captions, train=True).items()}
  seed = loop.stage_seed(exp.seed, stage.name)
  num_examples = data.train.num_captions
  length = pipeline.text_lengths(data, lambda step: pipeline.train_batch_indices(
      num_examples, stage.batch_size, step, seed), exp.data.text_buckets)
  return pipeline.TrainBatches(num_examples, stage.batch_size, seed,
                               pipeline.pair_rows(data, seed, extra, length), exp.data.num_workers)


def train_student_stage(exp: spec.Experiment, stage: spec.StageSpec, workdir: str, data: Dataset,
                        model: Student, init_params, mesh, teachers, features, selection_eval,
                        until_step=None):
  """Builds and runs one student stage, evaluating with `selection_eval(params)` for model
  selection unless eval.select_on='last'. Returns (step, params, record) of the selected
  checkpoint (`workdirs.select_checkpoint`), or None when stopped at `until_step` first."""
  num_pairs = data.train.num_captions
  total_steps = stage.total_steps(num_pairs)
  tx, schedule = make_optimizer(exp.optim, init_params, total_steps)
  online = stage.objective.uses_teachers and exp.teachers.mode == "online"
  loss_fn = functools.partial(
      objective.batch_loss, model=model, objective=stage.objective,
      augment_shift=exp.data.augment_shift, online_teachers=teachers if online else None,
      mesh=mesh)
  periodic_eval = None
  if exp.eval.select_on != "last":
    periodic_eval = loop.PeriodicEval(exp.eval.select_on, exp.eval.every(stage, num_pairs),
                                         selection_eval)
  run_config = loop.Stage(
      name=stage.name, loss_fn=loss_fn, tx=tx, schedule=schedule, total_steps=total_steps,
      batch_size=stage.batch_size, batch_size_field=f"{stage.field}.batch_size",
      batches=_stage_batches(exp, stage, data, teachers, features),
      checkpointer=workdirs.checkpointer(exp, workdir, stage.name, data.content),
      writer=logs.MetricWriter(os.path.join(workdir, stage.name, "logs")),
      checkpoint_every=exp.checkpoint_every, log_every=exp.log_every,
      seed=loop.stage_seed(exp.seed, stage.name), param_rules=exp.param_rules,
      periodic_eval=periodic_eval)
  frozen = {m: t.params for m, t in teachers.items()} if online else None
  try:
    state = loop.run_stage(run_config, init_params, frozen, mesh, until_step)
    if int(state["step"]) < total_steps:
      return None
    return workdirs.select_checkpoint(exp, run_config.checkpointer, init_params, mesh,
                                        final_state=state)
  finally:
    run_config.writer.close()
    run_config.checkpointer.close()


def stage_init(stage: spec.StageSpec, inherited, fresh):
  """A stage's initial parameters: those of the stage it starts from, with its `fresh_params`
  subtrees freshly initialized (or the fresh initialization for a stage from scratch)."""
  if inherited is None:
    return fresh
  return {k: fresh[k] if k in stage.fresh_params else v for k, v in inherited.items()}


def run(exp: spec.Experiment, workdir: str, until: tuple[str, int] | None = None):
  """Runs every phase; `until=(stage, step)` stops once `stage` reaches `step` (as a preemption
  would). Returns {model name: test metrics} of the stages evaluated in the workdir so far under
  this config.eval.

  Everything that can be checked is checked before any work: the workdir, batch sizes
  against devices and data, and every phase's checkpoints against the config. The workdir is
  locked for the run; SIGTERM and Ctrl-C stop it gracefully (interrupts.Interrupted).
  """
  workdir = workdirs.check_workdir(workdir)
  mesh = workdirs.make_mesh(exp)
  workdirs.check_batch_sizes(exp, mesh)
  with interrupts.catching(), workdirs.workdir_lock(workdir, "training run"):
    return run_phases(exp, workdir, mesh, until)


def run_phases(exp: spec.Experiment, workdir: str, mesh, until=None):
  """`run`'s work on a checked Experiment, in a locked workdir."""
  data = load_dataset(exp.data)
  workdirs.check_data_sizes(exp, data.train.num_captions, data.train.num_images)
  workdirs.check_checkpoint_configs(exp, workdir, data.content)
  logging.info("data: %d training pairs, %d test images, %d test captions, vocabulary %d",
               data.train.num_captions, data.test.num_images, data.test.num_captions,
               data.vocab_size)
  model = workdirs.student_model(exp, data.vocab_size)
  fresh = init_student(model, jax.random.key(exp.seed))
  for stage in exp.stages:
    unknown = sorted(set(stage.fresh_params) - set(fresh))
    if unknown:
      raise InputError(f"{stage.field}.fresh_params: {unknown} are not parameter subtrees of the "
                       f"student; it has {sorted(fresh)}")
  fresh = with_tower_weights(model, fresh)
  interrupts.check("data loading")

  teachers = features = None
  if exp.uses_teachers:
    teachers = obtain.obtain_teachers(exp, data, mesh, workdir)
    if exp.teachers.mode == "precomputed":
      features = feature_job.for_experiment(exp, teachers, data, mesh, workdir)
    interrupts.check("the teacher phases")

  evaluator = Evaluator(exp.eval, predict.student_predictor(model, data.eval_encoder), data.test,
                        mesh, workdir, relevance_cache(exp))
  selection_split = data.val if exp.eval.select_on == "val" else data.test
  selected = {}
  for stage in exp.stages:
    until_step = until[1] if until and until[0] == stage.name else None
    init = stage_init(stage, selected.get(stage.init_from), fresh)
    result = train_student_stage(
        exp, stage, workdir, data, model, init, mesh, teachers, features,
        functools.partial(evaluator.selection_metrics, split=selection_split), until_step)
    if result is None:
      break
    interrupts.check(f"{stage.name} (its final checkpoint is saved)")
    step, selected[stage.name], record = result
    logging.info("%s: the model is step %d (%s)", stage.name, step, record["selected_by"])
    # Process 0's results.json decides, so that every process skips (or runs) the same work.
    recorded = evaluator.is_recorded(stage.name, record)
    if bool(multihost_utils.broadcast_one_to_all(np.array(recorded))):
      logging.info("%s: step %d was evaluated before; results.json has it", stage.name, step)
      continue
    evaluator.add(stage.name, selected[stage.name], record)
    evaluator.write()
    if jax.process_count() > 1:  # every process computed them: the logs show that they agree
      logging.info("process %d: %s rsum %.4f", jax.process_index(), stage.name,
                   evaluator.rows[stage.name]["rsum"])
  return evaluator.current_rows()
