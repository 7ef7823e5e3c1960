"""The Swin tower against transformers' PyTorch SwinModel on the same random weights, written in
Microsoft's release format ({'model': state_dict}, layers.N.blocks.M...) and read back by the
converter, including a load into a larger window through the resized relative-position tables."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rebalance_jax import convert
from rebalance_jax.config import defaults
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers, weights
from rebalance_jax.models.towers import conversion, swin

pytestmark = pytest.mark.slow  # parity with PyTorch / transformers, and the convert command

torch = pytest.importorskip("torch", reason="the Swin parity tests run transformers' PyTorch "
                            "SwinModel; install the test extra (torch==2.13.0)")
transformers = pytest.importorskip("transformers")

_HF_TO_RELEASE = [  # transformers' SwinModel names -> the release's
    (r"embeddings\.patch_embeddings\.projection\.", "patch_embed.proj."),
    (r"embeddings\.norm\.", "patch_embed.norm."),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_before\.", r"layers.\1.blocks.\2.norm1."),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.layernorm_after\.", r"layers.\1.blocks.\2.norm2."),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\.relative_position_",
     r"layers.\1.blocks.\2.attn.relative_position_"),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.output\.dense\.",
     r"layers.\1.blocks.\2.attn.proj."),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.intermediate\.dense\.", r"layers.\1.blocks.\2.mlp.fc1."),
    (r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.output\.dense\.", r"layers.\1.blocks.\2.mlp.fc2."),
    (r"encoder\.layers\.(\d+)\.downsample\.", r"layers.\1.downsample."),
    (r"layernorm\.", "norm."),
]


def release_state_dict(model) -> dict:
  """A transformers SwinModel's weights under the release's names (q, k, v fused into qkv), plus
  the release's classifier head, which the converter must drop."""
  out, qkv = {}, {}
  for name, value in model.state_dict().items():
    match = re.fullmatch(r"encoder\.layers\.(\d+)\.blocks\.(\d+)\.attention\.self\."
                         r"(query|key|value)\.(weight|bias)", name)
    if match:
      qkv.setdefault((match.group(1), match.group(2), match.group(4)), {})[match.group(3)] = value
      continue
    if name.startswith("pooler"):
      continue
    for pattern, replacement in _HF_TO_RELEASE:
      if re.match(pattern, name):
        name = re.sub(pattern, replacement, name, count=1)
        break
    else:
      raise AssertionError(f"no release name for {name}")
    out[name] = value.clone()
  for (layer, block, leaf), parts in qkv.items():
    out[f"layers.{layer}.blocks.{block}.attn.qkv.{leaf}"] = torch.cat(
        [parts["query"], parts["key"], parts["value"]])
  out["head.weight"] = torch.zeros(7, model.config.hidden_size)
  out["head.bias"] = torch.zeros(7)
  return out


def hf_swin(image_size, window, seed=0, depths=(2, 2, 1, 1), heads=(1, 2, 2, 4), embed=16):
  torch.manual_seed(seed)
  config = transformers.SwinConfig(image_size=image_size, patch_size=4, embed_dim=embed,
                                   depths=list(depths), num_heads=list(heads), window_size=window,
                                   drop_path_rate=0.0)
  model = transformers.SwinModel(config).eval()
  with torch.no_grad():  # random tables and norms, so that every parameter matters
    for name, p in model.named_parameters():
      if "relative_position_bias_table" in name or "norm" in name:
        p.add_(torch.randn_like(p) * 0.5)
  return model


