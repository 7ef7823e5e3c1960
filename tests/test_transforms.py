"""Known-answer tests of the host-side image views (rebalance_jax/data/transforms.py)."""

import collections
import io

import numpy as np
import pytest
from PIL import Image

from rebalance_jax.data import transforms
from rebalance_jax.infra.errors import InputError

GRAY = 128


def _random_image(height, width, seed=0):
  return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def _encode(image, fmt, **kwargs):
  buffer = io.BytesIO()
  image.save(buffer, fmt, **kwargs)
  return buffer.getvalue()


def _signs(op, image, magnitude, seeds=range(8)):
  """The op's results over seeds, checked to be op(+magnitude) or op(-magnitude); the signs seen."""
  name, direct = op
  candidates = {+1: np.array(direct(image, magnitude)), -1: np.array(direct(image, -magnitude))}
  seen = set()
  for seed in seeds:
    out = np.array(transforms._AUGS[name](image, 7, np.random.default_rng(seed)))
    matches = [sign for sign, expected in candidates.items() if np.array_equal(out, expected)]
    assert matches, name
    seen.update(matches)
  return seen


# decode


def test_decode_png_rgb_roundtrips():
  pixels = _random_image(7, 9)
  image = transforms.decode(_encode(Image.fromarray(pixels), "PNG"))
  assert image.mode == "RGB"
  np.testing.assert_array_equal(np.array(image), pixels)


def test_decode_converts_to_rgb():
  gray = np.arange(20, dtype=np.uint8).reshape(4, 5) * 12
  out = np.array(transforms.decode(_encode(Image.fromarray(gray), "PNG")))
  np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))

  rgba = np.concatenate([_random_image(4, 5), np.full((4, 5, 1), 7, np.uint8)], axis=-1)
  out = np.array(transforms.decode(_encode(Image.fromarray(rgba, "RGBA"), "PNG")))
  np.testing.assert_array_equal(out, rgba[..., :3])  # alpha dropped, not composited

  palette = Image.new("P", (3, 2))
  palette.putpalette([10, 20, 30, 200, 100, 0] + [0] * 762)
  palette.putdata([0, 1, 1, 0, 1, 0])
  out = np.array(transforms.decode(_encode(palette, "PNG")))
  np.testing.assert_array_equal(out[0], [[10, 20, 30], [200, 100, 0], [200, 100, 0]])

  for mode in ("RGB", "L", "CMYK"):
    jpeg = _encode(Image.new(mode, (6, 4)), "JPEG")
    image = transforms.decode(jpeg)
    assert image.mode == "RGB" and image.size == (6, 4)


@pytest.mark.parametrize("data", [b"", b"not an image", b"\x89PNG\r\n\x1a\n" + b"\0" * 40])
def test_decode_rejects_non_images(data):
  with pytest.raises(InputError, match="not a decodable image"):
    transforms.decode(data)


def test_exif_orientation_is_ignored_as_the_reference_does_or_applied():
  pixels = np.zeros((20, 30, 3), np.uint8)  # stored 30 wide, 20 high
  pixels[:, :10] = 255  # the stored left third is white
  exif = Image.Exif()
  exif[0x0112] = 6  # "rotate 90° clockwise to display" (a phone held upright)
  out = io.BytesIO()
  Image.fromarray(pixels).save(out, "PNG", exif=exif)
  stored = transforms.decode(out.getvalue())
  upright = transforms.decode(out.getvalue(), "apply")
  assert stored.size == (30, 20) and upright.size == (20, 30)
  np.testing.assert_array_equal(np.asarray(upright), np.rot90(np.asarray(stored), k=-1))
  assert np.asarray(upright)[:10].min() == 255  # the white third is now on top


@pytest.mark.parametrize("width, height", [(300, 200), (200, 300), (257, 256), (1000, 333)])
def test_center_crop_view_is_clips_preprocessing(width, height):
  transformers = pytest.importorskip("transformers")
  image = Image.fromarray(np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8))
  clip = transformers.CLIPImageProcessor(
      size={"shortest_edge": 24}, crop_size={"height": 24, "width": 24}, do_rescale=False,
      do_normalize=False)
  theirs = clip(images=image, return_tensors="np")["pixel_values"][0].transpose(1, 2, 0)
  np.testing.assert_array_equal(transforms.center_crop_view(image, 24), theirs)


