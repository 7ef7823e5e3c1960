"""Sharded on 8 devices equals single-device: the stage-2 loss and gradient, embedding
extraction, and ITM scoring from token states that stay on the devices."""

import dataclasses
import functools

import jax
import numpy as np
import pytest

from rebalance_jax.config import spec
from rebalance_jax.data import pipeline
from rebalance_jax.data.sources import Split
from rebalance_jax.evaluators import predict, retrieval
from rebalance_jax.infra import sharding
from rebalance_jax.models import towers
from rebalance_jax.models.student import Student, init_student
from rebalance_jax.recipe.workdirs import student_model
from rebalance_jax.training import objective

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
  exp = spec.from_config(config)
  model = student_model(exp, vocab_size=50)
  params = init_student(model, jax.random.key(0))
  batch, teacher = _batch(config, 50)
  loss_fn = functools.partial(
      objective.stage_loss, model=model,
      # Same groups on both meshes: "device" reproduces 8-device per-device sampling.
      num_negative_groups=8 if itm_negatives == "device" else 1)

  # fsdp=2: parameters (and their gradients) split over the fsdp axis by the config's rules.
  rules = sharding.ParamRules(tuple(map(tuple, config.sharding.rules)), min_size=256)

  def run(devices, fsdp, chunked):
    mesh = sharding.make_mesh(devices, fsdp=fsdp)
    # chunked: ring-chunked ITC, L_iic/L_ttc and relation losses
    stage2 = dataclasses.replace(exp.stage("stage2").objective, chunked=chunked)
    grad_fn = jax.value_and_grad(functools.partial(loss_fn, objective=stage2, mesh=mesh),
                                 has_aux=True)
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
    # atol: entries ~1e-5 are sums that cancel, so their rounding depends on the partitioning.
    np.testing.assert_allclose(g8, g1, rtol=1e-3, atol=3e-6, err_msg=jax.tree_util.keystr(path))
  # Every stage-2 parameter receives gradient, including U_v, U_t, λ and τ2.
  for name in ("teacher_image_proj", "teacher_text_proj", "lam", "temp2", "itm_head"):
    assert any(np.abs(g).max() > 0 for g in jax.tree.leaves(grads1[name])), name


def test_padded_batches_cover_every_row_with_whole_batches():
  batches = list(pipeline.padded_batches(13, 8))  # 13 rows: not a multiple of 8
  assert [start for start, _, _ in batches] == [0, 8]
  np.testing.assert_array_equal(batches[1][1], [8, 9, 10, 11, 12, 12, 12, 12])
  np.testing.assert_array_equal(batches[1][2], [True] * 5 + [False] * 3)
  # Fewer rows than a batch: one batch, padded to what 8 devices need, not to the batch size.
  ((start, rows, valid),) = pipeline.padded_batches(5, 256)
  assert start == 0 and len(rows) == 8 and valid.sum() == 5
  assert [len(r) for _, r, _ in pipeline.padded_batches(21, 256, start=4)] == [24]


def test_encode_drops_padding_and_rejects_an_indivisible_batch():
  mesh = sharding.make_mesh()
  values = np.arange(13 * 3, dtype=np.float32).reshape(13, 3)
  fn = lambda params, x: {"emb": params * x, "tokens": x[:, None], "mask": x[:, :1]}
  out = retrieval.encode(fn, 2.0, 13, lambda rows: {"x": values[rows]}, 8, mesh,
                         keep_states=True)
  np.testing.assert_array_equal(out.emb, 2 * values)
  assert out.states["tokens"].shape == (16, 1, 3)  # on the devices, padded to whole batches
  assert len(out.states["tokens"].sharding.device_set) == 8
  with pytest.raises(ValueError, match=r"config\.eval\.batch_size=12"):
    retrieval.encode(fn, 1.0, 4, lambda rows: {"x": values[rows]}, 12, mesh, keep_states=False)


@pytest.mark.parametrize("fsdp", [1, 2])
def test_gather_rows_reads_sharded_rows_where_they_lie(fsdp):
  mesh = sharding.make_mesh(fsdp=fsdp)
  rows = sharding.batch_sharding(mesh)
  states = np.arange(32 * 3 * 2, dtype=np.float32).reshape(32, 3, 2)
  index = np.array([5, 31, 0, 7, 7, 12, 30, 1, 2, 3, 4, 5, 6, 7, 8, 9], np.int32)
  out = jax.jit(functools.partial(retrieval.gather_rows, mesh=mesh))(
      jax.device_put(states, rows), jax.device_put(index, rows))
  np.testing.assert_array_equal(out, states[index])  # repeats and every device's rows
  assert out.sharding.spec == rows.spec


