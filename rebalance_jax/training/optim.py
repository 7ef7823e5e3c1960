"""AdamW with the reference's schedule, weight-decay exclusions and lr-multiplier groups (§5).

Parameter groups are chosen by regular expressions over '/'-joined parameter paths, the first
matching rule winning.
"""

from typing import TYPE_CHECKING

import jax
import optax

from rebalance_jax.infra import tree_rules

if TYPE_CHECKING:  # the config layer builds the spec; this library only reads it
  from rebalance_jax.config import spec


def warmup_linear_decay(base_lr: float, total_steps: int, warmup_fraction: float) -> optax.Schedule:
  """Linear warm-up from 0 over the first warmup_fraction of steps, then linear decay to 0."""
  warmup = int(total_steps * warmup_fraction)
  return optax.join_schedules([
      optax.linear_schedule(0.0, base_lr, max(warmup, 1)),
      optax.linear_schedule(base_lr, 0.0, max(total_steps - warmup, 1)),
  ], [warmup])


def make_optimizer(c: "spec.OptimSpec", params, total_steps: int):
  """AdamW per the optimizer spec (config.optim); returns (transformation, learning-rate
  schedule)."""
  schedule = warmup_linear_decay(c.lr, total_steps, c.warmup_fraction)
  paths = tree_rules.paths(params)
  decay_mask = jax.tree.map(lambda p: tree_rules.first_match(p, [(r, False) for r in c.no_decay],
                                                             True), paths)
  multipliers = jax.tree.map(lambda p: float(tree_rules.first_match(p, c.lr_multipliers, 1.0)),
                             paths)

  tx = optax.adamw(schedule, b1=c.b1, b2=c.b2, eps=c.eps, weight_decay=c.weight_decay,
                   mask=decay_mask)
  return optax.chain(tx, _scale_by_tree(multipliers)), schedule


def _scale_by_tree(multipliers) -> optax.GradientTransformation:
  """Multiplies each update by its parameter's lr multiplier (equivalent to per-group lrs)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, m: u * m, updates, multipliers), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