def test_decode_rejects_truncated_image():
  data = _encode(Image.fromarray(_random_image(64, 64)), "PNG")
  with pytest.raises(InputError, match="not a decodable image"):
    transforms.decode(data[:len(data) // 2])


# eval_view


def test_eval_view_is_bicubic_resize_to_square():
  image = Image.fromarray(_random_image(30, 40))
  out = transforms.eval_view(image, 16)
  assert out.shape == (16, 16, 3) and out.dtype == np.uint8
  np.testing.assert_array_equal(out, np.array(image.resize((16, 16), Image.Resampling.BICUBIC)))
  np.testing.assert_array_equal(transforms.eval_view(Image.fromarray(_random_image(12, 12)), 12),
                                _random_image(12, 12))  # same size: unchanged


def test_views_require_rgb():
  with pytest.raises(ValueError, match="RGB"):
    transforms.eval_view(Image.new("L", (4, 4)), 4)
  with pytest.raises(ValueError, match="RGB"):
    transforms.train_view(Image.new("RGBA", (4, 4)), np.random.default_rng(0), 4)


# crop box (torchvision's RandomResizedCrop.get_params)


def test_crop_box_full_scale_on_square_is_whole_image():
  for seed in range(200):
    box = transforms._crop_box(100, 100, np.random.default_rng(seed), (1.0, 1.0))
    assert box == (0, 0, 100, 100)


def test_crop_box_within_scale_and_ratio_bounds():
  width, height = 640, 480
  fractions, ratios = [], []
  for seed in range(500):
    top, left, h, w = transforms._crop_box(width, height, np.random.default_rng(seed), (0.5, 1.0))
    assert 0 <= top and top + h <= height and 0 <= left and left + w <= width
    fractions.append(w * h / (width * height))
    ratios.append(w / h)
  # rounding each side to a pixel moves the fraction by < 0.5% and the ratio by < 0.6%
  assert 0.5 * 0.995 <= min(fractions) and max(fractions) <= 1.0
  assert 0.75 * 0.994 <= min(ratios) and max(ratios) <= 4 / 3 * 1.006
  assert min(fractions) < 0.55 and max(fractions) > 0.9  # the whole range is sampled


def test_crop_box_falls_back_to_central_crop():
  # no crop of 50-100% of a 1000x10 image has an aspect ratio in [3/4, 4/3]
  rng = np.random.default_rng(0)
  assert transforms._crop_box(1000, 10, rng, (0.5, 1.0)) == (0, 493, 10, 13)
  assert transforms._crop_box(10, 1000, rng, (0.5, 1.0)) == (493, 0, 13, 10)


# train_view


def test_train_view_deterministic_in_seed():
  image = Image.fromarray(_random_image(48, 64))
  first = transforms.train_view(image, np.random.default_rng(3), 32)
  assert first.shape == (32, 32, 3) and first.dtype == np.uint8
  np.testing.assert_array_equal(first, transforms.train_view(image, np.random.default_rng(3), 32))
  others = [transforms.train_view(image, np.random.default_rng(seed), 32) for seed in range(4, 8)]
  assert all(not np.array_equal(first, other) for other in others)


def test_train_view_flip_is_fliplr():
  pixels = _random_image(20, 20)
  image = Image.fromarray(pixels)
  seen = set()
  for seed in range(20):  # whole-image crop at the same size: the view is the image or its mirror
    out = transforms.train_view(image, np.random.default_rng(seed), 20, (1.0, 1.0), (0, 0))
    flipped = np.array_equal(out, np.fliplr(pixels))
    assert flipped or np.array_equal(out, pixels)
    seen.add(flipped)
  assert seen == {True, False}


def test_train_view_without_randaugment_is_resized_crop():
  image = Image.fromarray(_random_image(40, 40))
  plain = np.array(image.resize((24, 24), Image.Resampling.BICUBIC))
  mirrored = np.array(image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
                      .resize((24, 24), Image.Resampling.BICUBIC))
  for seed in range(6):
    out = transforms.train_view(image, np.random.default_rng(seed), 24, (1.0, 1.0), (0, 0))
    assert np.array_equal(out, plain) or np.array_equal(out, mirrored)


def test_train_view_composes_crop_flip_randaugment_in_order():
  image = Image.fromarray(_random_image(50, 70))
  for seed in range(5):
    rng = np.random.default_rng(seed)
    top, left, h, w = transforms._crop_box(70, 50, rng, (0.5, 1.0))
    view = image.crop((left, top, left + w, top + h)).resize((32, 32), Image.Resampling.BICUBIC)
    if rng.random() < 0.5:
      view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    expected = np.array(transforms._rand_augment(view, rng, 2, 7))
    np.testing.assert_array_equal(
        transforms.train_view(image, np.random.default_rng(seed), 32), expected)


# RandomAugment


def test_randaugment_op_list_is_xvlm():
  assert list(transforms._AUGS) == ["Identity", "AutoContrast", "Equalize", "Brightness",
                                    "Sharpness", "ShearX", "ShearY", "TranslateX", "TranslateY",
                                    "Rotate"]


def test_randaugment_samples_with_replacement_each_applied_half_the_time(monkeypatch):
  calls = []
  recorder = lambda name: lambda image, level, rng: calls.append((name, level)) or image
  monkeypatch.setattr(transforms, "_AUGS", {name: recorder(name) for name in transforms._AUGS})
  rng = np.random.default_rng(0)
  per_call = []
  for _ in range(2000):
    before = len(calls)
    transforms._rand_augment(Image.new("RGB", (2, 2)), rng, 2, 7)
    per_call.append(calls[before:])
  counts = collections.Counter(name for name, _ in calls)
  assert {level for _, level in calls} == {7}
  assert len(counts) == 10 and all(150 < n < 250 for n in counts.values())  # 2000 * 2 * 0.5 / 10
  assert 1800 < len(calls) < 2200  # each of the 2 ops applied with probability 0.5
  assert sum(len(c) == 2 and c[0] == c[1] for c in per_call) > 20  # the same op twice: replacement
  transforms._rand_augment(Image.new("RGB", (2, 2)), rng, 0, 0)  # (0, 0): no op
  assert len(calls) == sum(map(len, per_call))


def test_identity_returns_input():
  image = Image.fromarray(_random_image(5, 6))
  assert transforms._AUGS["Identity"](image, 7, np.random.default_rng(0)) is image


def test_brightness_level7_factor_1_36():
  rng = np.random.default_rng(0)
  constant = Image.new("RGB", (5, 4), (100, 50, 200))
  out = np.array(transforms._AUGS["Brightness"](constant, 7, rng))
  np.testing.assert_array_equal(out, np.broadcast_to([136, 68, 255], (4, 5, 3)))
  ramp = np.repeat(np.arange(256, dtype=np.uint8)[None, :, None], 3, axis=-1)
  out = np.array(transforms._AUGS["Brightness"](Image.fromarray(ramp), 7, rng))[0, :, 0]
  np.testing.assert_array_equal(out, np.minimum(np.arange(256) * 136 // 100, 255))  # trunc(1.36 v)


def test_sharpness_level7_blends_away_from_3x3_smoothing():
  pixels = _random_image(12, 14)
  out = np.array(transforms._AUGS["Sharpness"](Image.fromarray(pixels), 7, None)).astype(int)
  kernel = np.ones((3, 3)) / 13
  kernel[1, 1] = 5 / 13
  x = pixels.astype(float)
  smooth = sum(kernel[a, b] * x[a:a + 10, b:b + 12] for a in range(3) for b in range(3))
  smooth = np.floor(smooth + 0.5)
  expected = np.clip(np.trunc(smooth + 1.36 * (x[1:-1, 1:-1] - smooth)), 0, 255)
  np.testing.assert_allclose(out[1:-1, 1:-1], expected, atol=1)  # float32 vs float64 rounding
  np.testing.assert_array_equal(out[0], pixels[0])  # border pixels kept
  np.testing.assert_array_equal(out[:, -1], pixels[:, -1])
  constant = Image.new("RGB", (6, 6), (30, 140, 250))
  out = transforms._AUGS["Sharpness"](constant, 7, None)
  assert out.getextrema() == ((30, 30), (140, 140), (250, 250))


def test_autocontrast_stretches_range_to_full():
  values = np.linspace(51, 102, 30).astype(np.uint8).reshape(5, 6)  # range 51: scale 5 exactly
  pixels = np.stack([values, values, np.full_like(values, 77)], axis=-1)
  out = np.array(transforms._AUGS["AutoContrast"](Image.fromarray(pixels), 7, None))
  np.testing.assert_array_equal(out[..., 0], (values.astype(int) - 51) * 5)
  assert out[..., 0].min() == 0 and out[..., 0].max() == 255
  np.testing.assert_array_equal(out[..., 2], 77)  # a constant channel is left alone


def test_equalize_spreads_uniform_histogram():
  values = np.repeat(np.arange(64, dtype=np.uint8), 255).reshape(255, 64)  # 0..63, 255 pixels each
  out = np.array(transforms._AUGS["Equalize"](Image.fromarray(values).convert("RGB"), 7, None))
  # Pillow's (and the reference's) table: step = (64 * 255 - 255) // 255 = 63,
  # v -> (step // 2 + 255 v) // step
  np.testing.assert_array_equal(out[..., 1], (31 + 255 * values.astype(int)) // 63)
  assert out.min() == 0 and out.max() == 255


def test_translate_level7_is_seven_pixels_with_gray_fill():
  pixels = _random_image(10, 12)
  image = Image.fromarray(pixels)
  out = np.array(transforms._translate_x(image, 7))  # +7: content moves left
  np.testing.assert_array_equal(out[:, :5], pixels[:, 7:])
  np.testing.assert_array_equal(out[:, 5:], GRAY)
  out = np.array(transforms._translate_y(image, -7))  # -7: content moves down
  np.testing.assert_array_equal(out[7:], pixels[:3])
  np.testing.assert_array_equal(out[:7], GRAY)
  for op in [("TranslateX", transforms._translate_x), ("TranslateY", transforms._translate_y)]:
    assert _signs(op, image, 7.0) == {+1, -1}


def test_shear_maps_row_y_by_factor_times_y():
  pixels = _random_image(9, 12)
  out = np.array(transforms._shear_x(Image.fromarray(pixels), 0.25))  # x' = x + 0.25 y
  np.testing.assert_array_equal(out[0], pixels[0])
  np.testing.assert_array_equal(out[4, 1:], pixels[4, :-1])
  np.testing.assert_array_equal(out[8, 2:], pixels[8, :-2])
  np.testing.assert_array_equal(out[8, :2], GRAY)
  out = np.array(transforms._shear_y(Image.fromarray(pixels), 0.25))  # y' = y + 0.25 x
  np.testing.assert_array_equal(out[:, 0], pixels[:, 0])
  np.testing.assert_array_equal(out[2:, 8], pixels[:-2, 8])


def test_shear_level7_of_constant_image_is_constant_but_fill():
  image = Image.new("RGB", (40, 30), (10, 200, 60))
  for op in [("ShearX", transforms._shear_x), ("ShearY", transforms._shear_y)]:
    assert _signs(op, image, 0.21) == {+1, -1}
  out = np.array(transforms._shear_x(image, 0.21))
  is_fill = (out == GRAY).all(-1)
  assert ((out == [10, 200, 60]).all(-1) | is_fill).all()  # no blending at the edge
  assert not is_fill[0].any() and is_fill[29, :6].all()  # row y loses its first ~0.21 y pixels
  assert abs(is_fill.sum(-1) - 0.21 * np.arange(30)).max() <= 1


def test_rotate_is_counter_clockwise_about_cv2_centre():
  pixels = _random_image(8, 8)
  out = np.array(transforms._rotate(Image.fromarray(pixels), 90)).astype(int)
  # about pixel index (4, 4), not (3.5, 3.5): np.rot90 moved down a row; cos(90°) ~ 6e-17 costs
  # at most 1 in the truncated interpolation
  np.testing.assert_allclose(out[1:], np.rot90(pixels)[:-1], atol=1)
  np.testing.assert_array_equal(out[0], GRAY)


def test_rotate_level7_of_constant_image():
  image = Image.new("RGB", (31, 31), (0, 90, 255))
  assert _signs(("Rotate", transforms._rotate), image, 21.0) == {+1, -1}
  out = np.array(transforms._rotate(image, 21.0))
  assert ((out == [0, 90, 255]).all(-1) | (out == GRAY).all(-1)).all()
  np.testing.assert_array_equal(out[15, 15], [0, 90, 255])
  for corner in [out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]]:
    np.testing.assert_array_equal(corner, GRAY)
