"""The generic training loop of one stage: a pure, jitted train step over a plain-pytree state,
resumable Orbax checkpoints, metrics and progress.

The train state is `{"step", "params", "opt_state"}`. The step's randomness is
`fold_in(rng, step)` and the batch is a function of the step (`pipeline.TrainBatches`), so
resuming from a checkpoint needs nothing else. Frozen inputs (teacher parameters or features) are
a separate, non-differentiated argument and never part of the state.
"""

import contextlib
import dataclasses
import functools
import signal
import time
import zlib
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.experimental import multihost_utils
from jax.sharding import Mesh

from rebalance_jax.data import pipeline
from rebalance_jax.infra import host_memory, interrupts, logs, sharding
from rebalance_jax.training import checkpointing


class NonFiniteLossError(FloatingPointError):
  pass


class Preempted(interrupts.Interrupted):
  """A stop was requested (SIGTERM, Ctrl-C); a checkpoint of `step` was written. Re-run to resume."""

  def __init__(self, signum: int, stage: str, step: int):
    super().__init__(signum, f"{stage}: stopped at step {step} ({signal.Signals(signum).name}); "
                             "checkpoint saved, re-run the same command to resume")
    self.step = step


def _stop_requested(step: int) -> int | None:
  """The signal asking this job to stop at `step`, or None. Several processes: JAX's preemption
  sync point (jax.distributed catches SIGTERM), so that every process stops at the same step."""
  if jax.process_count() > 1:
    return signal.SIGTERM if multihost_utils.reached_preemption_sync_point(step) else None
  return interrupts.requested()


def stage_seed(seed: int, stage: str) -> int:
  """A seed of its own for each stage (data order, initialization, step keys) from config.seed."""
  return int(np.random.SeedSequence([seed, zlib.crc32(stage.encode())]).generate_state(1)[0] >> 1)


def make_train_step(loss_fn: Callable, tx: optax.GradientTransformation) -> Callable:
  """train_step(state, batch, frozen, rng) -> (state, metrics); loss_fn(params, batch, frozen,
  rng) -> (loss, metrics)."""

  def train_step(state, batch, frozen, rng):
    step_rng = jax.random.fold_in(rng, state["step"])
    (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state["params"], batch, frozen, step_rng)
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    # The barrier keeps XLA from sharing g² with Adam's second moment: shared, it is written out
    # whole (one more pass over every gradient, a tenth of the paper-scale step on a CPU).
    metrics["grad_norm"] = optax.tree.norm(jax.tree.map(jax.lax.optimization_barrier, grads))
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics

  return train_step


def jit_train_step(loss_fn: Callable, tx: optax.GradientTransformation, mesh: Mesh, target):
  """The jitted train step for states laid out as `target` (`abstract_state`): the batch split
  over the mesh, frozen inputs (online teachers' parameters) kept as they were placed (e.g.
  fsdp-sharded by the sharding rules), the rng replicated, the state donated."""
  replicated = sharding.replicated(mesh)
  state_shardings = jax.tree.map(lambda s: s.sharding, target)
  return jax.jit(make_train_step(loss_fn, tx),
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh), None, replicated),
                 out_shardings=(state_shardings, replicated), donate_argnums=(0,))


def _initial_state(params, tx: optax.GradientTransformation):
  return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}


def abstract_state(params, tx: optax.GradientTransformation, mesh: Mesh,
                   rules: sharding.ParamRules):
  """Shapes, dtypes and shardings of the train state: the target to create it or restore a
  checkpoint onto (any mesh: the shardings come from `mesh`, not from the checkpoint)."""
  shapes = jax.eval_shape(functools.partial(_initial_state, tx=tx), params)
  return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                      shapes, rules.state_shardings(shapes, mesh))


def abstract_params(params, mesh: Mesh, rules: sharding.ParamRules):
  """Shapes, dtypes and shardings of the parameters alone: the target of a params-only restore."""
  return jax.tree.map(lambda x, sh: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sh), params,
                      rules.param_shardings(params, mesh))


def create_state(params, tx: optax.GradientTransformation, mesh: Mesh,
                 rules: sharding.ParamRules):
  """The initial train state, built under jit directly in its sharded layout."""
  target = abstract_state(params, tx, mesh, rules)
  init = functools.partial(_initial_state, tx=tx)
  return jax.jit(init, out_shardings=jax.tree.map(lambda s: s.sharding, target))(params)


@dataclasses.dataclass
class PeriodicEval:
  """Evaluation during training: `evaluate(params) -> metrics` every `every_steps` steps and at the
  last step; the metrics are logged as `<name>/<key>` and saved with that step's checkpoint."""
  name: str
  every_steps: int
  evaluate: Callable


@dataclasses.dataclass
class Stage:
  """Everything one training stage needs besides the data."""
  name: str
  loss_fn: Callable             # (params, batch, frozen, rng) -> (loss, metrics)
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  total_steps: int
  batch_size: int
  batch_size_field: str         # the config field it comes from, for error messages
  batches: pipeline.TrainBatches  # step -> this process's host batch
  checkpointer: checkpointing.Checkpointer
  writer: logs.MetricWriter
  checkpoint_every: int
  log_every: int
  seed: int
  param_rules: sharding.ParamRules
  periodic_eval: PeriodicEval | None = None


