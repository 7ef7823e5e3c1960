"""The tower contract: a toy tower added through the registry alone trains end to end; dtype and
remat; converted weights loaded by name and shape; a teacher evaluated through the predict
contract."""

import dataclasses
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import saved_state, stage2_loss_and_grads

from rebalance_jax import convert
from rebalance_jax.config import defaults, spec
from rebalance_jax.data.dataset import load_dataset
from rebalance_jax.evaluators import predict, ranking, retrieval
from rebalance_jax.infra import sharding
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers, weights
from rebalance_jax.models.student import Student, init_student, with_tower_weights
from rebalance_jax.models.towers import conversion
from rebalance_jax.recipe import phases
from rebalance_jax.recipe.teachers import obtain
from rebalance_jax.recipe.teachers.network import Teacher


@dataclasses.dataclass(frozen=True)
class PixelConfig:
  image_size: int = 16
  width: int = 32
  mean: tuple = (0.5, 0.5, 0.5)
  std: tuple = (0.25, 0.25, 0.25)
  dtype: str = "float32"
  remat: bool = False


class PixelTower(nn.Module):
  """Every pixel a token; pooled by the mean."""
  config: PixelConfig

  @nn.compact
  def __call__(self, images, train=False):
    tokens = nn.Dense(self.config.width, name="embed")(images.reshape(images.shape[0], -1, 3))
    return towers.TowerOutput(tokens, tokens.mean(1), jnp.ones(tokens.shape[:2], jnp.int32))


def convert_pixel_npz(source: str, options: conversion.Options) -> conversion.Converted:
  """The toy tower's converter: an .npz of a PyTorch-layout Linear ('proj.weight' (out, in),
  'proj.bias') through the shared name rules and shape check."""
  with np.load(source) as f:
    tensors = dict(f)
  params, dropped = conversion.apply_rules(tensors, [
      (r"proj\.(?P<kind>weight|bias)",
       lambda m, x: {"embed/" + conversion.from_linear(x, m.group("kind"), "plain", 1)[0]:
                     conversion.from_linear(x, m.group("kind"), "plain", 1)[1]}),
      (r"step", "a counter, not a weight")], range(0), prefix="")
  fields = {"width": params["embed/kernel"].shape[1]}
  spec = towers.spec_from_config({"kind": "pixels", **fields}, "--source", "image")
  conversion.check_filled(params, conversion.tower_shapes(spec), "pixels tower")
  return conversion.Converted(conversion.tree(params), {"model.image": {"kind": "pixels", **fields}},
                              "model.image.init", dropped)


@pytest.fixture
def pixel_tower(monkeypatch):
  towers.kinds()  # the built-in towers register on first use
  monkeypatch.setattr(towers, "_REGISTRY", {**towers._REGISTRY})  # registered for this test
  towers.register("pixels", towers.TowerKind("image", PixelConfig, PixelTower,
                                             converters={"pixel_npz": convert_pixel_npz}))


@pytest.mark.slow
def test_a_toy_tower_from_the_registry_trains_a_stage(pixel_tower, tiny_config, tmp_path):
  c = tiny_config
  c.model.image = defaults.tower("pixels", width=24)
  del c.stages["stage2"]  # no distillation stage: no teachers are obtained
  results = phases.run(spec.from_config(c), str(tmp_path))
  assert set(results) == {"stage1"} and results["stage1"]["score_mode"] == "itm"
  assert not os.path.exists(tmp_path / "teachers")
  _, state = saved_state(str(tmp_path), "stage1")
  assert state["params"]["image_encoder"]["embed"]["kernel"].shape == (3, 24)
  assert state["params"]["image_proj"]["kernel"].shape == (24, c.model.embed_dim)


