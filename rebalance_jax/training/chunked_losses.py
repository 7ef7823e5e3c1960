"""Ring-chunked global-batch losses: the values and gradients of `losses.py`, tile by tile.

Under `jit` with a batch-sharded mesh, `losses.itc_loss`, `losses.representation_distillation` and
`losses.structure_distillation` make every device hold its B_local × B slice of the similarity or
relation matrices, and keep them for the backward pass. The functions here compute the same values
and gradients (up to float rounding) with `jax.shard_map` over the mesh axis "data" and a ring:

* each device keeps its own B_local rows in place;
* the column blocks (the other side's embeddings or the relation features, with their ids) travel
  around the ring with `jax.lax.ppermute`: at ring step k device d holds the block of device
  (d − k) mod n, so after n steps every device's rows have met every column;
* each step computes B_local × tile_size tiles (one B_local × B_local tile by default) and folds
  each into small accumulators:
  - soft-label cross-entropy keeps, per row, a streaming log-sum-exp (running max and sum of
    exponentials) and the sum and count of same-id logits, since with y_ij = 1[id_i = id_j] / n_i
    CE_i = LSE_i − Σ_{j: id_j = id_i} S_ij / n_i. ITC computes each tile once and uses it both
    ways: image→text statistics stay with the image rows, text→image statistics travel with the
    text columns;
  - relation distances add up d(K^S − K^E) (d = |·| or (·)²) over cosine tiles, skipping the
    global diagonal (row index = column index); the 1/τ2 and λ factors are applied to the sums;
* the per-tile function is wrapped in `jax.checkpoint`, so the backward pass (the ring run in
  reverse: the transpose of `ppermute` is the inverse permutation) recomputes each tile instead of
  storing it. Final sums are `psum`med, so every device holds the global value.

Memory per device: a few B_local × tile_size tiles at a time, plus the n visiting column blocks
(B × D in all) that the scan saves for the backward pass, instead of B_local × B matrices.
Communication: n − 1 permutes of a B_local × D block per ring.

Example (inside a jitted loss, inputs batch-sharded over `mesh`)::

    from rebalance_jax.training import chunked_losses
    itc = chunked_losses.itc_loss(img_emb, txt_emb, ids, 0.07, mesh)
    kd = chunked_losses.structure_distillation([fusion_cls], g_v, g_t, lam, tau2, mesh)
"""

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from rebalance_jax import losses
from rebalance_jax.infra.sharding import DATA_AXIS

_BATCH = P(DATA_AXIS)
_REPLICATED = P()


# ------------------------------------------------------------------------------------------- ring

class _RingLayout(NamedTuple):
  num_devices: int  # on the ring
  tile_size: int    # columns of each computed tile


def _ring_layout(mesh: Mesh, batch_size: int, tile_size: int | None) -> _RingLayout:
  """Checks that the batch splits evenly over the devices, and each device's rows into tiles."""
  num_devices = mesh.shape[DATA_AXIS]
  if batch_size % num_devices:
    raise ValueError(f"global batch of {batch_size} rows is not divisible by the "
                     f"{num_devices} devices of mesh axis {DATA_AXIS!r}")
  local_rows = batch_size // num_devices
  if tile_size is None:
    return _RingLayout(num_devices, local_rows)
  if tile_size <= 0 or local_rows % tile_size:
    raise ValueError(f"tile_size={tile_size} must divide the {local_rows} rows per device")
  return _RingLayout(num_devices, tile_size)


def _varying(x: jax.Array) -> jax.Array:
  """Marks a value created inside shard_map as per-device, so it can start a ring accumulator."""
  return jax.lax.pcast(x, DATA_AXIS, to="varying")


def _pass_to_next_device(tree: Any, num_devices: int) -> Any:
  """Sends every leaf from device d to device d + 1 (mod n)."""
  ring = [(d, (d + 1) % num_devices) for d in range(num_devices)]
  return jax.tree.map(lambda x: jax.lax.ppermute(x, DATA_AXIS, ring), tree)


