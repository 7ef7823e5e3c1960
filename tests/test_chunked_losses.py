"""The ring-chunked losses (rebalance_jax.training.chunked_losses) equal the global-view losses of losses.py.

Values and gradients (w.r.t. every differentiable input) are compared on the 8 fake CPU devices and
on a 2-device sub-mesh, with repeated ids (soft labels), local blocks of 3, 5, 20 and 6 rows, and
whole or partial (tile_size) column tiles.
"""

import functools

import jax
import numpy as np
import pytest

from rebalance_jax import losses
from rebalance_jax.infra import sharding
from rebalance_jax.training import chunked_losses

RTOL = 1e-5
ATOL = 1e-6
TEMPERATURE = 0.3
LAM = 1.3  # outside [0, 1], so kdi and kdt have a λ gradient too
MESHES = {8: sharding.make_mesh(jax.devices()), 2: sharding.make_mesh(jax.devices()[:2])}
# (devices, global batch, tile_size): B_local × tile_size tiles of 3×3, 5×5, 20×20 and 6×2.
LAYOUTS = [(8, 24, None), (8, 40, None), (2, 40, None), (8, 48, 2)]


def _close(actual, expected):
  np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), rtol=RTOL, atol=ATOL)


def _rows(rng, b, d):
  return rng.normal(size=(b, d)).astype(np.float32)


def _ids(b):
  return np.arange(b) // 3  # groups of 3 pairs per image, the last group may be shorter


def _on_mesh(num_devices, *arrays):
  """Places each (B, ...) array batch-sharded on the mesh."""
  return [jax.device_put(x, sharding.batch_sharding(MESHES[num_devices])) for x in arrays]


def _assert_same_value_and_grads(chunked_out, global_out):
  (chunked_value, chunked_grads), (global_value, global_grads) = chunked_out, global_out
  _close(chunked_value, global_value)
  jax.tree.map(_close, chunked_grads, global_grads)


# ---------------------------------------------------------------- contrastive losses

CONTRASTIVE_ARGNUMS = (0, 1, 3)  # both embeddings and the temperature


@functools.cache
def _global_contrastive(name):
  return jax.jit(jax.value_and_grad(getattr(losses, name), CONTRASTIVE_ARGNUMS))


@functools.cache
def _chunked_contrastive(name, num_devices, tile_size=None):
  fn = functools.partial(getattr(chunked_losses, name), mesh=MESHES[num_devices],
                         tile_size=tile_size)
  return jax.jit(jax.value_and_grad(fn, CONTRASTIVE_ARGNUMS))


@pytest.mark.parametrize("name", ["itc_loss", "representation_distillation"])
@pytest.mark.parametrize("num_devices,batch,tile_size", LAYOUTS)
def test_contrastive_value_and_grads_match_global(name, num_devices, batch, tile_size):
  rng = np.random.default_rng(batch)
  left, right, ids = _rows(rng, batch, 16), _rows(rng, batch, 16), _ids(batch)
  expected = _global_contrastive(name)(left, right, ids, TEMPERATURE)
  chunked = _chunked_contrastive(name, num_devices, tile_size)
  actual = chunked(*_on_mesh(num_devices, left, right, ids), TEMPERATURE)
  _assert_same_value_and_grads(actual, expected)


def test_itc_is_symmetric_in_its_two_directions():
  rng = np.random.default_rng(0)
  image, text, ids = _rows(rng, 24, 16), _rows(rng, 24, 16), _ids(24)
  swapped = _chunked_contrastive("itc_loss", 8)(text, image, ids, TEMPERATURE)
  _close(swapped[0], losses.itc_loss(image, text, ids, TEMPERATURE))


# ---------------------------------------------------------------- structure distillation

STRUCTURE_ARGNUMS = (0, 1, 2, 3, 4)  # students, both teachers, λ, τ2
TERM_WEIGHTS = {"kd": 1.0, "kdi": 0.7, "kdt": 1.3}


def _weighted_terms(structure_fn):
  def loss(*args):
    terms = structure_fn(*args)
    return sum(TERM_WEIGHTS[k] * terms[k] for k in TERM_WEIGHTS), terms
  return loss


@functools.cache
def _global_structure(distance):
  fn = functools.partial(losses.structure_distillation, distance=distance)
  return jax.jit(jax.value_and_grad(_weighted_terms(fn), STRUCTURE_ARGNUMS, has_aux=True))


