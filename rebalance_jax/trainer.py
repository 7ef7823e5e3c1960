"""The generic training loop of one stage: a pure, jitted train step over a plain-pytree state,
resumable Orbax checkpoints, metrics and progress.

The train state is `{"step", "params", "opt_state"}`. The step's randomness is
`fold_in(rng, step)` and the data position is a function of the step, so resuming from a
checkpoint needs nothing else. Frozen inputs (teacher parameters or features) are a separate,
non-differentiated argument and never part of the state.
"""

import dataclasses
import functools
import signal
import threading
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rebalance_jax import checkpointing, reporting, sharding
from rebalance_jax.errors import InputError


class NonFiniteLossError(FloatingPointError):
  pass


class Preempted(Exception):
  """The run received SIGTERM; a checkpoint of `step` was written. Re-run to resume."""

  def __init__(self, stage: str, step: int):
    super().__init__(f"{stage}: preempted at step {step}; checkpoint saved, re-run the same "
                     "command to resume")
    self.step = step


class PreemptionWatch:
  """Says, at a step boundary, whether the job was asked to stop (SIGTERM).

  Single process: a SIGTERM handler sets a flag. Several processes: JAX's preemption sync point
  (jax.distributed catches SIGTERM), so that every process stops at the same step.
  """

  def __init__(self):
    self._requested = False
    self._previous = None
    if jax.process_count() == 1 and threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._request)

  def _request(self, signum, frame):
    del signum, frame
    self._requested = True

  def should_stop(self, step: int) -> bool:
    if jax.process_count() > 1:
      return multihost_utils.reached_preemption_sync_point(step)
    return self._requested

  def close(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def stage_seed(seed: int, stage: str) -> int:
  """A seed of its own for each stage (data order, initialization, step keys) from config.seed."""
  return int(np.random.SeedSequence([seed, zlib.crc32(stage.encode())]).generate_state(1)[0] >> 1)


def train_batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
  """Example indices of the global batch at `step`: a fresh seeded permutation per epoch, the
  last partial batch dropped."""
  steps_per_epoch = num_examples // batch_size
  epoch, position = divmod(step, steps_per_epoch)
  order = np.random.default_rng([seed, epoch]).permutation(num_examples)
  return order[position * batch_size:(position + 1) * batch_size]


def steps_for(stage_config, num_examples: int) -> int:
  """config.<stage>.num_steps if set, else num_epochs full epochs of the global batch."""
  if num_examples < stage_config.batch_size:
    raise InputError(f"batch size {stage_config.batch_size} exceeds the {num_examples} training "
                     "examples")
  if stage_config.num_steps > 0:
    return stage_config.num_steps
  return stage_config.num_epochs * (num_examples // stage_config.batch_size)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """train_step(state, batch, frozen, rng) -> (state, metrics); loss_fn(params, batch, frozen,
  rng) -> (loss, metrics)."""

  def train_step(state, batch, frozen, rng):
    step_rng = jax.random.fold_in(rng, state["step"])
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch, frozen, step_rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics["grad_norm"] = optax.tree.norm(grads)
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def _initial_state(params, tx: optax.GradientTransformation):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(params, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: sharding.ParamRules):
  """Shapes, dtypes and shardings of the train state: the target to create it or restore a
  checkpoint onto (any mesh: the shardings come from `mesh`, not from the checkpoint)."""
  shapes = jax.eval_shape(functools.partial(_initial_state, tx=tx), params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, rules.state_shardings(shapes, mesh))


def create_state(params, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.ParamRules):
  """The initial train state, built under jit directly in its sharded layout."""
  target = abstract_state(params, tx, mesh, rules)
  init = functools.partial(_initial_state, tx=tx)
  return jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, target))(params)


@dataclasses.dataclass
class Stage:
  """Everything one training stage needs besides the data."""
  name: str
  loss_fn: Callable             # (params, batch, frozen, rng) -> (loss, metrics)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  batch_size: int
  make_batch: Callable          # example indices -> host batch of those rows
  checkpointer: checkpointing.Checkpointer
  writer: reporting.MetricWriter
  checkpoint_every: int
  log_every: int
  seed: int
  param_rules: sharding.ParamRules


def run_stage(stage: Stage, init_params, frozen, mesh: Mesh, num_examples: int,
              until_step: int | None = None):
  """Trains `stage` from its latest checkpoint (or `init_params`) to `until_step` (default: the
  end), checkpointing periodically and at the end. Returns the final train state."""
  sharding.check_batch_size(stage.batch_size, mesh, f"config.{stage.name}.batch_size")
  latest = stage.checkpointer.latest_step()
  target = abstract_state(init_params, stage.tx, mesh, stage.param_rules)
  if latest is None:
    state = create_state(init_params, stage.tx, mesh, stage.param_rules)
  else:
    state = stage.checkpointer.restore(latest, target)
    logging.info("%s: resumed from step %d", stage.name, latest)
  end = stage.total_steps if until_step is None else min(until_step, stage.total_steps)
  step = int(state["step"])
  if step >= end:
    return state

  replicated = sharding.replicated(mesh)
  state_shardings = jax.tree.map(lambda s: s.sharding, target)
  train_step = jax.jit(make_train_step(stage.loss_fn, stage.tx),
                       in_shardings=(state_shardings, sharding.batch_sharding(mesh), replicated,
                                     replicated),
                       out_shardings=(state_shardings, replicated), donate_argnums=(0,))
  rng = jax.random.key(stage.seed)
  stage.writer.start(step)
  progress = reporting.Progress(stage.name, stage.total_steps, step)
  watch = PreemptionWatch()
  try:
    state = _train_loop(stage, state, train_step, frozen, rng, mesh, num_examples, step, end,
                        progress, watch)
  finally:
    watch.close()
  stage.checkpointer.wait()
  return state


def _train_loop(stage, state, train_step, frozen, rng, mesh, num_examples, step, end, progress,
                watch):
  pending = []  # per-step metrics on device, fetched at each log point
  while step < end:
    indices = train_batch_indices(num_examples, stage.batch_size, step, stage.seed)
    local_rows = indices[sharding.process_slice(stage.batch_size)]
    batch = sharding.to_global(stage.make_batch(local_rows), mesh)
    state, metrics = train_step(state, batch, frozen, rng)
    pending.append(metrics)
    step += 1
    stop = watch.should_stop(step)
    checkpoint = step % stage.checkpoint_every == 0 or step == end or stop
    if step % stage.log_every == 0 or checkpoint:  # never checkpoint a non-finite state
      _log(stage, step, pending, progress)
      pending = []
    if checkpoint:
      stage.checkpointer.save(step, state)
    if stop:
      stage.checkpointer.wait()
      raise Preempted(stage.name, step)
  return state


def _log(stage: Stage, step: int, pending: list, progress: reporting.Progress) -> None:
  """Checks every pending step's loss is finite, then writes their mean and a progress line."""
  fetched = jax.device_get(pending)
  first = step - len(fetched) + 1
  for offset, metrics in enumerate(fetched):
    bad = {k: float(v) for k, v in metrics.items()
           if (k.startswith("loss/") or k == "grad_norm") and not np.isfinite(v)}
    if bad:
      raise NonFiniteLossError(
          f"{stage.name}: non-finite loss or gradient at step {first + offset}: {bad}. The last checkpoint "
          f"({stage.checkpointer.latest_step()}) is intact; lower config.optim.lr or check the data.")
  means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  means["lr"] = float(stage.schedule(step - 1))
  means.update(progress.report(step, means, stage.batch_size))
  stage.writer.write(step, means)