def _ring_fold(visit: Callable, state: Any, visiting: Any, local: Any, layout: _RingLayout):
  """Folds every tile of every column block into `state`, inside shard_map.

  The n column blocks (pytrees of B_local-row leaves) pass through this device one after the other
  along the ring, starting with its own. Each is cut into tiles of `tile_size` rows, and
  `state, tile = visit(state, tile, local, first_column)` runs on every tile, `first_column` being
  the global index of the tile's first row; `visit` is rematerialized in the backward pass.
  Returns the final (state, visiting); the last visiting block is the one from device d + 1.
  """
  num_devices, tile_size = layout
  visit = jax.checkpoint(visit, prevent_cse=False)
  block_rows = jax.tree.leaves(visiting)[0].shape[0]
  num_tiles = block_rows // tile_size
  here = jax.lax.axis_index(DATA_AXIS)

  def fold_block(state, block, source):
    def fold_tile(state, tile_and_index):
      tile, index = tile_and_index
      return visit(state, tile, local, source * block_rows + index * tile_size)

    tiles = jax.tree.map(lambda x: x.reshape(num_tiles, tile_size, *x.shape[1:]), block)
    state, tiles = jax.lax.scan(fold_tile, state, (tiles, jnp.arange(num_tiles)))
    return state, jax.tree.map(lambda x: x.reshape(block_rows, *x.shape[2:]), tiles)

  def step(carry, k):
    state, block = fold_block(*carry, (here - k) % num_devices)
    return (state, _pass_to_next_device(block, num_devices)), None

  carry, _ = jax.lax.scan(step, (state, visiting), jnp.arange(num_devices - 1))
  return fold_block(*carry, (here + 1) % num_devices)


# ------------------------------------------------------------------ streaming soft cross-entropy

class _SoftCEStats(NamedTuple):
  """Per-row running statistics of the soft-label cross-entropy over the tiles seen so far."""
  max_logit: jax.Array      # shifts the exponentials; carries no gradient
  sum_exp: jax.Array        # Σ_j exp(S_ij − max_logit)
  same_id_sum: jax.Array    # Σ_{j: id_j = id_i} S_ij
  same_id_count: jax.Array  # n_i = #{j: id_j = id_i}


def _empty_stats(num_rows: int) -> _SoftCEStats:
  zeros = _varying(jnp.zeros((num_rows,), jnp.float32))
  return _SoftCEStats(zeros - jnp.inf, zeros, zeros, zeros)


def _fold_logits(stats: _SoftCEStats, logits: jax.Array, same_id: jax.Array) -> _SoftCEStats:
  """Adds a tile of logits (rows × columns) to the rows' statistics."""
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
                      layout: _RingLayout, both_directions: bool) -> tuple[jax.Array, ...]:
  """Global CE_soft(rows·columnsᵀ/τ) and, if both_directions, CE_soft of its transpose.

  Runs inside shard_map on this device's rows, columns and ids; returns the global means.
  """
  num_rows = rows.shape[0]

  def visit(row_stats, tile, local, first_column):
    del first_column  # cross-entropy has no diagonal to skip
    columns, column_ids, column_stats = tile
    rows, ids, temperature = local
    logits = rows @ columns.T / temperature
    same_id = ids[:, None] == column_ids[None, :]
    row_stats = _fold_logits(row_stats, logits, same_id)
    if column_stats is not None:
      column_stats = _fold_logits(column_stats, logits.T, same_id.T)
    return row_stats, (columns, column_ids, column_stats)

  column_stats = _empty_stats(num_rows) if both_directions else None
  row_stats, (_, _, column_stats) = _ring_fold(
      visit, _empty_stats(num_rows), (columns, ids, column_stats), (rows, ids, temperature), layout)
  finished = (row_stats, column_stats) if both_directions else (row_stats,)
  # Each device ends with the column statistics of another device's block; the psum covers all.
  return tuple(jax.lax.psum(_cross_entropy_sum(s), DATA_AXIS) / (num_rows * layout.num_devices)
               for s in finished)


# ----------------------------------------------------------------------------------- public API
# `tile_size` (optional in every function): columns of each computed tile, dividing B_local; the
# default B_local computes one B_local × B_local tile per ring step. Smaller tiles trade a longer
# loop for less memory, O(B_local × tile_size).

