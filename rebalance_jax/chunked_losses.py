"""Ring-chunked global-batch losses: the values and gradients of `losses.py`, block by block.

Under `jit` with a batch-sharded mesh, `losses.itc_loss`, `losses.representation_distillation` and
`losses.structure_distillation` make every device hold its B_local × B slice of the similarity or
relation matrices, and keep them for the backward pass. The functions here compute the same values
and gradients (up to float rounding) with `jax.shard_map` over the mesh axis "data" and a ring:

* each device keeps its own B_local rows (the "row block") in place;
* the "column blocks" (the other side's embeddings or the relation features, with their ids) travel
  around the ring with `jax.lax.ppermute`: at ring step k device d holds the block of device
  (d − k) mod n, so after n steps every row block has met every column block;
* each step computes one B_local × B_local block and folds it into small accumulators:
  - soft-label cross-entropy keeps, per row, a streaming log-sum-exp (running max and sum of
    exponentials) and the sum and count of same-id logits, since with y_ij = 1[id_i = id_j] / n_i
    CE_i = LSE_i − Σ_{j: id_j = id_i} S_ij / n_i. ITC computes each block once and uses it both
    ways: image→text statistics stay with the image rows, text→image statistics travel with the
    visiting text block;
  - relation distances add up |R^S − R^E| (or its square) over the block, skipping the global
    diagonal (row index = column index, which only occurs on a device's own block);
* the per-block function is wrapped in `jax.checkpoint`, so the backward pass (the ring run in
  reverse: the transpose of `ppermute` is the inverse permutation) recomputes each block instead
  of storing it. Final sums are `psum`med, so every device holds the global value.

Memory per device: a few B_local × B_local blocks at a time, plus the n visiting column blocks
(B × D in all) that the scan saves for the backward pass, instead of B_local × B matrices.
Communication: n − 1 permutes of a B_local × D block per ring.

Example (inside a jitted loss, inputs batch-sharded over `mesh`)::

    from rebalance_jax import chunked_losses
    itc = chunked_losses.itc_loss(img_emb, txt_emb, ids, 0.07, mesh)
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec as P

from rebalance_jax import losses
from rebalance_jax.sharding import DATA_AXIS

_BATCH = P(DATA_AXIS)
_REPLICATED = P()


# ------------------------------------------------------------------------------------------- ring

def _ring_size(mesh: Mesh, batch_size: int) -> int:
  """Number of devices on the ring; the batch must split evenly over them."""
  num_devices = mesh.shape[DATA_AXIS]
  if batch_size % num_devices:
    raise ValueError(f"global batch of {batch_size} rows is not divisible by the "
                     f"{num_devices} devices of mesh axis {DATA_AXIS!r}")
  return num_devices


def _varying(x: jax.Array) -> jax.Array:
  """Marks a value created inside shard_map as per-device, so it can start a ring accumulator."""
  return jax.lax.pcast(x, DATA_AXIS, to="varying")


def _pass_to_next_device(tree: Any, num_devices: int) -> Any:
  """Sends every leaf from device d to device d + 1 (mod n)."""
  ring = [(d, (d + 1) % num_devices) for d in range(num_devices)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, DATA_AXIS, ring), tree)


def _ring_fold(visit: Callable, state: Any, visiting: Any, local: Any, num_devices: int):
  """Folds every column block into `state`, inside shard_map.

  Calls `state, visiting = visit(state, visiting, local, source)` once for each of the n column
  blocks, `source` being the device the visiting block started on, and passes `visiting` on along
  the ring in between. `visit` is rematerialized in the backward pass. Returns the final
  (state, visiting); the last visiting block is the one that started on device d + 1.
  """
  visit = jax.checkpoint(visit, prevent_cse=False)
  here = jax.lax.axis_index(DATA_AXIS)

  def step(carry, k):
    state, visiting = visit(*carry, local, (here - k) % num_devices)
    return (state, _pass_to_next_device(visiting, num_devices)), None

  carry, _ = jax.lax.scan(step, (state, visiting), jnp.arange(num_devices - 1))
  return visit(*carry, local, (here + 1) % num_devices)


# ------------------------------------------------------------------ streaming soft cross-entropy

class _SoftCEStats(NamedTuple):
  """Per-row running statistics of the soft-label cross-entropy over the blocks seen so far."""
  max_logit: jax.Array      # shifts the exponentials; carries no gradient
  sum_exp: jax.Array        # Σ_j exp(S_ij − max_logit)
  same_id_sum: jax.Array    # Σ_{j: id_j = id_i} S_ij
  same_id_count: jax.Array  # n_i = #{j: id_j = id_i}


def _empty_stats(num_rows: int) -> _SoftCEStats:
  zeros = _varying(jnp.zeros((num_rows,), jnp.float32))
  return _SoftCEStats(zeros - jnp.inf, zeros, zeros, zeros)


def _fold_logits(stats: _SoftCEStats, logits: jax.Array, same_id: jax.Array) -> _SoftCEStats:
  """Adds a block of logits (rows × columns) to the rows' statistics."""
  logits = logits.astype(jnp.float32)
  block_max = jax.lax.stop_gradient(jnp.max(logits, axis=1))
  max_logit = jnp.maximum(stats.max_logit, block_max)
  sum_exp = (stats.sum_exp * jnp.exp(stats.max_logit - max_logit) +
             jnp.sum(jnp.exp(logits - max_logit[:, None]), axis=1))
  return _SoftCEStats(
      max_logit=max_logit,
      sum_exp=sum_exp,
      same_id_sum=stats.same_id_sum + jnp.sum(jnp.where(same_id, logits, 0.0), axis=1),
      same_id_count=stats.same_id_count + jnp.sum(same_id, axis=1, dtype=jnp.float32))