def test_a_toy_tower_brings_its_converter_to_the_convert_command(pixel_tower, tmp_path, capsys):
  weight = np.arange(30, dtype=np.float32).reshape(10, 3)  # PyTorch Linear: (out, in)
  source = tmp_path / "pixels.npz"
  np.savez(source, **{"proj.weight": weight, "proj.bias": np.ones(10, np.float32), "step": 7})
  output = str(tmp_path / "pixels.safetensors")
  converted = convert.run("pixel_npz", str(source), output, conversion.Options())
  assert converted.dropped == {"step": "a counter, not a weight"}
  printed = capsys.readouterr().out.splitlines()
  assert printed[1:] == [  # as a student tower or as a teacher, quoted for a shell
      f"use it as the student's image tower: --config.model.image.init={output} "
      "--config.model.image.kind=pixels --config.model.image.width=10",
      f"  as the image teacher: --config.teachers.image.init={output} "
      "--config.teachers.image.kind=pixels --config.teachers.image.width=10"]
  tower = towers.spec_from_config({"kind": "pixels", "width": 10, "init": output},
                                  "config.model.image", "image")
  like = jax.eval_shape(lambda r: towers.init_params(tower, r), jax.random.key(0))
  loaded = towers.load_init(tower, like, "config.model.image")
  np.testing.assert_array_equal(loaded["embed"]["kernel"], weight.T)
  np.testing.assert_array_equal(loaded["embed"]["bias"], np.ones(10))
  with pytest.raises(InputError, match=r"--format='pixel_h5' is not one of \(.*'pixel_npz'"):
    convert.run("pixel_h5", str(source), output, conversion.Options())


def _vit(**fields):
  section = defaults.vit(16, 4, 32, 2, 2, 64, **fields)
  return towers.spec_from_config(section.to_dict(), "config.model.image", "image")


def test_bfloat16_compute_keeps_float32_parameters_and_outputs():
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  f32, bf16 = _vit(), _vit(dtype="bfloat16")
  params = towers.init_params(f32, jax.random.key(0))
  assert jax.tree.map(jnp.shape, params) == jax.tree.map(jnp.shape, towers.init_params(
      bf16, jax.random.key(0)))
  assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(towers.init_params(
      bf16, jax.random.key(0))))
  exact = jax.jit(f32.build().apply)({"params": params}, images)
  low = jax.jit(bf16.build().apply)({"params": params}, images)
  assert low.tokens.dtype == jnp.float32 and low.pooled.dtype == jnp.float32
  np.testing.assert_allclose(low.pooled, exact.pooled, atol=0.1)
  assert not np.array_equal(low.pooled, exact.pooled)  # it did compute in bfloat16


def test_remat_gives_the_same_gradients():
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))
  plain, remat = _vit(dropout=0.1), _vit(dropout=0.1, remat=True)
  params = towers.init_params(plain, jax.random.key(0))

  def grads(tower):
    loss = lambda p: jnp.sum(tower.build().apply(
        {"params": p}, images, True, rngs={"dropout": jax.random.key(2)}).pooled ** 2)
    return jax.jit(jax.grad(loss))(params)

  exact, recomputed = grads(plain), grads(remat)
  # Recomputation reorders float sums: equal up to rounding at the gradient's overall scale
  # (the attention's key gradients are themselves at that rounding level at initialization).
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(exact))
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(exact), jax.tree.leaves(recomputed)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale,
                               err_msg=jax.tree_util.keystr(path))


