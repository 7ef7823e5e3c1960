"""A modal-independent teacher network (docs/method.md §3): one registered tower, and optionally a head
over the dataset's scene attributes used only to pre-train it (the synthetic data's analogue of
ImageNet / language pre-training). Its feature is the tower's pooled output."""

import flax.linen as nn

from rebalance_jax.models import towers
from rebalance_jax.models.layers import default_kernel_init


class Teacher(nn.Module):
  tower: towers.TowerSpec
  num_attributes: int = 0  # > 0: the attribute head of pre-training

  def setup(self):
    self.encoder = self.tower.build()
    if self.num_attributes:
      self.head = nn.Dense(self.num_attributes, kernel_init=default_kernel_init)

  def features(self, *inputs):
    """Preprocessed images, or (ids, mask) -> (B, feature dim)."""
    return self.encoder(*inputs).pooled

  def __call__(self, *inputs):
    """-> attribute logits."""
    return self.head(self.features(*inputs))