def _cross_entropy_sum(stats: _SoftCEStats) -> jax.Array:
  """Σ_i CE_i = Σ_i (LSE_i − Σ_j y_ij S_ij) over the rows of `stats`."""
  log_sum_exp = stats.max_logit + jnp.log(stats.sum_exp)
  return jnp.sum(log_sum_exp - stats.same_id_sum / stats.same_id_count)


def _contrastive_ring(rows: jax.Array, columns: jax.Array, ids: jax.Array, temperature: jax.Array,
                      num_devices: int, both_directions: bool) -> tuple[jax.Array, ...]:
  """Global CE_soft(rows·columnsᵀ/τ) and, if both_directions, CE_soft of its transpose.

  Runs inside shard_map on this device's rows, columns and ids; returns the global means.
  """
  num_rows = rows.shape[0]

  def visit(row_stats, visiting, local, source):
    del source  # cross-entropy has no diagonal to skip
    columns, column_ids, column_stats = visiting
    rows, ids, temperature = local
    logits = rows @ columns.T / temperature
    same_id = ids[:, None] == column_ids[None, :]
    row_stats = _fold_logits(row_stats, logits, same_id)
    if column_stats is not None:
      column_stats = _fold_logits(column_stats, logits.T, same_id.T)
    return row_stats, (columns, column_ids, column_stats)

  column_stats = _empty_stats(num_rows) if both_directions else None
  row_stats, (_, _, column_stats) = _ring_fold(
      visit, _empty_stats(num_rows), (columns, ids, column_stats), (rows, ids, temperature),
      num_devices)
  finished = (row_stats, column_stats) if both_directions else (row_stats,)
  # Each device ends with the column statistics of another device's block; the psum covers all.
  return tuple(jax.lax.psum(_cross_entropy_sum(s), DATA_AXIS) / (num_rows * num_devices)
               for s in finished)


# ----------------------------------------------------------------------------------- public API

def itc_loss(image_emb: jax.Array, text_emb: jax.Array, ids: jax.Array, temperature: jax.Array,
             mesh: Mesh) -> jax.Array:
  """`losses.itc_loss`, computed on a ring over the mesh axis "data"."""
  num_devices = _ring_size(mesh, image_emb.shape[0])

  def local_loss(image, text, ids, temperature):
    image_to_text, text_to_image = _contrastive_ring(image, text, ids, temperature, num_devices,
                                                     both_directions=True)
    return 0.5 * (image_to_text + text_to_image)

  return jax.shard_map(local_loss, mesh=mesh, in_specs=(_BATCH, _BATCH, _BATCH, _REPLICATED),
                       out_specs=_REPLICATED)(image_emb, text_emb, ids, jnp.asarray(temperature))