def test_converted_weights_load_by_name_and_shape(tmp_path, tiny_config):
  tower = _vit()
  trained = jax.tree.map(np.asarray, towers.init_params(tower, jax.random.key(7)))
  path = str(tmp_path / "vit.safetensors")
  weights.save_safetensors(path, trained)
  c = tiny_config
  c.model.image = defaults.vit(16, 4, 32, 2, 2, 64, init=path)
  model = Student(spec.from_config(c).student_config(vocab_size=50))
  params = with_tower_weights(model, init_student(model, jax.random.key(0)))
  for a, b in zip(jax.tree.leaves(params["image_encoder"]), jax.tree.leaves(trained)):
    np.testing.assert_array_equal(a, b)

  like = jax.eval_shape(lambda r: towers.init_params(tower, r), jax.random.key(0))
  extra = {**trained, "head": {"kernel": np.zeros((2, 2), np.float32)}}
  weights.save_safetensors(path, extra)
  with pytest.raises(InputError, match=r"does not fit the tower: unused \(1\): head/kernel"):
    weights.load_safetensors(path, like)
  wrong = {**trained, "pos_embed": np.zeros((1, 5, 32), np.float32)}
  weights.save_safetensors(path, wrong)
  with pytest.raises(InputError, match=r"wrong shape \(1\): pos_embed: \(1, 5, 32\) in the file, "
                                       r"\(1, 17, 32\) expected"):
    weights.load_safetensors(path, like)
  (tmp_path / "garbage").write_bytes(b"not a safetensors file")
  with pytest.raises(InputError, match=r"is not a readable safetensors file"):
    weights.load_safetensors(str(tmp_path / "garbage"), like)


def test_a_teacher_is_evaluated_through_the_predict_contract(tiny_config):
  exp = spec.from_config(tiny_config)
  data = load_dataset(exp.data)
  image_tower = exp.teachers.image.tower
  teacher = obtain.FrozenTeacher(
      "image", image_tower, Teacher(image_tower),
      {"encoder": towers.init_params(image_tower, jax.random.key(0))}, "", {})
  predictor = predict.teacher_predictor(image_teacher=teacher)
  test = data.test
  relevance = retrieval.split_relevance(test, None)
  metrics, curves = retrieval.evaluate(predictor, {"image": teacher.params}, test, relevance,
                                       itm_k=16, batch_size=16, mesh=sharding.make_mesh())
  assert curves is None and "rsum" not in metrics and "t2t_ndcg@10" not in metrics
  features = teacher.features(teacher.params, np.asarray(test.images[np.arange(test.num_images)]))
  features = np.asarray(features) / np.linalg.norm(features, axis=1, keepdims=True)
  expected = ranking.i2i_ndcg(features, relevance, test.image_to_texts[:, 0], self_rule="zeroed")
  assert metrics["i2i_ndcg@10"] == pytest.approx(expected["i2i_ndcg@10"], abs=1e-4)
  assert 0 < metrics["i2i_removed_ndcg@10"] <= 100


def test_two_teachers_are_each_evaluated_on_their_own_modality(tiny_config):
  """Their spaces are unrelated (widths 24 and 40 here): no cross-modal protocol is computed."""
  exp = spec.from_config(tiny_config)
  data = load_dataset(exp.data)
  built = {}
  for t in (exp.teachers.image, exp.teachers.text):
    tower = t.tower if t.modality == "image" else spec.with_vocab_size(t.tower, data.vocab_size)
    built[t.modality] = obtain.FrozenTeacher(
        t.modality, tower, Teacher(tower), {"encoder": towers.init_params(tower, jax.random.key(0))},
        "", {}, data.encode if t.modality == "text" else None)
  predictor = predict.teacher_predictor(built["image"], built["text"])
  assert not predictor.cross_modal
  metrics, curves = retrieval.evaluate(
      predictor, {m: t.params for m, t in built.items()}, data.test,
      retrieval.split_relevance(data.test, None), itm_k=16, batch_size=16,
      mesh=sharding.make_mesh())
  assert curves is None and "rsum" not in metrics and "mixed_ndcg@10" not in metrics
  assert 0 < metrics["i2i_ndcg@10"] <= 100 and 0 < metrics["t2t_ndcg@10"] <= 100


