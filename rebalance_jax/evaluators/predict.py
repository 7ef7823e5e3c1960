"""The predict contract: what evaluation needs of any model (a student, a teacher, a baseline).

Every function is pure in its `params` and jit-able. `embed_images` takes uint8 images and
`embed_texts` token ids from the predictor's own `encode_captions`; each returns {"emb":
L2-normalized embeddings, and, for a predictor with `match_logits`, "tokens" and "mask" (the
states the matching head reads)}. Cross-modal retrieval needs both embeddings in one space
(`shared_space`); otherwise each modality the predictor embeds gets its single-modal NDCG only.
"""

import dataclasses
import functools
from collections.abc import Callable

from rebalance_jax.losses import l2_normalize
from rebalance_jax.models import towers
from rebalance_jax.models.student import Student


@dataclasses.dataclass(frozen=True)
class Predictor:
  encode_captions: Callable            # captions -> {"ids", "mask"} host arrays
  embed_images: Callable | None        # (params, images) -> {"emb", ["tokens", "mask"]}
  embed_texts: Callable | None         # (params, ids, mask) -> {"emb", ["tokens", "mask"]}
  # (params, image tokens, image mask, text tokens, text mask, image_index) -> (B,) matching logit
  # per pair; image_index (G, B / G), or None for one image row per pair: see
  # `FusionEncoder`: the images given are the distinct ones and each pair's is picked from them.
  match_logits: Callable | None = None
  shared_space: bool = True  # image and text embeddings are comparable (cross-modal retrieval)

  @property
  def cross_modal(self) -> bool:
    return self.shared_space and self.embed_images is not None and self.embed_texts is not None


def student_predictor(model: Student, encode_captions: Callable) -> Predictor:
  """The student: ITC embeddings, and (unless dual-encoder) the ITM head over fused pairs."""
  image_config = model.config.image.config

  def embed_images(params, images):
    out, emb = model.apply({"params": params}, towers.preprocess_images(image_config, images),
                           method=Student.encode_image)
    return {"emb": emb, "tokens": out.tokens, "mask": out.mask}

  def embed_texts(params, ids, mask):
    out, emb = model.apply({"params": params}, ids, mask, method=Student.encode_text)
    return {"emb": emb, "tokens": out.tokens, "mask": out.mask}

  def match_logits(params, image_tokens, image_mask, text_tokens, text_mask, image_index=None):
    apply = functools.partial(model.apply, {"params": params})
    fused = apply(text_tokens, text_mask, image_tokens, image_mask, False, image_index,
                  method=Student.fuse)
    return apply(fused, method=Student.itm_logits)[:, 1]

  return Predictor(encode_captions, embed_images, embed_texts,
                   None if model.config.dual_encoder else match_logits)


def teacher_predictor(image_teacher=None, text_teacher=None) -> Predictor:
  """Frozen teachers (recipe.teachers.obtain.FrozenTeacher; params {"image", "text"}): each evaluated
  on its own modality (their spaces are unrelated), its normalized features as embeddings."""
  def embed(teacher, modality):
    if teacher is None:
      return None
    return lambda params, *inputs: {"emb": l2_normalize(teacher.features(params[modality],
                                                                         *inputs))}
  encode = None
  if text_teacher is not None:
    encode = lambda captions: text_teacher.encode(captions, train=False)
  return Predictor(encode, embed(image_teacher, "image"), embed(text_teacher, "text"),
                   shared_space=False)