def test_embeddings_and_itm_logits_on_8_devices_match_direct_apply(tiny_config):
  """13 images and 13 captions in batches of 8: the padded rows never reach the outputs, and ITM
  logits scored from the device-resident states equal a direct forward pass."""
  model = student_model(spec.from_config(tiny_config), vocab_size=50)
  params = init_student(model, jax.random.key(0))
  batch, _ = _batch(tiny_config, 50)
  n = 13
  images = (batch["image"][:n] * 255).astype(np.uint8)
  tokens = {"ids": batch["ids"][:n], "mask": batch["mask"][:n]}
  rows = np.arange(n, dtype=np.int32)
  split = Split(images, tuple(f"caption {i}" for i in range(n)), rows, rows)
  encode = lambda captions: {k: v[[int(c.split()[1]) for c in captions]]
                             for k, v in tokens.items()}
  predictor = predict.student_predictor(model, encode)
  mesh = sharding.make_mesh()
  image_out, text_out = retrieval.encode_split(predictor, params, split, 8, mesh,
                                               keep_states=True)
  traced = retrieval._embedding_fn.cache_info().misses
  retrieval.encode_split(predictor, params, split, 8, mesh, keep_states=True)
  assert retrieval._embedding_fn.cache_info().misses == traced  # a second evaluation: no retrace
  apply = functools.partial(model.apply, {"params": params})
  image, v = apply(towers.preprocess_images(model.config.image.config, images),
                   method=Student.encode_image)
  text, t = apply(tokens["ids"], tokens["mask"], method=Student.encode_text)
  np.testing.assert_allclose(image_out.emb, v, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(text_out.emb, t, rtol=1e-5, atol=1e-6)

  def direct(pair_images, pair_texts):
    fused = apply(text.tokens[pair_texts], tokens["mask"][pair_texts], image.tokens[pair_images],
                  image.mask[pair_images], method=Student.fuse)
    return apply(fused, method=Student.itm_logits)[:, 1]

  pair_images, pair_texts = np.array([0, 3, 12, 5, 7]), np.array([1, 3, 0, 12, 7])
  logits = retrieval.itm_logits(predictor, params, image_out, text_out, pair_images, pair_texts,
                                8, mesh)
  np.testing.assert_allclose(logits, direct(pair_images, pair_texts), rtol=1e-5, atol=1e-5)
  # Images shared by several pairs, unsorted: chunks of up to 4 pairs of one image (32 pairs per
  # block on 8 devices), a run longer than a chunk, and a last block of repeats.
  pair_images = np.array([3, 0, 3, 12, 3, 5, 3, 7, 3, 3, 0, 12, 3, 0])
  pair_texts = np.array([1, 3, 0, 12, 7, 2, 9, 4, 11, 5, 5, 6, 8, 10])
  logits = retrieval.itm_logits(predictor, params, image_out, text_out, pair_images, pair_texts,
                                32, mesh)
  np.testing.assert_allclose(logits, direct(pair_images, pair_texts), rtol=1e-5, atol=1e-5)

  # Re-ranking: each direction's top-k re-scored; pairs in both directions' lists scored once.
  itc = image_out.emb @ text_out.emb.T
  i2t, t2i = retrieval.itm_rerank(predictor, params, image_out, text_out, itc, 3, 32, mesh)
  top_texts, top_images = np.argsort(-itc, 1)[:, :3], np.argsort(-itc.T, 1)[:, :3]
  for scores, top, query_is_image in ((i2t, top_texts, True), (t2i, top_images, False)):
    queries = np.repeat(np.arange(n), 3)
    expected = direct(*((queries, top.ravel()) if query_is_image else (top.ravel(), queries)))
    np.testing.assert_allclose(np.take_along_axis(scores, top, 1).ravel(), expected, rtol=1e-5,
                               atol=1e-5)
    assert (np.sort(scores, 1)[:, :-3] == -100).all()


def test_image_chunks_cut_runs_of_one_image():
  starts, ends = retrieval.image_chunks(np.array([0, 0, 0, 2, 2, 5]), 2)
  np.testing.assert_array_equal(starts, [0, 2, 3, 5])
  np.testing.assert_array_equal(ends, [2, 3, 5, 6])
