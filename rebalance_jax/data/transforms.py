"""Host-side image views of the real-data pipeline: decoding, the evaluation view and the augmented
training view, each a uint8 (size, size, 3) array (the towers normalize on device).

Follows the reference's retrieval transforms (X-VLM `dataset/__init__.py`, task "re"):
- test: Resize((size, size), bicubic), the aspect ratio not kept;
- train: RandomResizedCrop(size, scale=(0.5, 1), ratio=(3/4, 4/3), bicubic),
  RandomHorizontalFlip(0.5), RandomAugment(2, 7, isPIL=True, augs=[the ten ops of `_AUGS`])
  (X-VLM / ALBEF `dataset/randaugment.py`).
torchvision's and the reference's cv2 operations are rewritten with Pillow and numpy. All randomness
comes from the numpy Generator passed in, so a view is a pure function of the image and the
generator's state; it draws from other streams than torch / np.random, so the views match the
reference's in distribution, not sample for sample.
"""

import io
import math

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from rebalance_jax.infra.errors import InputError

_BICUBIC = Image.Resampling.BICUBIC
_CROP_RATIO = (3 / 4, 4 / 3)  # RandomResizedCrop's aspect-ratio range (width / height)
_CROP_TRIES = 10
# RandomAugment's constants: levels are out of 10, translations in pixels (10 at level 10), and the
# geometric ops fill what they uncover with gray.
_MAX_LEVEL = 10
_TRANSLATE_PIXELS = 10
_FILL = (128, 128, 128)


def decode(data: bytes, exif_orientation: str = "ignore") -> Image.Image:
  """Encoded image bytes -> RGB image, as the reference's Image.open(path).convert("RGB"): alpha
  dropped, grayscale / palette / CMYK converted, the EXIF orientation ignored (the pixels as
  stored) or, with "apply", the image turned upright as a photo viewer shows it."""
  try:
    with Image.open(io.BytesIO(data)) as image:
      if exif_orientation == "apply":
        return ImageOps.exif_transpose(image).convert("RGB")
      return image.convert("RGB")
  # Pillow signals bad data with OSError, SyntaxError, EOFError, struct.error, zlib.error, ...
  except Exception as e:
    raise InputError(f"not a decodable image ({type(e).__name__}: {e})") from e


def eval_view(image: Image.Image, size: int) -> np.ndarray:
  """The reference's test transform: resize to (size, size), bicubic -> uint8 (size, size, 3)."""
  _check_rgb(image)
  return np.array(image.resize((size, size), _BICUBIC))


def center_crop_view(image: Image.Image, size: int) -> np.ndarray:
  """CLIP's preprocessing: the shorter side resized to `size` (bicubic), then the centre
  (size, size) square -> uint8 (size, size, 3)."""
  _check_rgb(image)
  width, height = image.size
  short, long = sorted((width, height))
  long = int(size * long / short)  # truncated, as CLIP's processor does
  resized = image.resize((size, long) if width == short else (long, size), _BICUBIC)
  left, top = (resized.width - size) // 2, (resized.height - size) // 2
  return np.array(resized.crop((left, top, left + size, top + size)))


def train_view(image: Image.Image, rng: np.random.Generator, size: int,
               crop_scale: tuple[float, float] = (0.5, 1.0),
               randaugment: tuple[int, int] = (2, 7)) -> np.ndarray:
  """The reference's training transform -> uint8 (size, size, 3): a random resized crop (area
  fraction in crop_scale, bicubic), a horizontal flip with probability 0.5, then
  RandomAugment(*randaugment) ((0, 0): none)."""
  _check_rgb(image)
  top, left, height, width = _crop_box(image.width, image.height, rng, crop_scale)
  view = image.crop((left, top, left + width, top + height)).resize((size, size), _BICUBIC)
  if rng.random() < 0.5:
    view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
  return np.array(_rand_augment(view, rng, *randaugment))


def _check_rgb(image: Image.Image) -> None:
  if image.mode != "RGB":
    raise ValueError(f"expected an RGB image (see decode), got mode {image.mode!r}")


def _crop_box(width: int, height: int, rng: np.random.Generator, scale: tuple[float, float],
              ratio: tuple[float, float] = _CROP_RATIO) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop.get_params drawing from rng: (top, left, height, width).

  Up to 10 tries of an area fraction ~ U(scale) and a log aspect ratio ~ U(log ratio), placed
  uniformly where it fits; else the largest centred crop with its aspect ratio clipped to `ratio`.
  """
  area = width * height
  log_low, log_high = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(_CROP_TRIES):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_low, log_high))
    w = round(math.sqrt(target_area * aspect))
    h = round(math.sqrt(target_area / aspect))
    if 0 < w <= width and 0 < h <= height:
      return int(rng.integers(height - h + 1)), int(rng.integers(width - w + 1)), h, w
  if width / height < ratio[0]:
    w, h = width, round(width / ratio[0])
  elif width / height > ratio[1]:
    w, h = round(height * ratio[1]), height
  else:
    w, h = width, height
  return (height - h) // 2, (width - w) // 2, h, w


def _rand_augment(image: Image.Image, rng: np.random.Generator, num_ops: int,
                  level: int) -> Image.Image:
  """The reference's RandomAugment: num_ops ops drawn uniformly with replacement from _AUGS, each
  then applied with probability 0.5 at `level` (out of 10)."""
  for name in rng.choice(list(_AUGS), num_ops):
    if rng.random() <= 0.5:  # the reference skips an op when random() > 0.5
      image = _AUGS[name](image, level, rng)
  return image


def _signed(magnitude: float, rng: np.random.Generator) -> float:
  """magnitude with a random sign, as the reference's level -> argument maps draw it."""
  return -magnitude if rng.random() < 0.5 else magnitude