@pytest.mark.slow
def test_a_bfloat16_rematerialized_student_matches_float32(tiny_config):
  """Every tower and the fusion encoder in bf16 with remat: float32 parameters and gradients, and
  the stage-2 loss within bf16 rounding of the float32 one."""
  (exact, _), _ = stage2_loss_and_grads(tiny_config.copy_and_resolve_references())
  for section in (tiny_config.model.image, tiny_config.model.text, tiny_config.model.fusion):
    section.update(dtype="bfloat16", remat=True)
  (low, metrics), grads = stage2_loss_and_grads(tiny_config)
  assert all(g.dtype == jnp.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  assert metrics["loss/itc"].dtype == jnp.float32
  np.testing.assert_allclose(low, exact, rtol=0.05)
  assert low != exact  # it did compute in bfloat16


def test_gelu_is_the_exact_gelu_and_its_gradient():
  from rebalance_jax.models.layers import gelu
  x = jnp.linspace(-9.0, 9.0, 2001)
  exact = lambda t: jax.nn.gelu(t, approximate=False)
  np.testing.assert_allclose(gelu(x), exact(x), atol=2e-6)
  np.testing.assert_allclose(jax.vmap(jax.grad(gelu))(x), jax.vmap(jax.grad(exact))(x), atol=1e-6)


def test_cross_attention_to_shared_images_equals_attention_to_gathered_ones():
  """Keys and values projected once per distinct image and picked per row (in groups) give what
  attending to each row's own copy of the image gives, dropout included (its mask is shared)."""
  from rebalance_jax.models.layers import PostNormBlock, take_in_groups
  block = PostNormBlock(2, 16, dropout=0.3, cross_attention=True)
  text, mask = jax.random.normal(jax.random.key(0), (6, 5, 8)), jnp.ones((6, 5), jnp.int32)
  images = jax.random.normal(jax.random.key(1), (4, 7, 12))  # 2 groups of 2 distinct images
  image_mask = jnp.ones((4, 7), jnp.int32).at[1, 5:].set(0)
  index = jnp.array([[0, 1, 1], [1, 0, 0]])  # 2 groups of 3 rows
  params = block.init({"params": jax.random.key(2)}, text, False, mask, images, image_mask, index)
  rngs = {"dropout": jax.random.key(3)}
  shared = block.apply(params, text, True, mask, images, image_mask, index, rngs=rngs)
  gathered = block.apply(params, text, True, mask, take_in_groups(images, index),
                         take_in_groups(image_mask, index), rngs=rngs)
  np.testing.assert_allclose(shared, gathered, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(take_in_groups(jnp.arange(4), index), [0, 1, 1, 3, 2, 2])


def test_dense_layers_on_rows_equal_flax_dense_and_dense_general():
  """The project's Dense and DenseGeneral (rows flattened into one matrix) have Flax's parameter
  names and shapes and give Flax's values and kernel gradients, for 3- and 4-axis inputs."""
  from rebalance_jax.models.layers import Dense, DenseGeneral
  x = jax.random.normal(jax.random.key(0), (2, 3, 5, 8))
  cases = [(Dense(6), nn.Dense(6), x),
           (DenseGeneral((2, 3)), nn.DenseGeneral((2, 3)), x[0]),
           (DenseGeneral(4, axis=(-2, -1)), nn.DenseGeneral(4, axis=(-2, -1)), x)]
  for ours, flax_layer, inputs in cases:
    params = flax_layer.init(jax.random.key(1), inputs)
    assert jax.tree.map(jnp.shape, ours.init(jax.random.key(1), inputs)) == \
        jax.tree.map(jnp.shape, params)
    np.testing.assert_allclose(ours.apply(params, inputs), flax_layer.apply(params, inputs),
                               rtol=1e-6, atol=1e-6)
    grads = [jax.grad(lambda p, layer=layer, x=inputs: jnp.sum(layer.apply(p, x) ** 2))(params)
             for layer in (ours, flax_layer)]
    for a, b in zip(*map(jax.tree.leaves, grads)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="must be the input's trailing axes"):
    DenseGeneral(4, axis=(0, 1)).init(jax.random.key(1), x)
