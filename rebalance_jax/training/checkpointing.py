"""Orbax checkpoints of a train state, tagged with the config they belong to and checked on restore.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it) and keep
the newest `keep`. Each checkpoint carries, besides the state:
- `config`: a JSON fingerprint of the config sections that shape the state; a checkpoint written
  under another fingerprint is refused with an error naming the differing fields;
- `checksums`: a position-weighted checksum of every state leaf's bits, computed on device. A
  restored state whose checksums differ (bytes garbled on disk, which Orbax itself restores
  silently) counts as damaged, as does one Orbax cannot read.
A non-finite state is never saved. `restore_newest` falls back from damaged checkpoints to the
newest intact one, moving the damaged step folders aside (nothing is deleted).
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from jax.experimental import multihost_utils
from orbax.checkpoint import checkpoint_managers as preservation

from rebalance_jax.infra import logs
from rebalance_jax.infra.errors import InputError

DAMAGED_SUFFIX = ".damaged"  # <checkpoints>.damaged/<step>: where damaged step folders are moved


class ConfigMismatchError(InputError):
  pass


class DamagedCheckpointError(InputError):

  def __init__(self, message: str, reason: str = ""):
    super().__init__(message)
    self.reason = reason


class NonFiniteStateError(FloatingPointError):
  pass


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


def _leaf_checksum(x):
  """Σ bits_i · (odd multiplier of i), mod 2^32: any change of one word changes it."""
  if x.dtype == jnp.bool_:
    bits = x.astype(jnp.uint32)
  else:
    word = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[x.dtype.itemsize]
    bits = jax.lax.bitcast_convert_type(x, word).astype(jnp.uint32)
  bits = bits.ravel()
  multipliers = jnp.arange(bits.size, dtype=jnp.uint32) * jnp.uint32(2654435761) | jnp.uint32(1)
  return jnp.sum(bits * multipliers, dtype=jnp.uint32)


@jax.jit
def _digest(state):
  """(checksum of every leaf, whether every floating leaf is finite)."""
  finite = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(state)
            if jnp.issubdtype(x.dtype, jnp.inexact)]
  return jax.tree.map(_leaf_checksum, state), jnp.all(jnp.stack(finite)) if finite else True


def state_digest(state) -> tuple[dict[str, int], bool]:
  """({leaf path: checksum}, all finite) of a train state (global arrays on any mesh)."""
  checksums, finite = jax.device_get(_digest(state))
  paths = [jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(checksums)]
  return dict(zip(paths, (int(c) for c in jax.tree.leaves(checksums)))), bool(finite)


def _attempt(read):
  """(read(), None), or (None, the exception) for any error of Orbax, TensorStore, JSON or the
  filesystem: they all mean the same here."""
  try:
    return read(), None
  except Exception as e:  # noqa: BLE001
    logs.drop_closed_loop_reports()  # the read's abandoned siblings would each print a traceback
    return None, e


def _everywhere(flag: bool) -> bool:
  """Whether `flag` holds on every process (each must call this at the same point)."""
  if jax.process_count() == 1:
    return flag
  return bool(np.all(multihost_utils.process_allgather(np.array(flag))))


def _first_line(error: BaseException) -> str:
  text = str(error).strip().splitlines()
  return f"{type(error).__name__}: {text[0][:160] if text else ''}"


class Checkpointer:
  """A CheckpointManager for one training stage's directory.

  Keeps the newest `keep` checkpoints and, with `best_metric`, also the checkpoint whose saved
  metrics have the highest `best_metric` (ties: the earliest step), by Orbax's preservation
  policies. `read_only`: never writes there.
  """

  def __init__(self, directory: str, fingerprint: dict, keep: int, read_only: bool = False,
               best_metric: str | None = None):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.fingerprint = json.loads(json.dumps(fingerprint))  # normalize tuples -> lists
    self.best_metric = best_metric
    policies = [preservation.LatestN(n=keep)]
    if best_metric is not None:
      policies.append(preservation.BestN(get_metric_fn=self._rank, n=1,
                                         keep_checkpoints_without_metrics=False))
    self._manager = ocp.CheckpointManager(
        self.directory,
        # Orbax's own read_only mode warns on every use; a manager that is never asked to save
        # writes nothing either.
        options=ocp.CheckpointManagerOptions(
            enable_async_checkpointing=True, create=not read_only,
            preservation_policy=preservation.AnyPreservationPolicy(policies),
            best_fn=self._rank if best_metric else None, best_mode="max"))  # best_fn: save metrics
    self._read_only = read_only

  def _rank(self, metrics: dict) -> tuple[float, int]:
    """Sort key of a checkpoint's metrics, highest best: the metric, then the earlier step."""
    return metrics[self.best_metric], -metrics["step"]

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self._manager.all_steps())

  def metrics(self, step: int) -> dict | None:
    """The metrics saved with `step` (None for a checkpoint saved without)."""
    return self._manager.metrics(step)

  def ranked_steps(self) -> list[int]:
    """The kept steps saved with `best_metric`, best first (ties: the earlier step)."""
    scored = [s for s in self.all_steps() if (self.metrics(s) or {}).get(self.best_metric)
              is not None]
    return sorted(scored, key=lambda s: self._rank(self.metrics(s)), reverse=True)

  def best_step(self) -> int | None:
    """The kept step with the best `best_metric` (None if none was saved with metrics)."""
    ranked = self.ranked_steps()
    return ranked[0] if ranked else None

  def save(self, step: int, state, metrics: dict[str, float] | None = None) -> None:
    """Starts an asynchronous save of `state` (and `metrics`, which rank it for `best_metric`);
    raises NonFiniteStateError (saving nothing) for a state with a NaN or Inf."""
    if self._read_only:
      raise ValueError(f"{self.directory} was opened read-only")
    checksums, finite = state_digest(state)
    if not finite:
      raise NonFiniteStateError(f"the state at step {step} has non-finite values")
    self._manager.save(step, metrics=None if metrics is None else {**metrics, "step": step},
                       args=ocp.args.Composite(
                           state=ocp.args.PyTreeSave(state),
                           config=ocp.args.JsonSave(self.fingerprint),
                           checksums=ocp.args.JsonSave(checksums)))

  def _saved_fingerprint(self, step: int) -> dict:
    return self._manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore()))["config"]

  def restore(self, step: int, abstract_state, partial: bool = False):
    """Restores `step` onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs);
    `partial`: `abstract_state` names a subset of the saved state (e.g. {"params": ...}), and only
    that is read.

    Raises ConfigMismatchError for another config's checkpoint and DamagedCheckpointError for one
    that cannot be read or whose values differ from what was saved.
    """
    saved, error = _attempt(lambda: self._saved_fingerprint(step))
    if not _everywhere(error is None):
      raise self._damaged(step, _first_line(error) if error else "unreadable on another process")
    self.check_fingerprint(saved, step)
    restored, error = _attempt(lambda: self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            item=abstract_state,
            restore_args=ocp.checkpoint_utils.construct_restore_args(abstract_state),
            partial_restore=partial),
        checksums=ocp.args.JsonRestore())))
    # Every process takes the same path into the collective checksum below.
    if not _everywhere(error is None):
      raise self._damaged(step, _first_line(error) if error else "unreadable on another process")
    checksums, _ = state_digest(restored["state"])
    if any(restored["checksums"].get(k) != v for k, v in checksums.items()):
      bad = sorted(k for k in checksums if checksums[k] != restored["checksums"].get(k))
      raise self._damaged(step, f"values differ from the saved checksums, e.g. {bad[0]}")
    return restored["state"]

  def _damaged(self, step: int, reason: str) -> DamagedCheckpointError:
    return DamagedCheckpointError(f"checkpoint {self.directory}/{step} is damaged ({reason})",
                                  reason)

  def restore_newest(self, abstract_state, set_aside: bool = True, partial: bool = False):
    """(step, state) of the newest intact checkpoint, or None when there is none.

    A damaged newer checkpoint is reported in one line and, with `set_aside`, moved to
    `<directory>.damaged/` (so that training can write that step again). If every checkpoint is
    damaged, raises DamagedCheckpointError and moves nothing.
    """
    damaged = []
    for step in reversed(self.all_steps()):
      try:
        state = self.restore(step, abstract_state, partial)
      except DamagedCheckpointError as e:
        damaged.append((step, e.reason))
        continue
      for bad_step, reason in damaged:
        where = self._set_aside(bad_step) if set_aside else "left in place"
        logging.warning("checkpoint %s/%d is damaged (%s); %s, using step %d instead",
                        self.directory, bad_step, reason, where, step)
      if damaged and set_aside:
        self._manager.reload()
      return step, state
    if damaged:
      listed = "; ".join(f"step {s}: {r}" for s, r in damaged)
      raise DamagedCheckpointError(
          f"every checkpoint in {self.directory} is damaged ({listed}); move them away to start "
          "this phase over")
    return None

  def _set_aside(self, step: int) -> str:
    target = os.path.join(self.directory + DAMAGED_SUFFIX, str(step))
    error = None
    if logs.is_main_process():
      suffix = 1
      while os.path.exists(target):  # damaged twice: keep both
        target = os.path.join(self.directory + DAMAGED_SUFFIX, f"{step}-{suffix}")
        suffix += 1
      _, error = _attempt(lambda: (os.makedirs(os.path.dirname(target), exist_ok=True),
                                   os.rename(os.path.join(self.directory, str(step)), target)))
    if not _everywhere(error is None):
      raise DamagedCheckpointError(f"checkpoint {self.directory}/{step} is damaged and could not "
                                   f"be moved to {target} ({error}); move it away by hand")
    return f"moved to {target}"

  def check_config(self) -> None:
    """Raises ConfigMismatchError if the newest readable checkpoint is another config's."""
    for step in reversed(self.all_steps()):
      try:
        saved = self._saved_fingerprint(step)
      except Exception:  # noqa: BLE001 -- damaged: `restore_newest` deals with it
        continue
      self.check_fingerprint(saved, step)
      return

  def check_fingerprint(self, saved: dict, step: int) -> None:
    ours, theirs = _flatten(self.fingerprint), _flatten(saved)
    diff = sorted(k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k))
    if diff:
      details = ", ".join(f"{k}: checkpoint {theirs.get(k)!r} vs config {ours.get(k)!r}"
                          for k in diff[:8])
      raise ConfigMismatchError(
          f"checkpoint {self.directory}/{step} was written by another config ({details}); "
          "use a new --workdir or the original config")

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