def _enhance_factor(level: int) -> float:
  return (level / _MAX_LEVEL) * 1.8 + 0.1


def _warp(image: Image.Image, forward) -> Image.Image:
  """cv2.warpAffine(image, forward, image size, INTER_LINEAR, borderValue=gray) with Pillow.

  `forward` (2x3) maps input to output pixel indices (pixel centres at integers), as the
  reference's matrices do; Pillow takes the inverse map, with pixel centres at +0.5. Differences
  from cv2: Pillow truncates the interpolated value where cv2 rounds it (with 1/32-pixel fixed-point
  coordinates), so pixels can come out 1 lower; and up to half a pixel outside the image Pillow
  repeats the edge pixel where cv2 blends it with the gray fill.
  """
  forward = np.asarray(forward, np.float64)
  inverse = np.linalg.inv(forward[:, :2])
  offset = 0.5 - inverse @ (forward[:, 2] + 0.5)
  data = (*inverse[0], offset[0], *inverse[1], offset[1])
  return image.transform(image.size, Image.Transform.AFFINE, data, Image.Resampling.BILINEAR,
                         fillcolor=_FILL)


def _shear_x(image: Image.Image, factor: float) -> Image.Image:
  return _warp(image, [[1, factor, 0], [0, 1, 0]])


def _shear_y(image: Image.Image, factor: float) -> Image.Image:
  return _warp(image, [[1, 0, 0], [factor, 1, 0]])


def _translate_x(image: Image.Image, pixels: float) -> Image.Image:
  return _warp(image, [[1, 0, -pixels], [0, 1, 0]])  # pixels > 0 moves the content left


def _translate_y(image: Image.Image, pixels: float) -> Image.Image:
  return _warp(image, [[1, 0, 0], [0, 1, -pixels]])  # pixels > 0 moves the content up


def _rotate(image: Image.Image, degrees: float) -> Image.Image:
  """Counter-clockwise about pixel index (width / 2, height / 2), as cv2.getRotationMatrix2D (half a
  pixel right of and below the true centre)."""
  cx, cy = image.width / 2, image.height / 2
  c, s = math.cos(math.radians(degrees)), math.sin(math.radians(degrees))
  return _warp(image, [[c, s, (1 - c) * cx - s * cy], [-s, c, s * cx + (1 - c) * cy]])


# X-VLM's training ops: name -> (image, level, rng) -> image. The reference's numpy ports of the
# Pillow ops, against these: Equalize equal; Brightness equal (its table trunc(v * factor));
# AutoContrast equal only where a channel's minimum is 0: else `-low` overflows in uint8 and the
# reference turns the whole channel white (salesforce/LAVIS#434); Sharpness blends with the same 3x3
# smoothing, the border pixels kept, but Pillow clips the extrapolated values where the reference's
# uint8 cast wraps them around (on x86: 260 -> 4, -3 -> 253).
_AUGS = {
  "Identity": lambda image, level, rng: image,
  "AutoContrast": lambda image, level, rng: ImageOps.autocontrast(image),
  "Equalize": lambda image, level, rng: ImageOps.equalize(image),
  "Brightness": lambda image, level, rng:
    ImageEnhance.Brightness(image).enhance(_enhance_factor(level)),
  "Sharpness": lambda image, level, rng:
    ImageEnhance.Sharpness(image).enhance(_enhance_factor(level)),
  "ShearX": lambda image, level, rng: _shear_x(image, _signed((level / _MAX_LEVEL) * 0.3, rng)),
  "ShearY": lambda image, level, rng: _shear_y(image, _signed((level / _MAX_LEVEL) * 0.3, rng)),
  "TranslateX": lambda image, level, rng:
    _translate_x(image, _signed((level / _MAX_LEVEL) * _TRANSLATE_PIXELS, rng)),
  "TranslateY": lambda image, level, rng:
    _translate_y(image, _signed((level / _MAX_LEVEL) * _TRANSLATE_PIXELS, rng)),
  "Rotate": lambda image, level, rng: _rotate(image, _signed((level / _MAX_LEVEL) * 30, rng)),
}
