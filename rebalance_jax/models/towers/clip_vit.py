"""CLIP's vision transformer (the reference's alternative image backbone): a bias-free patch
embedding, a class token and position embeddings, a pre-norm before the blocks, pre-norm blocks
with quick-GELU MLPs, and CLIP's post-norm, here applied to every token (the pooled [CLS] is then
exactly CLIP's pooled output). Preprocessing: CLIP's mean and std."""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rebalance_jax.models import towers
from rebalance_jax.models.layers import PreNormBlock, block_class, embedding_init, patch_tokens

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class ClipVitConfig:
  image_size: int = 224
  patch_size: int = 16
  width: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_dim: int = 3072
  dropout: float = 0.0
  mean: tuple[float, float, float] = CLIP_MEAN
  std: tuple[float, float, float] = CLIP_STD
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    towers.check_patch_grid(self.image_size, self.patch_size)


class ClipVisionTransformer(nn.Module):
  """Preprocessed images (B, S, S, 3) -> TowerOutput with 1 + (S / patch)^2 tokens."""
  config: ClipVitConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> towers.TowerOutput:
    c = self.config
    towers.check_image_size(c, images)
    dtype = towers.compute_dtype(c)
    x = patch_tokens(images, c.width, c.patch_size, dtype, use_bias=False)
    cls = self.param("cls", embedding_init, (c.width,)).astype(x.dtype)
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)), x], axis=1)
    x = x + self.param("pos_embed", embedding_init, (x.shape[1], c.width)).astype(x.dtype)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="pre_norm")(x)
    block = block_class(PreNormBlock, c.remat)
    for i in range(c.depth):
      x = block(c.num_heads, c.mlp_dim, c.dropout, dtype, 1e-5, "quick_gelu",
                name=f"block{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-5, dtype=dtype, name="norm")(x).astype(jnp.float32)
    return towers.TowerOutput(x, x[:, 0], jnp.ones(x.shape[:2], jnp.int32))


towers.register("clip_vit", towers.TowerKind("image", ClipVitConfig, ClipVisionTransformer))