def itc_loss(image_emb: jax.Array, text_emb: jax.Array, ids: jax.Array, temperature: jax.Array,
             mesh: Mesh, tile_size: int | None = None) -> jax.Array:
  """`losses.itc_loss`, computed on a ring over the mesh axis "data"."""
  layout = _ring_layout(mesh, image_emb.shape[0], tile_size)

  def local_loss(image, text, ids, temperature):
    image_to_text, text_to_image = _contrastive_ring(image, text, ids, temperature, layout,
                                                     both_directions=True)
    return 0.5 * (image_to_text + text_to_image)

  return jax.shard_map(local_loss, mesh=mesh, in_specs=(_BATCH, _BATCH, _BATCH, _REPLICATED),
                       out_specs=_REPLICATED)(image_emb, text_emb, ids, jnp.asarray(temperature))


def representation_distillation(student_emb: jax.Array, teacher_emb: jax.Array, ids: jax.Array,
                                temperature: jax.Array, mesh: Mesh,
                                tile_size: int | None = None) -> jax.Array:
  """`losses.representation_distillation`, computed on a ring over the mesh axis "data"."""
  layout = _ring_layout(mesh, student_emb.shape[0], tile_size)

  def local_loss(student, teacher, ids, temperature):
    (loss,) = _contrastive_ring(student, teacher, ids, temperature, layout, both_directions=False)
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
                           distance: str = "mae",
                           tile_size: int | None = None) -> dict[str, jax.Array]:
  """`losses.structure_distillation`, computed on a ring over the mesh axis "data".

  Returns {"kd": Σ_s d(R^S, R^E), "kdi": d(R^V, R^E), "kdt": d(R^T, R^E)}; teacher features get
  no gradient.

  The ring sums distances of cosine tiles K = R·τ2; the scalars are applied at the end, exactly,
  since d(c·x) = d(c)·d(x) for d = |·| and (·)²: with the teacher gap Δ = K^T − K^V,
  R^S − R^E = (K^S − K^E)/τ2, R^V − R^E = −λΔ/τ2 and R^T − R^E = (1 − λ)Δ/τ2.
  """
  entry_distance = _entrywise_distance(distance)
  batch_size = image_teacher_features.shape[0]
  layout = _ring_layout(mesh, batch_size, tile_size)

  def visit(sums, tile, local, first_column):
    rows, first_row, lam = local
    row_index = first_row + jnp.arange(rows.image_teacher.shape[0])
    column_index = first_column + jnp.arange(tile.image_teacher.shape[0])
    off_diagonal = row_index[:, None] != column_index[None, :]

    def distance_sum(diff):
      return jnp.sum(jnp.where(off_diagonal, entry_distance(diff), 0.0))

    image_cosines = rows.image_teacher @ tile.image_teacher.T
    text_cosines = rows.text_teacher @ tile.text_teacher.T
    fused_cosines = losses.fuse_relations(text_cosines, image_cosines, lam)
    tile_sums = {
        "students": sum(distance_sum(s @ c.T - fused_cosines)
                        for s, c in zip(rows.students, tile.students)),
        "teacher_gap": distance_sum(text_cosines - image_cosines),
    }
    return jax.tree.map(jnp.add, sums, tile_sums), tile

  def local_terms(students, image_teacher, text_teacher, lam, temperature):
    def normalize(x):
      return losses.l2_normalize(x.astype(jnp.float32))

    features = _RelationFeatures(
        students=tuple(normalize(s) for s in students),
        image_teacher=normalize(jax.lax.stop_gradient(image_teacher)),
        text_teacher=normalize(jax.lax.stop_gradient(text_teacher)))
    first_row = jax.lax.axis_index(DATA_AXIS) * image_teacher.shape[0]
    zero = _varying(jnp.zeros((), jnp.float32))
    sums, _ = _ring_fold(visit, {"students": zero, "teacher_gap": zero}, features,
                         (features, first_row, lam), layout)
    num_entries = float(batch_size * (batch_size - 1))  # beyond int32 from B = 46,341
    means = jax.tree.map(lambda s: jax.lax.psum(s, DATA_AXIS) / num_entries, sums)
    return {
        "kd": entry_distance(1.0 / temperature) * means["students"],
        "kdi": entry_distance(lam / temperature) * means["teacher_gap"],
        "kdt": entry_distance((1.0 - lam) / temperature) * means["teacher_gap"],
    }

  return jax.shard_map(
      local_terms, mesh=mesh,
      in_specs=(_BATCH, _BATCH, _BATCH, _REPLICATED, _REPLICATED), out_specs=_REPLICATED,
  )(tuple(student_features), image_teacher_features, text_teacher_features, jnp.asarray(lam),
    jnp.asarray(temperature))
