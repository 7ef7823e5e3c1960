"""The cross-modal student (docs/method.md §2) and its learnable scalars.

One module holds every student parameter of every stage: the image and text towers (any registered
kinds), projection heads, fusion encoder and ITM head (unless dual-encoder), the teacher
projections U_v, U_t the distillation terms use, and the scalars τ, τ2, λ. Its methods are the
pieces the objective and the predict contract call; `__call__` only initializes. Towers and heads
compute in their configured dtype; projections, scalars and everything after are float32.
"""

import dataclasses
import math

import flax.linen as nn
import jax
import jax.numpy as jnp

from rebalance_jax.infra.errors import InputError
from rebalance_jax.losses import l2_normalize
from rebalance_jax.models import towers, weights
from rebalance_jax.models.fusion import FusionConfig, FusionEncoder, ItmHead
from rebalance_jax.models.layers import default_kernel_init

# The parameter subtrees of the distillation terms (docs/method.md §5: fresh in stage 2).
DISTILLATION_PARAMS = ("teacher_image_proj", "teacher_text_proj", "lam", "temp2")
# The student's towers and where each one's `init` weights go in its parameter tree.
TOWER_PARAMS = {"image": "image_encoder", "text": "text_encoder"}


@dataclasses.dataclass(frozen=True)
class StudentConfig:
  image: towers.TowerSpec
  text: towers.TowerSpec
  fusion: FusionConfig = FusionConfig()
  fusion_init: str = ""  # converted fusion weights (convert --part=fusion); '' = random
  init: str = ""  # the whole student's converted weights (convert --format=reference)
  embed_dim: int = 256
  dual_encoder: bool = False
  image_teacher_dim: int = 1024
  text_teacher_dim: int = 768
  temp_init: float = 0.07
  temp2_init: float = 0.07
  lam_init: float = 0.5
  lambda_mode: str = "raw"  # "raw", "sigmoid" or "fixed": how λ is read (losses.fusion_weight)


def _constant(value: float):
  return lambda key, shape=(): jnp.full(shape, value, jnp.float32)


class Student(nn.Module):
  config: StudentConfig

  def setup(self):
    c = self.config
    dense = lambda name: nn.Dense(c.embed_dim, kernel_init=default_kernel_init, name=name)
    self.image_encoder = c.image.build()
    self.text_encoder = c.text.build()
    self.image_proj = dense("image_proj")
    self.text_proj = dense("text_proj")
    self.teacher_image_proj = dense("teacher_image_proj")
    self.teacher_text_proj = dense("teacher_text_proj")
    if not c.dual_encoder:
      self.fusion_encoder = FusionEncoder(c.fusion)
      self.itm_head = ItmHead()
    # λ is stored so that the configured mode reads it as lam_init.
    lam = c.lam_init if c.lambda_mode != "sigmoid" else math.log(c.lam_init / (1.0 - c.lam_init))
    self.temp = self.param("temp", _constant(c.temp_init))
    self.temp2 = self.param("temp2", _constant(c.temp2_init))
    self.lam = self.param("lam", _constant(lam))

  def encode_image(self, images, train: bool = False):
    """Preprocessed images -> (TowerOutput, normalized embeddings v (B, embed_dim))."""
    out = self.image_encoder(images, train)
    return out, l2_normalize(self.image_proj(out.pooled))

  def encode_text(self, ids, mask, train: bool = False):
    """-> (TowerOutput, normalized embeddings t (B, embed_dim))."""
    out = self.text_encoder(ids, mask, train)
    return out, l2_normalize(self.text_proj(out.pooled))

  def fuse(self, text_hidden, text_mask, image_tokens, image_mask, train: bool = False,
           image_index=None):
    """Fusion encoder [CLS] m for each (text, image) row pair; with `image_index`, the rows' images
    are picked from the distinct images given (`FusionEncoder`)."""
    return self.fusion_encoder(text_hidden, text_mask, image_tokens, image_mask, train,
                               image_index)[:, 0]

  def itm_logits(self, fused_cls):
    return self.itm_head(fused_cls)

  def project_teachers(self, image_teacher_features, text_teacher_features):
    """Projected teacher embeddings ṽ = l2(U_v g^v), t̃ = l2(U_t g^t)."""
    return (l2_normalize(self.teacher_image_proj(image_teacher_features)),
            l2_normalize(self.teacher_text_proj(text_teacher_features)))

  def scalars(self):
    """The raw learnable scalars {temp, temp2, lam}."""
    return {"temp": self.temp, "temp2": self.temp2, "lam": self.lam}

  def __call__(self, images, ids, mask, image_teacher_features, text_teacher_features):
    """Touches every parameter (for `init`); returns the pieces of one forward pass."""
    image, v = self.encode_image(images)
    text, t = self.encode_text(ids, mask)
    out = {"v": v, "t": t, "teachers": self.project_teachers(image_teacher_features,
                                                           text_teacher_features),
           "scalars": self.scalars()}
    if not self.config.dual_encoder:
      out["itm"] = self.itm_logits(self.fuse(text.tokens, mask, image.tokens, image.mask))
    return out


def init_student(model: Student, rng: jax.Array, batch_size: int = 2):
  """Random initial parameters of `model` from dummy inputs shaped by its config."""
  c = model.config
  (images,) = towers.dummy_inputs(c.image, batch_size)
  ids, mask = towers.dummy_inputs(c.text, batch_size)
  # One compiled program: Flax's init run op by op compiles every op on its own (seconds).
  return jax.jit(model.init)(rng, images, ids, mask, jnp.zeros((batch_size, c.image_teacher_dim)),
                             jnp.zeros((batch_size, c.text_teacher_dim)))["params"]


def with_tower_weights(model: Student, params, field_prefix: str = "config.model"):
  """`params` replaced by the whole student's converted weights (`init`), or else with each tower
  whose spec has `init` replaced by its converted weights, and the fusion encoder's (its
  cross-attention kept fresh when the file has none)."""
  if model.config.init:
    try:
      return weights.load_safetensors(model.config.init, params)
    except InputError as e:
      raise InputError(f"{field_prefix}.init={model.config.init!r}: {e}") from None
  params = dict(params)
  for modality, subtree in TOWER_PARAMS.items():
    spec = getattr(model.config, modality)
    if spec.init:
      params[subtree] = towers.load_init(spec, params[subtree], f"{field_prefix}.{modality}")
  c = model.config
  if c.fusion_init and not c.dual_encoder:
    try:
      params["fusion_encoder"] = weights.load_safetensors(c.fusion_init, params["fusion_encoder"],
                                                          fresh="cross_attention")
    except InputError as e:
      raise InputError(f"{field_prefix}.fusion.init={c.fusion_init!r}: {e}") from None
  return params