def representation_distillation(student_emb: jax.Array, teacher_emb: jax.Array, ids: jax.Array,
                                temperature: jax.Array, mesh: Mesh) -> jax.Array:
  """`losses.representation_distillation`, computed on a ring over the mesh axis "data"."""
  num_devices = _ring_size(mesh, student_emb.shape[0])

  def local_loss(student, teacher, ids, temperature):
    (loss,) = _contrastive_ring(student, teacher, ids, temperature, num_devices,
                                both_directions=False)
    return loss

  return jax.shard_map(local_loss, mesh=mesh, in_specs=(_BATCH, _BATCH, _BATCH, _REPLICATED),
                       out_specs=_REPLICATED)(student_emb, teacher_emb, ids,
                                              jnp.asarray(temperature))


class _RelationFeatures(NamedTuple):
  """L2-normalized float32 rows of every feature set that enters a relation matrix."""
  students: tuple[jax.Array, ...]
  image_teacher: jax.Array
  text_teacher: jax.Array


def _entrywise_distance(distance: str) -> Callable[[jax.Array], jax.Array]:
  if distance == "mae":
    return jnp.abs
  if distance == "mse":
    return jnp.square
  raise ValueError(f"relation distance must be 'mae' or 'mse', got {distance!r}")


def structure_distillation(student_features: Sequence[jax.Array],
                           image_teacher_features: jax.Array,
                           text_teacher_features: jax.Array,
                           lam: jax.Array,
                           temperature: jax.Array,
                           mesh: Mesh,
                           distance: str = "mae") -> dict[str, jax.Array]:
  """`losses.structure_distillation`, computed on a ring over the mesh axis "data".

  Returns {"kd": Σ_s d(R^S, R^E), "kdi": d(R^V, R^E), "kdt": d(R^T, R^E)}; teacher features get
  no gradient.
  """
  entry_distance = _entrywise_distance(distance)
  batch_size = image_teacher_features.shape[0]
  num_devices = _ring_size(mesh, batch_size)
  block_rows = batch_size // num_devices

  def visit(sums, visiting, local, source):
    rows, row_index, lam, temperature = local
    column_index = source * block_rows + jnp.arange(block_rows)
    off_diagonal = row_index[:, None] != column_index[None, :]

    def relation(row_features, column_features):
      return row_features @ column_features.T / temperature

    def distance_sum(a, b):
      return jnp.sum(jnp.where(off_diagonal, entry_distance(a - b), 0.0))

    r_image = relation(rows.image_teacher, visiting.image_teacher)
    r_text = relation(rows.text_teacher, visiting.text_teacher)
    r_fused = losses.fuse_relations(r_text, r_image, lam)
    block_sums = {
        "kd": sum(distance_sum(relation(s, c), r_fused)
                  for s, c in zip(rows.students, visiting.students)),
        "kdi": distance_sum(r_image, r_fused),
        "kdt": distance_sum(r_text, r_fused),
    }
    return jax.tree.map(jnp.add, sums, block_sums), visiting

  def local_terms(students, image_teacher, text_teacher, lam, temperature):
    def normalize(x):
      return losses.l2_normalize(x.astype(jnp.float32))

    features = _RelationFeatures(
        students=tuple(normalize(s) for s in students),
        image_teacher=normalize(jax.lax.stop_gradient(image_teacher)),
        text_teacher=normalize(jax.lax.stop_gradient(text_teacher)))
    row_index = jax.lax.axis_index(DATA_AXIS) * block_rows + jnp.arange(block_rows)
    zero = _varying(jnp.zeros((), jnp.float32))
    sums, _ = _ring_fold(visit, {"kd": zero, "kdi": zero, "kdt": zero}, features,
                         (features, row_index, lam, temperature), num_devices)
    num_entries = float(batch_size * (batch_size - 1))  # beyond int32 from B = 46,341
    return jax.tree.map(lambda s: jax.lax.psum(s, DATA_AXIS) / num_entries, sums)

  return jax.shard_map(
      local_terms, mesh=mesh,
      in_specs=(_BATCH, _BATCH, _BATCH, _REPLICATED, _REPLICATED), out_specs=_REPLICATED,
  )(tuple(student_features), image_teacher_features, text_teacher_features, jnp.asarray(lam),
    jnp.asarray(temperature))
