"""ViT image tower: patch embedding, a learned [CLS] token and position embeddings, pre-norm blocks.

The spine's and the demo's image tower; its pooled output is token 0 ([CLS]). Its default
preprocessing maps pixels to [0, 1] (mean 0, std 1); set `mean`/`std` for pre-trained weights.
"""

import dataclasses

import flax.linen as nn
import jax.numpy as jnp

from rebalance_jax.models import towers
from rebalance_jax.models.layers import PreNormBlock, block_class, embedding_init, patch_tokens


@dataclasses.dataclass(frozen=True)
class VitConfig:
  image_size: int = 32
  patch_size: int = 4
  width: int = 64
  depth: int = 2
  num_heads: int = 4
  mlp_dim: int = 128
  dropout: float = 0.0
  mean: tuple[float, float, float] = (0.0, 0.0, 0.0)
  std: tuple[float, float, float] = (1.0, 1.0, 1.0)
  dtype: str = "float32"
  remat: bool = False

  def __post_init__(self):
    towers.check_patch_grid(self.image_size, self.patch_size)


class VisionTransformer(nn.Module):
  """Preprocessed images (B, S, S, 3) -> TowerOutput with 1 + (S / patch)^2 tokens."""
  config: VitConfig

  @nn.compact
  def __call__(self, images, train: bool = False) -> towers.TowerOutput:
    c = self.config
    towers.check_image_size(c, images)
    dtype = towers.compute_dtype(c)
    x = patch_tokens(images, c.width, c.patch_size, dtype)
    cls = self.param("cls", nn.initializers.zeros, (1, 1, c.width))
    x = jnp.concatenate([jnp.broadcast_to(cls, (x.shape[0], 1, c.width)).astype(x.dtype), x],
                        axis=1)
    x = x + self.param("pos_embed", embedding_init, (1, x.shape[1], c.width)).astype(x.dtype)
    x = nn.Dropout(c.dropout)(x, deterministic=not train)
    block = block_class(PreNormBlock, c.remat)
    for i in range(c.depth):
      x = block(c.num_heads, c.mlp_dim, c.dropout, dtype, name=f"block{i}")(x, train)
    x = nn.LayerNorm(epsilon=1e-6, dtype=dtype, name="norm")(x).astype(jnp.float32)
    return towers.TowerOutput(x, x[:, 0], jnp.ones(x.shape[:2], jnp.int32))


towers.register("vit", towers.TowerKind("image", VitConfig, VisionTransformer))
