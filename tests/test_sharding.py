"""The stage-2 loss over a batch sharded on 8 devices equals the single-device loss and gradient."""

import functools

import jax
import numpy as np
import pytest

from rebalance_jax import objective, sharding
from rebalance_jax.models.student import init_student
from rebalance_jax.experiment import student_model

BATCH = 16


def _batch(config, vocab_size):
  rng = np.random.default_rng(0)
  size, tokens = config.data.image_size, config.data.max_tokens
  mask = (np.arange(tokens)[None] < rng.integers(3, tokens, BATCH)[:, None]).astype(np.int32)
  return {
      "image": rng.random((BATCH, size, size, 3), np.float32),
      "ids": (rng.integers(1, vocab_size, (BATCH, tokens)) * mask).astype(np.int32),
      "mask": mask,
      "image_id": rng.integers(0, 6, BATCH).astype(np.int32),  # repeated ids: soft labels
  }, (rng.normal(size=(BATCH, config.teachers.image.width)).astype(np.float32),
      rng.normal(size=(BATCH, config.teachers.text.width)).astype(np.float32))


@pytest.mark.parametrize("itm_negatives,fsdp,chunked", [
    ("global", 1, False), ("device", 1, False), ("device", 2, False), ("device", 1, True)])
def test_sharded_stage2_loss_and_grads_match_single_device(tiny_config, itm_negatives, fsdp,
                                                           chunked):
  config = tiny_config
  model = student_model(config, vocab_size=50)
  params = init_student(model, jax.random.key(0))
  batch, teacher = _batch(config, 50)
  loss_fn = functools.partial(
      objective.stage_loss, model=model,
      weights=dict(config.stage2.loss_weights), dual_relation="image",
      # Same groups on both meshes: "device" reproduces 8-device per-device sampling.
      num_negative_groups=8 if itm_negatives == "device" else 1)

  # fsdp=2: parameters (and their gradients) split over the fsdp axis by the config's rules.
  rules = sharding.ParamRules(tuple(map(tuple, config.sharding.rules)), min_size=256)

  def run(devices, fsdp, chunked):
    mesh = sharding.make_mesh(devices, fsdp=fsdp)
    loss_config = config.loss.copy_and_resolve_references()
    loss_config.chunked = chunked  # ring-chunked ITC, L_iic/L_ttc and relation losses
    grad_fn = jax.value_and_grad(
        functools.partial(loss_fn, loss_config=loss_config, mesh=mesh), has_aux=True)
    rep, rows = sharding.replicated(mesh), sharding.batch_sharding(mesh)
    param_shardings = rules.param_shardings(params, mesh)
    fn = jax.jit(grad_fn, in_shardings=(param_shardings, rows, rows, rep),
                 out_shardings=((rep, rep), param_shardings))
    (loss, metrics), grads = fn(jax.device_put(params, param_shardings),
                                jax.device_put(batch, rows), jax.device_put(teacher, rows),
                                jax.random.key(1))
    if fsdp > 1:
      assert any(s.spec != () for s in jax.tree.leaves(param_shardings))
    return jax.device_get((loss, metrics, grads))

  (loss1, metrics1, grads1) = run(jax.devices()[:1], 1, False)
  (loss8, metrics8, grads8) = run(jax.devices(), fsdp, chunked)
  assert np.isfinite(loss1)
  np.testing.assert_allclose(loss8, loss1, rtol=2e-5)
  for name in metrics1:
    np.testing.assert_allclose(metrics8[name], metrics1[name], rtol=2e-5, atol=1e-6, err_msg=name)
  flat1 = jax.tree_util.tree_leaves_with_path(grads1)
  flat8 = jax.tree.leaves(grads8)
  for (path, g1), g8 in zip(flat1, flat8):
    np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  # Every stage-2 parameter receives gradient, including U_v, U_t, λ and τ2.
  for name in ("teacher_image_proj", "teacher_text_proj", "lam", "temp2", "itm_head"):
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads1[name])), name


def test_map_in_batches_pads_the_last_batch_and_drops_padding():
  mesh = sharding.make_mesh()
  values = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)  # 13 rows: not a multiple of 8
  calls = []

  def get_rows(indices):
    calls.append(indices)
    return {"x": values[indices]}

  out = sharding.map_in_batches(jax.jit(lambda x: {"double": 2 * x, "sum": x.sum(1)}), 13,
                                get_rows, 8, mesh)
  np.testing.assert_array_equal(out["double"], 2 * values)
  np.testing.assert_array_equal(out["sum"], values.sum(1))
  assert [len(c) for c in calls] == [8, 8]  # the same number of full steps on every process
  np.testing.assert_array_equal(calls[1], [8, 9, 10, 11, 12, 12, 12, 12])


def test_map_in_batches_rejects_indivisible_batch():
  with pytest.raises(ValueError, match=r"config\.eval\.batch_size=12"):
    sharding.map_in_batches(lambda x: x, 4, lambda i: {"x": np.zeros((len(i), 1))}, 12,
                            sharding.make_mesh())


def test_embedding_extraction_on_8_devices_matches_direct_apply(tiny_config):
  """13 images and 13 captions in batches of 8: the padded rows never reach the outputs."""
  from rebalance_jax.data.datasets import EvalSplit
  from rebalance_jax.evaluators import retrieval
  from rebalance_jax.models.student import Student
  model = student_model(tiny_config, vocab_size=50)
  params = init_student(model, jax.random.key(0))
  batch, _ = _batch(tiny_config, 50)
  n = 13
  images = (batch["image"][:n] * 255).astype(np.uint8)
  split = EvalSplit(images, batch["ids"][:n], batch["mask"][:n], np.arange(n, dtype=np.int32),
                    tuple(f"caption {i}" for i in range(n)))
  encoded = retrieval.encode_split(model, params, split, 8, sharding.make_mesh(), keep_tokens=True)
  _, v = model.apply({"params": params}, images.astype(np.float32) / 255,
                     method=Student.encode_image)
  hidden, t = model.apply({"params": params}, split.ids, split.mask, method=Student.encode_text)
  np.testing.assert_allclose(encoded.image_emb, v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(encoded.text_emb, t, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(encoded.text_hidden, hidden, rtol=1e-5, atol=1e-5)
  assert encoded.image_tokens.shape[0] == n
