"""An experiment's workdir: its checks, lock, checkpointers (each with its phase's fingerprint),
and the checkpoint each stage selects. Shared by `train` and `evaluate`."""

import contextlib
import os

import jax
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from rebalance_jax.config.spec import Experiment
from rebalance_jax.infra import files, logs, sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models.student import Student
from rebalance_jax.training import checkpointing, loop

# The teachers' pre-training phases (fingerprint phase "teachers"), beside the stages.
TEACHER_PHASES = {"teacher_image": os.path.join("teachers", "image"),
                  "teacher_text": os.path.join("teachers", "text")}


def student_model(exp: Experiment, vocab_size: int) -> Student:
  return Student(exp.student_config(vocab_size))


def make_mesh(exp: Experiment):
  return sharding.make_mesh(fsdp=exp.fsdp)


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


def _training_batch_sizes(exp: Experiment) -> list[tuple[str, int]]:
  """(field, size) of every training batch the experiment uses."""
  sizes = [(f"{s.field}.batch_size", s.batch_size) for s in exp.stages]
  if exp.pretrained_teachers():
    sizes.append(("config.teachers.batch_size", exp.teachers.batch_size))
  return sizes


def check_batch_sizes(exp: Experiment, mesh) -> None:
  """Every batch size splits evenly over the devices and processes."""
  for field, size in _training_batch_sizes(exp) + [("config.eval.batch_size",
                                                    exp.eval.batch_size)]:
    sharding.check_batch_size(size, mesh, field)


def check_data_sizes(exp: Experiment, num_pairs: int, num_images: int) -> None:
  """No training batch is larger than the training set it draws from (the image teacher draws
  images, everything else pairs)."""
  for field, size in _training_batch_sizes(exp):
    available, what = ((num_images, "images") if field == "config.teachers.batch_size"
                       else (num_pairs, "pairs"))
    if size > available:
      raise InputError(f"{field}={size} exceeds the {available} training {what} of "
                       f"config.data.name={exp.data.name!r}")


@contextlib.contextmanager
def workdir_lock(workdir: str, what: str):
  """Holds the workdir's lock (files.WorkdirLock) for a `what` while open. Process 0 takes it and
  every process learns whether it got it, so that a refused job stops everywhere."""
  with contextlib.ExitStack() as stack:
    refusal = ""
    if logs.is_main_process():
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


def checkpoint_directory(workdir: str, phase: str) -> str:
  """Where `phase` (a stage name or a TEACHER_PHASES key) keeps its checkpoints."""
  return os.path.join(workdir, TEACHER_PHASES.get(phase, os.path.join(phase, "checkpoints")))


def checkpointer(exp: Experiment, workdir: str, phase: str, content: dict, keep: int | None = None,
                 read_only: bool = False) -> checkpointing.Checkpointer:
  """The Checkpointer of `phase` in `workdir`, with its fingerprint; a student stage's also keeps
  its best checkpoint by config.eval.select_metric, unless select_on='last'."""
  selects = phase not in TEACHER_PHASES and exp.eval.select_on != "last"
  return checkpointing.Checkpointer(
      checkpoint_directory(workdir, phase),
      exp.fingerprint("teachers" if phase in TEACHER_PHASES else phase, content),
      exp.checkpoint_keep if keep is None else keep, read_only=read_only,
      best_metric=exp.eval.select_metric if selects else None)


def select_checkpoint(exp: Experiment, reader: checkpointing.Checkpointer, params_like, mesh,
                      step: int | None = None, final_state=None):
  """(step, params, record) of a stage's checkpoint: `step` if given, else the one that
  config.eval.select_on selects (`last`: the newest intact; `val`/`test`: the best
  config.eval.select_metric on that split, or the next best if it is damaged). Only the
  parameters are read, unless they are those of `final_state` (the state the stage just finished
  with). `record` says which checkpoint and how it was chosen."""
  e = exp.eval
  target = {"params": loop.abstract_params(params_like, mesh, exp.param_rules)}
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
                               "selected_by": _selected_by(exp, reader, step, candidate, damaged)}


def _selected_by(exp: Experiment, reader, step, chosen, damaged) -> str:
  e = exp.eval
  if step is not None:
    return "chosen with --step"
  if e.select_on == "last":
    return "last"
  how = f"best {e.select_on} {e.select_metric} ({reader.metrics(chosen)[e.select_metric]:.2f})"
  if damaged:
    how += f", after the damaged step {', '.join(map(str, damaged))}"
  return how + (", optimistic: selected on the test split" if e.select_on == "test" else "")


def check_checkpoint_configs(exp: Experiment, workdir: str, content: dict) -> None:
  """Refuses, before any work, a workdir whose checkpoints another config wrote (any phase)."""
  teachers = [f"teacher_{modality}" for modality in exp.pretrained_teachers()]
  for phase in (*teachers, *exp.stage_names):
    if os.path.isdir(checkpoint_directory(workdir, phase)):
      reader = checkpointer(exp, workdir, phase, content, read_only=True)
      try:
        reader.check_config()
      finally:
        reader.close()


def check_stage_checkpoints(workdir: str, stage: str) -> None:
  """Raises InputError unless `workdir` holds `stage`'s checkpoint directory."""
  directory = checkpoint_directory(workdir, stage)
  if os.path.isdir(directory):
    return
  holder = files.lock_holder(workdir)
  if holder:
    raise InputError(f"no {stage} checkpoints in {directory} yet: {holder} holds {workdir}; "
                     f"evaluate {stage} once it has saved a checkpoint")
  raise InputError(f"no {stage} checkpoints in {directory}: is --workdir the run's workdir?")


def place_params(exp: Experiment, params, mesh):
  """Host parameters on the devices, laid out by the sharding rules as a restore lays them."""
  return jax.device_put(params, exp.param_rules.param_shardings(params, mesh))


def load_stage_params(exp: Experiment, workdir: str, stage: str, params_like, mesh, content: dict,
                      step: int | None = None):
  """(step, params, record) of a stage's selected checkpoint (`select_checkpoint`), read-only."""
  check_stage_checkpoints(workdir, stage)
  reader = checkpointer(exp, workdir, stage, content, read_only=True)
  try:
    return select_checkpoint(exp, reader, params_like, mesh, step)
  finally:
    reader.close()