@functools.cache
def _chunked_structure(distance, num_devices, tile_size=None):
  fn = functools.partial(chunked_losses.structure_distillation, mesh=MESHES[num_devices],
                         distance=distance, tile_size=tile_size)
  return jax.jit(jax.value_and_grad(_weighted_terms(fn), STRUCTURE_ARGNUMS, has_aux=True))


def _structure_inputs(batch):
  """Two student feature sets (the sum in kd) and teachers of other widths, as in the paper."""
  rng = np.random.default_rng(batch)
  students = [_rows(rng, batch, 16), _rows(rng, batch, 8)]
  return students, _rows(rng, batch, 20), _rows(rng, batch, 12)


@pytest.mark.parametrize("distance", ["mae", "mse"])
@pytest.mark.parametrize("num_devices,batch,tile_size", LAYOUTS)
def test_structure_value_and_grads_match_global(distance, num_devices, batch, tile_size):
  students, image_teacher, text_teacher = _structure_inputs(batch)
  (expected_loss, expected_terms), expected_grads = _global_structure(distance)(
      students, image_teacher, text_teacher, LAM, TEMPERATURE)
  chunked = _chunked_structure(distance, num_devices, tile_size)
  (actual_loss, actual_terms), actual_grads = chunked(
      _on_mesh(num_devices, *students), *_on_mesh(num_devices, image_teacher, text_teacher),
      LAM, TEMPERATURE)
  jax.tree.map(_close, actual_terms, expected_terms)
  _assert_same_value_and_grads((actual_loss, actual_grads), (expected_loss, expected_grads))


def test_structure_teacher_gradient_exactly_zero():
  students, image_teacher, text_teacher = _structure_inputs(24)
  _, grads = _chunked_structure("mae", 8)(students, image_teacher, text_teacher, LAM, TEMPERATURE)
  _, image_teacher_grad, text_teacher_grad, _, _ = grads
  assert np.all(np.asarray(image_teacher_grad) == 0.0)
  assert np.all(np.asarray(text_teacher_grad) == 0.0)
  assert np.any(np.asarray(grads[0][0]) != 0.0)


@pytest.mark.parametrize("distance", ["mae", "mse"])
@pytest.mark.parametrize("batch,tile_size", [(24, None), (48, 3)])
def test_structure_ignores_the_diagonal(distance, batch, tile_size):
  # Orthogonal student rows (R^S = I/τ2), zero teachers (R^E = 0): only the diagonals differ.
  students = [np.eye(batch, 64, dtype=np.float32)]
  teacher = np.zeros((batch, 20), np.float32)
  terms = chunked_losses.structure_distillation(students, teacher, teacher, LAM, TEMPERATURE,
                                                MESHES[8], distance, tile_size)
  assert {k: float(v) for k, v in terms.items()} == {"kd": 0.0, "kdi": 0.0, "kdt": 0.0}


# ---------------------------------------------------------------- input checks

def test_batch_not_divisible_by_devices_raises():
  rows, ids, mesh = np.ones((20, 4), np.float32), _ids(20), MESHES[8]
  calls = [
      lambda: chunked_losses.itc_loss(rows, rows, ids, TEMPERATURE, mesh),
      lambda: chunked_losses.representation_distillation(rows, rows, ids, TEMPERATURE, mesh),
      lambda: chunked_losses.structure_distillation([rows], rows, rows, LAM, TEMPERATURE, mesh),
  ]
  for call in calls:
    with pytest.raises(ValueError, match=r"20 rows .* 8 devices"):
      call()


def test_tile_size_not_dividing_local_rows_raises():
  rows, ids = np.ones((40, 4), np.float32), _ids(40)  # 5 rows per device
  with pytest.raises(ValueError, match=r"tile_size=2 .* 5 rows per device"):
    chunked_losses.itc_loss(rows, rows, ids, TEMPERATURE, MESHES[8], tile_size=2)


def test_unknown_distance_raises():
  rows = np.ones((8, 4), np.float32)
  with pytest.raises(ValueError, match="'mae' or 'mse'"):
    chunked_losses.structure_distillation([rows], rows, rows, LAM, TEMPERATURE, MESHES[8], "l1")