def _reference_tokens(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  with torch.no_grad():
    out = model(torch.from_numpy(images.transpose(0, 3, 1, 2)))
  return out.last_hidden_state.numpy(), out.pooler_output.numpy()


def _ours(params, fields, images):
  spec = towers.spec_from_config({"kind": "swin", **fields, "drop_path": 0.0}, "test", "image")
  out = spec.build().apply({"params": params}, images)
  return np.asarray(out.tokens), np.asarray(out.pooled)


def _save(tmp_path, state, name="release.pth"):
  path = tmp_path / name
  torch.save({"model": state}, path)
  return str(path)


@pytest.fixture(scope="module")
def images():
  return np.random.default_rng(0).normal(size=(2, 64, 64, 3)).astype(np.float32)


def test_swin_matches_transformers_through_the_release_format(tmp_path, images):
  # 64 px, patch 4: stages at 16, 8, 4, 2 tokens a side; window 2, so stages 0-2 shift their
  # odd blocks and the last one (2 = window) neither shifts nor partitions.
  model = hf_swin(64, 2)
  output = tmp_path / "swin.safetensors"
  fields = convert.run("swin", _save(tmp_path, release_state_dict(model)), str(output),
                       conversion.Options(image_size=64)).sections["model.image"]
  del fields["kind"]
  assert fields == {"image_size": 64, "patch_size": 4, "embed_dim": 16, "depths": (2, 2, 1, 1),
                    "num_heads": (1, 2, 2, 4), "window_size": 2, "mlp_ratio": 4.0}
  spec = towers.spec_from_config({"kind": "swin", **fields}, "test", "image")
  like = jax.eval_shape(lambda r: towers.init_params(spec, r), jax.random.key(0))
  params = weights.load_safetensors(str(output), like)
  tokens, pooled = _ours(params, fields, images)
  ref_tokens, ref_pooled = _reference_tokens(model, images)
  assert tokens.shape == (2, 1 + 2 * 2, 128)
  np.testing.assert_allclose(tokens[:, 1:], ref_tokens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(tokens[:, 0], ref_pooled, rtol=1e-5, atol=1e-5)


def test_window_interpolated_load_matches_a_model_with_the_resized_tables(tmp_path):
  # A window-2 checkpoint loaded into a window-4 tower (128 px: stages 32, 16, 8, 4) with
  # PyTorch-bicubic tables equals transformers' window-4 model given torch's bicubic resize of
  # the same tables.
  images = np.random.default_rng(1).normal(size=(1, 128, 128, 3)).astype(np.float32)
  source = hf_swin(128, 2, seed=1)
  target = hf_swin(128, 4, seed=2)
  state = release_state_dict(source)
  with torch.no_grad():
    for (name, p), (_, q) in zip(target.named_parameters(), source.named_parameters()):
      if "relative_position_bias_table" in name:
        heads = q.shape[1]
        grid = q.T.reshape(1, heads, 3, 3)
        resized = torch.nn.functional.interpolate(grid, size=(7, 7), mode="bicubic",
                                                  align_corners=False)
        p.copy_(resized.reshape(heads, 49).T)
      else:
        p.copy_(q)
  params, fields, _ = swin.convert_swin(
      conversion.read_pytorch(_save(tmp_path, state))[0], 128, 4, "bicubic")
  tokens, pooled = _ours(params, fields, images)
  ref_tokens, ref_pooled = _reference_tokens(target, images)
  np.testing.assert_allclose(tokens[:, 1:], ref_tokens, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(pooled, ref_pooled, rtol=1e-5, atol=1e-5)


def test_geometric_interpolation_is_the_reference_loaders():
  # Known answers: X-VLM's loader (BEiT's geometric offsets, then scipy's cubic interp2d per
  # head) run with scipy 1.13, the last release that has interp2d.
  table = np.arange(25, dtype=np.float32).reshape(25, 1) ** 1.5  # window 3 -> 4
  out = swin.resize_relative_position_table(table, 4, "geometric")[:, 0].reshape(7, 7)
  np.testing.assert_allclose(out[3], [31.622776, 32.700897, 36.482872, 41.56922, 46.872166,
                                      51.09649, 52.3832], rtol=1e-5)
  np.testing.assert_allclose(out[[0, 0, 6, 6, 1], [0, 6, 0, 6, 5]],
                             [0.0, 8.0, 89.44272, 117.57551, 10.4357], rtol=1e-5, atol=1e-5)
  table = np.random.RandomState(0).randn(169, 2).astype(np.float32)  # window 7 -> 12
  out = swin.resize_relative_position_table(table, 12, "geometric")
  np.testing.assert_allclose(out[[0, 100, 264, 300, 528]],
                             [[1.7640147, 0.4002441], [-1.3431047, -0.7530708],
                              [1.1880298, 0.3169426], [0.409388, 0.1975726],
                              [-1.7559496, 0.4509711]], rtol=1e-5, atol=1e-6)
  # An interpolating cubic spline reproduces a cubic exactly at the integer target offsets.
  source = swin._geometric_offsets(13, 23)  # pylint: disable=protected-access
  assert source[0] == -source[-1] and abs(source[-1] - 11.0) < 1e-4  # spans the target range
  poly = lambda a, b: 0.3 * a**3 - a * b + 2.0 * b**2 + 1.0
  table = poly(source[:, None], source[None, :]).reshape(169, 1)
  out = swin.resize_relative_position_table(table, 12, "geometric")[:, 0].reshape(23, 23)
  inner = np.arange(-10, 11, dtype=np.float64)
  np.testing.assert_allclose(out[1:-1, 1:-1], poly(inner[:, None], inner[None, :]), rtol=1e-4,
                             atol=1e-3)


def test_release_names_are_checked(tmp_path):
  state = release_state_dict(hf_swin(64, 2))
  tensors = conversion.read_pytorch(_save(tmp_path, state))[0]
  with pytest.raises(InputError, match=r"1 tensors match no rule of the format: absolute_pos"):
    swin.convert_swin({**tensors, "absolute_pos_embed": np.zeros((1, 256, 16))}, 64)
  partial = {k: v for k, v in tensors.items() if not k.startswith("layers.1.downsample.norm")}
  with pytest.raises(InputError, match=r"missing \['stage1_merge/norm/bias', "
                                       r"'stage1_merge/norm/scale'\]"):
    swin.convert_swin(partial, 64)
  with pytest.raises(InputError, match=r"the 15x15 patch grid does not halve 3 times evenly"):
    swin.convert_swin(tensors, 60)
  with pytest.raises(InputError, match=r"stage 0: resolution 16 \(image_size=64\) is not a "
                                       r"multiple of window_size=3"):
    swin.convert_swin(tensors, 64, window_size=3)
  (tmp_path / "bad.pth").write_bytes(b"not a pickle")
  with pytest.raises(InputError, match=r"bad\.pth: not a loadable PyTorch checkpoint"):
    conversion.read_pytorch(str(tmp_path / "bad.pth"))
  with pytest.raises(InputError, match=rf"--source={tmp_path} is a directory, not a checkpoint"):
    conversion.read_pytorch(str(tmp_path))


def test_window_clamps_to_a_smaller_stage_and_drop_path_trains():
  config = swin.SwinConfig(image_size=64, patch_size=4, embed_dim=8, depths=(1, 1, 2, 2),
                           num_heads=(1, 1, 2, 2), window_size=4, drop_path=0.5)
  assert config.stage_windows() == [(16, 4), (8, 4), (4, 4), (2, 2)]
  spec = towers.TowerSpec("swin", config)
  params = towers.init_params(spec, jax.random.key(0))
  assert params["stage3_block1"]["attention"]["relative_position_bias_table"].shape == (9, 2)
  assert params["stage2_block1"]["attention"]["relative_position_bias_table"].shape == (49, 2)
  images = np.ones((4, 64, 64, 3), np.float32)
  apply = jax.jit(lambda seed, train: spec.build().apply(
      {"params": params}, images, train, rngs={"dropout": jax.random.key(seed)}).pooled,
                  static_argnums=1)
  assert not np.allclose(apply(0, True), apply(1, True))  # stochastic depth draws per example
  np.testing.assert_array_equal(apply(0, False), apply(1, False))  # and only in training
  with pytest.raises(ValueError, match="name the same number of stages"):
    swin.SwinConfig(depths=(2, 2), num_heads=(4,))


def test_shifted_window_mask_separates_wrapped_regions():
  mask = swin.shifted_window_mask(4, 2, 1)  # 4 windows of 2x2 after a shift by 1
  assert mask.shape == (4, 4, 4)
  np.testing.assert_array_equal(mask[0], np.zeros((4, 4)))  # top-left: one region
  # Bottom-right window: tokens come from four different regions, only themselves allowed.
  np.testing.assert_array_equal(mask[3], np.where(np.eye(4), 0.0, -100.0))
  index = swin.relative_position_index(2)
  np.testing.assert_array_equal(index[0], [4, 3, 1, 0])  # offsets (0,0), (0,-1), (-1,0), (-1,-1)


def test_swin_in_bfloat16_with_remat_matches_float32():
  """Swin's gradients with remat and stochastic depth equal float32's up to rounding; bf16 compute
  stays within bf16 rounding with float32 parameters and gradients. (The whole student in bf16 with
  remat: tests/test_towers.py.)"""
  images = jax.random.uniform(jax.random.key(1), (2, 16, 16, 3))

  def loss_and_grads(**fields):
    # 16 px, patch 2: stages at 8 and 4 tokens a side, window 4 (stage 0 shifts its second block).
    section = defaults.tower("swin", image_size=16, patch_size=2, embed_dim=16, depths=(2, 2),
                             num_heads=(1, 2), window_size=4, drop_path=0.2, **fields)
    tower = towers.spec_from_config(section.to_dict(), "config.model.image", "image")
    loss = lambda p: jnp.sum(tower.build().apply(
        {"params": p}, images, True, rngs={"dropout": jax.random.key(2)}).pooled ** 2)
    return jax.jit(jax.value_and_grad(loss))(params)

  params = towers.init_params(towers.spec_from_config(defaults.tower(
      "swin", image_size=16, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
      window_size=4).to_dict(), "config.model.image", "image"), jax.random.key(0))
  exact, exact_grads = loss_and_grads()
  recomputed, recomputed_grads = loss_and_grads(remat=True)
  np.testing.assert_allclose(recomputed, exact, rtol=1e-5)
  scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(exact_grads))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5 * scale),
               exact_grads, recomputed_grads)
  low, grads = loss_and_grads(remat=True, dtype="bfloat16")
  assert all(g.dtype == np.float32 and np.all(np.isfinite(g)) for g in jax.tree.leaves(grads))
  np.testing.assert_allclose(low, exact, rtol=0.05)
  assert low != exact  # it did compute in bfloat16


def test_the_shared_bias_gradient_is_the_sum_over_windows():
  logits = jax.random.normal(jax.random.key(0), (6, 2, 3, 3))
  bias = jax.random.normal(jax.random.key(1), (2, 3, 3))
  weight = jax.random.normal(jax.random.key(2), logits.shape)
  loss = lambda add: lambda x, shared: jnp.sum(jnp.sin(add(x, shared)) * weight)
  ours = jax.grad(loss(swin.add_shared_bias), argnums=(0, 1))(logits, bias)
  plain = jax.grad(loss(lambda x, shared: x + shared), argnums=(0, 1))(logits, bias)
  for mine, theirs in zip(ours, plain):
    np.testing.assert_allclose(mine, theirs, rtol=1e-5, atol=1e-6)