def run_stage(stage: Stage, init_params, frozen, mesh: Mesh, until_step: int | None = None):
  """Trains `stage` from its newest intact checkpoint (or `init_params`) to `until_step` (default:
  the end), checkpointing periodically and at the end. Returns the final train state."""
  sharding.check_batch_size(stage.batch_size, mesh, stage.batch_size_field)
  target = abstract_state(init_params, stage.tx, mesh, stage.param_rules)
  resumed = stage.checkpointer.restore_newest(target)
  if resumed is None:
    state = create_state(init_params, stage.tx, mesh, stage.param_rules)
  else:
    state = resumed[1]
    logging.info("%s: resumed from step %d", stage.name, resumed[0])
  end = stage.total_steps if until_step is None else min(until_step, stage.total_steps)
  step = int(state["step"])
  if step >= end:
    return state

  train_step = jit_train_step(stage.loss_fn, stage.tx, mesh, target)
  rng = jax.random.key(stage.seed)
  stage.writer.start(step)
  progress = logs.Progress(stage.name, stage.total_steps, step)
  pending = []  # per-step metrics on device, fetched at each log point
  compiled = {}  # batch shapes -> the step compiled for them (captions padded to buckets)
  # Closed on every exit, so that no reader thread outlives the stage.
  with contextlib.closing(stage.batches.iterate(step, end)) as batches:
    while step < end:
      batch = sharding.to_global(next(batches), mesh)
      shapes = tuple(x.shape for x in jax.tree.leaves(batch))
      if shapes not in compiled:
        compiled[shapes] = _compile(stage.name, train_step, state, batch, frozen, rng)
      state, metrics = compiled[shapes](state, batch, frozen, rng)
      pending.append(metrics)
      step += 1
      stop = _stop_requested(step)
      evaluation = stage.periodic_eval if stage.periodic_eval and (
          step % stage.periodic_eval.every_steps == 0 or step == stage.total_steps) else None
      checkpoint = (step % stage.checkpoint_every == 0 or step == end or stop is not None or
                    evaluation is not None)
      if step % stage.log_every == 0 or checkpoint:
        means = _checked_means(stage, step, pending)
        pending = []
        eval_metrics = {}
        if evaluation is not None:
          with interrupts.deferred():  # a stop request waits until the metrics are saved
            eval_metrics = _numbers(evaluation.evaluate(state["params"]))
          means.update({f"{evaluation.name}/{k}": v for k, v in eval_metrics.items()})
          if logs.is_main_process():
            logging.info("%s %d: %s %s", stage.name, step, evaluation.name, " ".join(
                f"{k}={eval_metrics[k]:.4g}" for k in ("r_mean", "rsum") if k in eval_metrics))
        means.update(progress.report(step, means, stage.batch_size))
        stage.writer.write(step, means)
        if checkpoint:
          _save(stage, step, state, eval_metrics or None)
      if stop is not None:
        stage.checkpointer.wait()
        raise Preempted(stop, stage.name, step)
  stage.checkpointer.wait()
  return state


def _compile(name: str, train_step, state, batch, frozen, rng):
  """The jitted step compiled for this batch's shapes (or loaded from the persistent compilation
  cache): timed and logged, as it can take a minute at paper scale. The heap the compiler freed
  goes back to the system before the step's own memory is allocated."""
  if logs.is_main_process():
    tokens = f" for captions of {batch['ids'].shape[1]} tokens" if "ids" in batch else ""
    logging.info("%s: compiling the train step%s", name, tokens)
  started = time.perf_counter()
  compiled = train_step.lower(state, batch, frozen, rng).compile()
  host_memory.release_free_heap()
  if logs.is_main_process():
    logging.info("%s: train step compiled in %.1f s", name, time.perf_counter() - started)
  return compiled


def _numbers(metrics: dict) -> dict[str, float]:
  return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float, np.number))}


def _non_finite(stage: Stage, what: str) -> NonFiniteLossError:
  stage.checkpointer.wait()
  latest = stage.checkpointer.latest_step()  # every saved state passed the finiteness check
  intact = (f"The last checkpoint saved ({latest}) holds finite values" if latest is not None
            else "No checkpoint of this phase was written")
  return NonFiniteLossError(f"{stage.name}: {what}. {intact}; lower the learning rate or check "
                            "the data.")


def _save(stage: Stage, step: int, state, metrics: dict | None) -> None:
  try:
    stage.checkpointer.save(step, state, metrics)
  except checkpointing.NonFiniteStateError:
    raise _non_finite(stage, f"non-finite parameters or optimizer state after step {step}, not "
                             "saved") from None


def _checked_means(stage: Stage, step: int, pending: list) -> dict[str, float]:
  """The mean of every pending step's metrics, after checking their losses are finite."""
  fetched = jax.device_get(pending)
  first = step - len(fetched) + 1
  for offset, metrics in enumerate(fetched):
    bad = {k: float(v) for k, v in metrics.items()
           if (k.startswith("loss/") or k == "grad_norm") and not np.isfinite(v)}
    if bad:
      raise _non_finite(stage, f"non-finite loss or gradient at step {first + offset}: {bad}")
  means = {k: float(np.mean([m[k] for m in fetched])) for k in fetched[0]}
  means["lr"] = float(stage.schedule(step - 1))
  return means
