"""Modal-independent teachers (METHOD.md §3): an image-only and a text-only tower.

Each is pre-trained on its own modality only (in the spine, to predict the embedded dataset's scene
attributes, the analogue of ImageNet pre-training), then frozen. Its feature is the tower's final
[CLS] state; the attribute head is used only in pre-training.
"""

import flax.linen as nn

from rebalance_jax.models.layers import default_kernel_init
from rebalance_jax.models.towers import TextConfig, TextEncoder, VisionTransformer, VitConfig, cls


class ImageTeacher(nn.Module):
  config: VitConfig
  num_attributes: int

  def setup(self):
    self.encoder = VisionTransformer(self.config)
    self.head = nn.Dense(self.num_attributes, kernel_init=default_kernel_init)

  def features(self, image):
    return cls(self.encoder(image))

  def __call__(self, image):
    """-> attribute logits."""
    return self.head(self.features(image))


class TextTeacher(nn.Module):
  config: TextConfig
  num_attributes: int

  def setup(self):
    self.encoder = TextEncoder(self.config)
    self.head = nn.Dense(self.num_attributes, kernel_init=default_kernel_init)

  def features(self, ids, mask):
    return cls(self.encoder(ids, mask))

  def __call__(self, ids, mask):
    return self.head(self.features(ids, mask))
