"""Orbax checkpoints of a train state, tagged with the config they belong to.

Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it), keep the
newest `keep`, and carry a JSON fingerprint of the config sections that shape the state; restoring
a checkpoint written under a different fingerprint is an error naming the differing fields.
"""

import json
import os

import orbax.checkpoint as ocp

from rebalance_jax.errors import InputError


class ConfigMismatchError(InputError):
  pass


def _flatten(tree, prefix=""):
  if isinstance(tree, dict):
    out = {}
    for k, v in tree.items():
      out.update(_flatten(v, f"{prefix}{k}."))
    return out
  return {prefix[:-1]: tree}


class Checkpointer:
  """A CheckpointManager for one training stage's directory."""

  def __init__(self, directory: str, fingerprint: dict, keep: int):
    self.directory = os.path.abspath(os.path.expanduser(directory))
    self.fingerprint = json.loads(json.dumps(fingerprint))  # normalize tuples -> lists
    self._manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=True,
                                             create=True))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def save(self, step: int, state) -> None:
    self._manager.save(step, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), config=ocp.args.JsonSave(self.fingerprint)))

  def restore(self, step: int, abstract_state):
    """Restores `step` onto the shardings of `abstract_state` (a tree of ShapeDtypeStructs)."""
    saved = self._manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
    self.check_fingerprint(saved["config"], step)
    restored = self._manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return restored["state"]

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
