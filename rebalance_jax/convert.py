"""Weight conversion: other frameworks' checkpoints -> safetensors trees of our towers.

  python -m rebalance_jax.convert --format=hf_bert --source=/models/bert-base-uncased \\
      --output=weights/bert_text.safetensors --layers=0:6 --max_tokens=40

Formats:
  hf_bert   a Hugging Face BERT directory (config.json + model.safetensors or pytorch_model.bin)
            -> the `text` tower
            (--layers selects the encoder layers, e.g. 0:6 for the paper's text encoder; the
            position table is cut to --max_tokens), or with --part=fusion the fusion encoder
            (e.g. --layers=6:12; cross-attention from the checkpoint if it has one, else fresh)
  hf_clip_vision  a Hugging Face CLIP or CLIP-vision directory -> the `clip_vit` image tower
  swin      a Swin release file ({'model': state_dict}, e.g. swin_base_patch4_window7_224_22k.pth)
            -> the `swin` tower at --image_size, its relative-position tables resized to
            --window_size (the paper's: --image_size=384 --window_size=12)
  reference a trained model of the reference implementation (checkpoint_best.pth) -> the whole
            student (towers, fusion encoder, projections, ITM head, τ, τ2, λ), for
            --config.model.init: evaluate it (python -m rebalance_jax.evaluate --weights=...) or
            continue training from it

A format is a list of explicit name rules: each source tensor is mapped to a parameter or dropped
by a rule that says why, and every parameter of the target tower must be filled with the shape
the tower expects; any other tensor or parameter is an error that lists them. The output is what
a tower's `init` reads (`weights.load_safetensors`); the command prints the config fields that
match it. PyTorch pickles (`.pth`, `pytorch_model.bin`) are read with torch (the `convert` extra,
`weights_only=True`); only this module imports it.
"""

import json
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import safetensors.numpy
import scipy.interpolate
from absl import app, flags
from flax import traverse_util

from rebalance_jax import cli
from rebalance_jax.models import weights
from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers
from rebalance_jax.models.fusion import FusionConfig, FusionEncoder

DROP = None  # a rule's target: the tensor is not part of the tower


def read_pytorch(path: str, flag: str = "--source") -> tuple[dict[str, np.ndarray], dict]:
  """(the float32 tensors of a PyTorch checkpoint's state dict, its other top-level entries).
  The state dict is the file itself or its 'model' entry (Swin releases, the reference's
  checkpoints). Loaded with weights_only=True: tensors and plain containers, never arbitrary
  objects. Needs torch (the `convert` extra); nothing else in the project imports it."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise InputError(f"{flag}={path} is a PyTorch file; reading it needs torch: "
                     "pip install -e '.[convert]'") from None
  if not os.path.isfile(path):
    raise InputError(f"{flag}={path} does not exist")
  try:
    loaded = torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # pickle and torch raise many types for damaged or unsafe files
    raise InputError(f"{flag}={path}: not a loadable PyTorch checkpoint of tensors "
                     f"(read with weights_only=True): {e}") from e
  if not isinstance(loaded, dict):
    raise InputError(f"{flag}={path}: holds a {type(loaded).__name__}, not a state dict")
  state = loaded.get("model", loaded)
  extra = {k: v for k, v in loaded.items() if k != "model"} if "model" in loaded else {}
  if not isinstance(state, dict):
    raise InputError(f"{flag}={path}: its 'model' entry is a {type(state).__name__}, not a "
                     "state dict")
  others = sorted(k for k, v in state.items() if not isinstance(v, torch.Tensor))
  if others:
    raise InputError(f"{flag}={path}: state dict entries that are not tensors: {others[:8]}")
  return {k: v.detach().float().numpy() for k, v in state.items()}, extra


def read_hf_directory(path: str) -> tuple[dict, dict[str, np.ndarray]]:
  """(config.json, tensors) of a Hugging Face model directory: model.safetensors, else
  pytorch_model.bin (read with torch)."""
  config_path = os.path.join(path, "config.json")
  if not os.path.isfile(config_path):
    raise InputError(f"--source={path}: no config.json (expected a Hugging Face model directory)")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except ValueError as e:
    raise InputError(f"{config_path}: not valid JSON ({e})") from e
  tensors_path = os.path.join(path, "model.safetensors")
  if not os.path.isfile(tensors_path):
    pickle_path = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(pickle_path):
      return config, read_pytorch(pickle_path)[0]
    raise InputError(f"--source={path}: neither model.safetensors nor pytorch_model.bin")
  try:
    tensors = safetensors.numpy.load_file(tensors_path)
  except Exception as e:  # safetensors raises its own error types
    raise InputError(f"{tensors_path}: unreadable ({e})") from e
  return config, tensors


def hf_bert_text_fields(hf_config: dict, layers: range, max_tokens: int) -> dict:
  """The `text` tower fields that match a BERT config and a layer range."""
  for key in ("hidden_size", "num_attention_heads", "intermediate_size", "hidden_act"):
    if key not in hf_config:
      raise InputError(f"config.json has no {key!r}: not a BERT config")
  if hf_config["hidden_act"] != "gelu":
    raise InputError(f"config.json: hidden_act={hf_config['hidden_act']!r}; the text tower uses "
                     "BERT's exact gelu")
  if hf_config.get("type_vocab_size", 2) != 2:
    raise InputError(f"config.json: type_vocab_size={hf_config['type_vocab_size']}; the text "
                     "tower has 2 token types")
  if max_tokens > hf_config.get("max_position_embeddings", 512):
    raise InputError(f"--max_tokens={max_tokens} exceeds the checkpoint's "
                     f"{hf_config['max_position_embeddings']} positions")
  return {"width": hf_config["hidden_size"], "depth": len(layers),
          "num_heads": hf_config["num_attention_heads"],
          "mlp_dim": hf_config["intermediate_size"], "max_tokens": max_tokens}


def _from_linear(x: np.ndarray, kind: str, layout: str, num_heads: int) -> tuple[str, np.ndarray]:
  """A PyTorch Linear's weight (out, in) or bias -> ("kernel" | "bias", ours): a "plain" Dense,
  or an attention projection, "qkv" (in, heads, head_dim) or "out" (heads, head_dim, out)."""
  if kind == "bias":
    return "bias", x.reshape(num_heads, -1) if layout == "qkv" else x
  kernel = x.T
  if layout == "qkv":
    kernel = kernel.reshape(kernel.shape[0], num_heads, -1)
  elif layout == "out":
    kernel = kernel.reshape(num_heads, -1, kernel.shape[1])
  return "kernel", kernel


def _tower_shapes(spec: towers.TowerSpec) -> dict[str, tuple]:
  like = jax.eval_shape(lambda r: towers.init_params(spec, r), jax.random.key(0))
  return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(like).items()}


def _bert_rules(layers: range, num_heads: int, max_tokens: int, part: str = "text"):
  """(pattern, target) rules over BERT names without the 'bert.' prefix; a target maps the match
  and the (PyTorch-layout) tensor to {our path: array}, or is a string: why it is dropped.
  `part`: "text" (embeddings and layers) or "fusion" (layers, with their cross-attention)."""
  def layer(match):
    index = int(match.group(1))
    return f"layer{index - layers.start}" if index in layers else None

  def dense(path):
    def to_ours(m, x):
      if layer(m) is None:
        return None
      leaf, value = _from_linear(x, m.group("kind"), path[1], num_heads)
      return {f"{layer(m)}/{path[0].format(m)}/{leaf}": value}
    return to_ours

  def norm(ours):
    def to_ours(m, x):
      prefix = "" if ours == "embed_norm" else f"{layer(m)}/"
      if prefix and layer(m) is None:
        return None
      return {f"{prefix}{ours}/{'scale' if m.group('kind') in ('weight', 'gamma') else 'bias'}": x}
    return to_ours

  kind = r"(?P<kind>weight|bias|gamma|beta)"
  if part == "text":
    embeddings = [
        (r"embeddings\.word_embeddings\.weight", lambda m, x: {"word_embed/embedding": x}),
        (r"embeddings\.position_embeddings\.weight",
         lambda m, x: {"position_embed/embedding": x[:max_tokens]}),
        (r"embeddings\.token_type_embeddings\.weight", lambda m, x: {"type_embed/embedding": x}),
        (rf"embeddings\.LayerNorm\.{kind}", norm("embed_norm")),
        (r"encoder\.layer\.\d+\.crossattention\..*", "the text tower has no cross-attention"),
    ]
  else:
    embeddings = [
        (r"embeddings\..*", "the fusion encoder reads the text tower's states, not embeddings"),
        (rf"encoder\.layer\.(\d+)\.crossattention\.self\.(query|key|value)\.{kind}",
         dense(("cross_attention/{0[2]}", "qkv"))),
        (rf"encoder\.layer\.(\d+)\.crossattention\.output\.dense\.{kind}",
         dense(("cross_attention/out", "out"))),
        (rf"encoder\.layer\.(\d+)\.crossattention\.output\.LayerNorm\.{kind}",
         norm("cross_attention_norm")),
    ]
  return embeddings + [
      (rf"encoder\.layer\.(\d+)\.attention\.self\.(query|key|value)\.{kind}",
       dense(("attention/{0[2]}", "qkv"))),
      (rf"encoder\.layer\.(\d+)\.attention\.output\.dense\.{kind}",
       dense(("attention/out", "out"))),
      (rf"encoder\.layer\.(\d+)\.attention\.output\.LayerNorm\.{kind}", norm("attention_norm")),
      (rf"encoder\.layer\.(\d+)\.intermediate\.dense\.{kind}", dense(("mlp/fc1", "plain"))),
      (rf"encoder\.layer\.(\d+)\.output\.dense\.{kind}", dense(("mlp/fc2", "plain"))),
      (rf"encoder\.layer\.(\d+)\.output\.LayerNorm\.{kind}", norm("mlp_norm")),
      (r"pooler\..*", f"the pooler is not part of the {part} tower (it pools on its own)"),
      (r"cls\..*", f"pre-training heads are not part of the {part} tower"),
      (r"embeddings\.position_ids", "a buffer, not a weight"),
  ]


def _apply_rules(tensors: dict[str, np.ndarray], rules, layers: range, prefix: str = "bert."):
  """(our flat params, {dropped name: reason}); an unmatched tensor is an error. Rules match
  names without `prefix`."""
  params, dropped, unmatched = {}, {}, []
  for name, tensor in tensors.items():
    short = name[len(prefix):] if name.startswith(prefix) else name
    for pattern, target in rules:
      match = re.fullmatch(pattern, short)
      if match is None:
        continue
      if isinstance(target, str):
        dropped[name] = target
      else:
        mapped = target(match, np.asarray(tensor, np.float32))
        if mapped is None:
          dropped[name] = f"encoder layer outside --layers={layers.start}:{layers.stop}"
        else:
          params.update(mapped)
      break
    else:
      unmatched.append(name)
  if unmatched:
    raise InputError(f"{len(unmatched)} tensors match no rule of the format: "
                     f"{', '.join(unmatched[:8])}")
  return params, dropped


def _check_filled(params: dict, expected: dict, what: str, fresh: str | None = None) -> None:
  """Every expected name (but those containing `fresh`, which may all be absent) has the right
  shape."""
  optional = {k for k in expected if fresh and fresh in k}
  present = optional & set(params)
  missing = sorted(set(expected) - set(params) - (optional if not present else set()))
  wrong = sorted(f"{k}: {params[k].shape} from the checkpoint, {expected[k]} in the {what}"
                 for k in set(expected) & set(params) if params[k].shape != expected[k])
  if missing or wrong:
    raise InputError(f"the checkpoint does not fill the {what}: missing {missing[:8]}, "
                     f"wrong shapes {wrong[:8]}")


def _tree(params: dict):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})


def convert_hf_bert_text(hf_config: dict, tensors: dict[str, np.ndarray], layers: range,
                         max_tokens: int, vocab_size: int | None = None):
  """(params of the `text` tower, its fields, {dropped name: reason}) from a BERT checkpoint."""
  fields = hf_bert_text_fields(hf_config, layers, max_tokens)
  params, dropped = _apply_rules(tensors, _bert_rules(layers, fields["num_heads"], max_tokens),
                                 layers)
  vocab_size = vocab_size or params.get("word_embed/embedding", np.zeros((0,))).shape[0]
  spec = towers.spec_from_config({"kind": "text", **fields}, "--source", "text",
                                 vocab_size=vocab_size)
  _check_filled(params, _tower_shapes(spec), "text tower")
  return _tree(params), fields, dropped


def convert_hf_bert_fusion(hf_config: dict, tensors: dict[str, np.ndarray], layers: range):
  """(params of the fusion encoder, its config fields, {dropped name: reason}) from the layers
  `layers` of a BERT checkpoint. Their self-attention and feed-forward weights are BERT's; their
  cross-attention comes from the checkpoint when it has one (a trained model of the reference),
  else it is absent and the student initializes it fresh (METHOD.md §2)."""
  text = hf_bert_text_fields(hf_config, layers, 1)
  fields = {"depth": text["depth"], "num_heads": text["num_heads"], "mlp_dim": text["mlp_dim"]}
  params, dropped = _apply_rules(
      tensors, _bert_rules(layers, fields["num_heads"], 0, part="fusion"), layers)
  width = text["width"]
  image_width = params.get("layer0/cross_attention/key/kernel", np.zeros((width,))).shape[0]
  module = FusionEncoder(FusionConfig(**fields))
  like = jax.eval_shape(lambda r: module.init(
      r, jnp.zeros((1, 2, width)), jnp.ones((1, 2), jnp.int32), jnp.zeros((1, 3, image_width)),
      jnp.ones((1, 3), jnp.int32))["params"], jax.random.key(0))
  _check_filled(params, {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(like).items()},
                "fusion encoder", fresh="cross_attention")
  return _tree(params), fields, dropped


def convert_hf_clip_vision(hf_config: dict, tensors: dict[str, np.ndarray]):
  """(params of the `clip_vit` tower, its fields, {dropped name: reason}) from a Hugging Face CLIP
  (or CLIP vision) checkpoint; the text half and the projections are dropped."""
  c = hf_config.get("vision_config", hf_config)
  for key in ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
              "image_size", "patch_size"):
    if key not in c:
      raise InputError(f"config.json has no {key!r}: not a CLIP vision config")
  if c.get("hidden_act", "quick_gelu") != "quick_gelu":
    raise InputError(f"config.json: hidden_act={c['hidden_act']!r}; the clip_vit tower uses "
                     "quick_gelu")
  fields = {"image_size": c["image_size"], "patch_size": c["patch_size"],
            "width": c["hidden_size"], "depth": c["num_hidden_layers"],
            "num_heads": c["num_attention_heads"], "mlp_dim": c["intermediate_size"]}
  heads, layers = fields["num_heads"], range(fields["depth"])
  kind = r"(?P<kind>weight|bias)"
  leaf = lambda m: "scale" if m.group("kind") == "weight" else "bias"
  norm = lambda ours: lambda m, x: {f"{ours(m)}/{leaf(m)}": x}
  block = lambda m: f"block{m.group(1)}"

  def dense(name, layout):
    def to_ours(m, x):
      leaf, value = _from_linear(x, m.group("kind"), layout, heads)
      return {f"{block(m)}/{name(m)}/{leaf}": value}
    return to_ours

  qkv = {"q": "query", "k": "key", "v": "value"}
  rules = [
      (r"embeddings\.class_embedding", lambda m, x: {"cls": x}),
      (r"embeddings\.patch_embedding\.weight",
       lambda m, x: {"patch_embed/kernel": x.transpose(2, 3, 1, 0)}),
      (r"embeddings\.position_embedding\.weight", lambda m, x: {"pos_embed": x}),
      (r"embeddings\.position_ids", "a buffer, not a weight"),
      (rf"pre_layrnorm\.{kind}", norm(lambda m: "pre_norm")),
      (rf"post_layernorm\.{kind}", norm(lambda m: "norm")),
      (rf"encoder\.layers\.(\d+)\.layer_norm([12])\.{kind}",
       norm(lambda m: f"block{m.group(1)}/norm{m.group(2)}")),
      (rf"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.{kind}",
       dense(lambda m: f"attention/{qkv[m.group(2)]}", "qkv")),
      (rf"encoder\.layers\.(\d+)\.self_attn\.out_proj\.{kind}",
       dense(lambda m: "attention/out", "out")),
      (rf"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.{kind}",
       dense(lambda m: f"mlp/{m.group(2)}", "plain")),
      (r"text_model\..*", "the text half of CLIP is not part of the image tower"),
      (r"(visual|text)_projection\..*|logit_scale",
       "CLIP's projections are not part of the image tower (the student has its own)"),
  ]
  params, dropped = _apply_rules(tensors, rules, layers, prefix="vision_model.")
  spec = towers.spec_from_config({"kind": "clip_vit", **fields}, "--source", "image")
  _check_filled(params, _tower_shapes(spec), "clip_vit tower")
  return _tree(params), fields, dropped


# The reference's heads -> the student's parameters (METHOD.md §2; [ref] names, 'lamba' its own).
_REFERENCE_HEADS = {"vision_proj": "image_proj", "text_proj": "text_proj",
                    "sig_vision_proj": "teacher_image_proj", "sig_text_proj": "teacher_text_proj",
                    "itm_head.0": "itm_head/fc1", "itm_head.1": "itm_head/norm",
                    "itm_head.3": "itm_head/fc2"}
_REFERENCE_SCALARS = {"temp": "temp", "temp2": "temp2", "lamba": "lam"}


def convert_reference(tensors: dict[str, np.ndarray], image_size: int, max_tokens: int,
                      num_heads: int = 0):
  """(the whole student's params, {config section: fields}, {dropped name: reason}) from a trained
  model of the reference implementation (its `checkpoint_best.pth` state dict): the Swin
  `vision_encoder`, the BERT `text_encoder` whose layers from the first with cross-attention on
  are the fusion encoder, the projections, the teacher projections (`sig_*`), the ITM head and
  the scalars τ, τ2 and the raw λ. `num_heads`: the BERT's heads (0: width / 64, BERT's)."""
  vision = {k: v for k, v in tensors.items() if k.startswith("vision_encoder.")}
  if "vision_encoder.patch_embed.proj.weight" not in vision:
    raise InputError("no vision_encoder.patch_embed.proj.weight: the reference checkpoint's image "
                     "tower is not a Swin (only Swin reference checkpoints are converted)")
  image, image_fields, dropped = convert_swin(vision, image_size, prefix="vision_encoder.")
  text = {re.sub(r"^text_encoder\.(bert\.)?", "", k): v for k, v in tensors.items()
          if k.startswith("text_encoder.")}
  layers = {int(m.group(1)) for k in text if (m := re.match(r"encoder\.layer\.(\d+)\.", k))}
  cross = {int(m.group(1)) for k in text
           if (m := re.match(r"encoder\.layer\.(\d+)\.crossattention\.", k))}
  if not layers or not cross or cross != set(range(min(cross), max(layers) + 1)):
    raise InputError(f"text_encoder: layers {sorted(layers)} with cross-attention in "
                     f"{sorted(cross)}; expected the fusion layers to be the last ones")
  width = text["embeddings.word_embeddings.weight"].shape[1]
  bert = {"hidden_size": width, "num_attention_heads": num_heads or width // 64,
          "intermediate_size": text["encoder.layer.0.intermediate.dense.weight"].shape[0],
          "hidden_act": "gelu",
          "max_position_embeddings": text["embeddings.position_embeddings.weight"].shape[0]}
  fusion_start = min(cross)
  text_params, text_fields, text_dropped = convert_hf_bert_text(
      bert, {k: v for k, v in text.items() if not _in_layers(k, range(fusion_start, 1 + max(layers)))},
      range(fusion_start), max_tokens)
  fusion_params, fusion_fields, fusion_dropped = convert_hf_bert_fusion(
      bert, {k: v for k, v in text.items() if not k.startswith("embeddings.")
             and not _in_layers(k, range(fusion_start))}, range(fusion_start, max(layers) + 1))
  heads, head_dropped = _apply_rules(
      {k: v for k, v in tensors.items() if not k.startswith(("vision_encoder.", "text_encoder."))},
      _reference_head_rules(), range(0), prefix="")
  missing = sorted(set(_REFERENCE_SCALARS.values()) - set(heads)) + sorted(
      ours for ours in _REFERENCE_HEADS.values() if not any(k.startswith(ours + "/") for k in heads))
  if missing:
    raise InputError(f"the reference checkpoint has nothing for the student's {missing}")
  params = {**_tree(heads), "image_encoder": image, "text_encoder": text_params,
            "fusion_encoder": fusion_params}
  sections = {"model.image": {"kind": "swin", **image_fields}, "model.text": text_fields,
              "model.fusion": fusion_fields,
              "model": {"embed_dim": heads["image_proj/kernel"].shape[1]}}
  return params, sections, {**dropped, **text_dropped, **fusion_dropped, **head_dropped}


def _reference_head_rules():
  def head(ours):
    def to_ours(m, x):
      if m.group("kind") == "bias":
        return {f"{ours}/bias": x}
      return {f"{ours}/scale": x} if ours.endswith("norm") else {f"{ours}/kernel": x.T}
    return to_ours

  scalar = lambda ours: lambda m, x: {ours: x.reshape(())}
  return ([(rf"{re.escape(ref)}\.(?P<kind>weight|bias)", head(ours))
           for ref, ours in _REFERENCE_HEADS.items()] +
          [(re.escape(ref), scalar(ours)) for ref, ours in _REFERENCE_SCALARS.items()])


def _in_layers(name: str, span: range) -> bool:
  match = re.match(r"encoder\.layer\.(\d+)\.", name)
  return bool(match) and int(match.group(1)) in span


INTERPOLATIONS = ("geometric", "bicubic")


def resize_relative_position_table(table: np.ndarray, window: int, mode: str) -> np.ndarray:
  """A Swin bias table ((2w'-1)², heads) resized to `window` ((2w-1)², heads).

  "geometric" is the reference's loader (X-VLM, after BEiT): the source offsets are placed on a
  geometric progression spanning the target range and each head's table is fitted with an
  interpolating bicubic spline, evaluated at the integer target offsets (clamped at the edge).
  "bicubic" is Swin's own loader: PyTorch's bicubic resize (a = -0.75, align_corners=False)."""
  rows, heads = table.shape
  src, dst = math.isqrt(rows), 2 * window - 1
  if src * src != rows:
    raise InputError(f"a relative-position table of {rows} rows is not a square")
  if src == dst:
    return table
  grid = table.T.reshape(heads, src, src).astype(np.float64)
  if mode == "bicubic":
    weights = _bicubic_resize_matrix(src, dst)
    out = np.einsum("ij,hjk,lk->hil", weights, grid, weights)
  elif mode == "geometric":
    source = _geometric_offsets(src, dst)
    target = np.arange(-(dst // 2), dst // 2 + 0.1, 1.0)
    out = np.stack([scipy.interpolate.RectBivariateSpline(source, source, g, kx=3, ky=3, s=0)(
        target, target) for g in grid])
  else:
    raise InputError(f"--rel_pos_interpolation={mode!r} is not one of {INTERPOLATIONS}")
  return out.reshape(heads, dst * dst).T.astype(np.float32)


def _geometric_offsets(src: int, dst: int) -> np.ndarray:
  """The reference's source offsets: ±(1 + q + ... + q^(k-1)) for k = 1..src//2, with the ratio q
  found by bisection so that the outermost offset reaches dst//2."""
  half, low, high = src // 2, 1.01, 1.5
  while high - low > 1e-6:
    q = (low + high) / 2.0
    if (1.0 - q**half) / (1.0 - q) > dst // 2:
      high = q
    else:
      low = q
  distances = np.cumsum([q**i for i in range(half)])
  return np.concatenate([-distances[::-1], [0.0], distances])


def _bicubic_resize_matrix(src: int, dst: int) -> np.ndarray:
  """(dst, src): PyTorch's 1-D bicubic resize (a = -0.75, align_corners=False, edge clamped)."""
  def cubic(t):
    t, a = abs(t), -0.75
    if t <= 1:
      return ((a + 2) * t - (a + 3)) * t * t + 1
    return (((t - 5) * t + 8) * t - 4) * a if t < 2 else 0.0

  weights = np.zeros((dst, src))
  for i in range(dst):
    x = (i + 0.5) * src / dst - 0.5
    base = math.floor(x)
    for k in range(base - 1, base + 3):
      weights[i, min(max(k, 0), src - 1)] += cubic(x - k)
  return weights


def swin_release_fields(tensors: dict[str, np.ndarray], image_size: int,
                        window_size: int | None) -> dict:
  """The `swin` tower fields of a release state dict (names without prefix) at `image_size`;
  the window is the checkpoint's unless `window_size` is given."""
  try:
    patch = tensors["patch_embed.proj.weight"]
  except KeyError:
    raise InputError("no patch_embed.proj.weight: not a Swin state dict") from None
  blocks = {}
  for name in tensors:
    match = re.match(r"layers\.(\d+)\.blocks\.(\d+)\.", name)
    if match:
      blocks.setdefault(int(match.group(1)), set()).add(int(match.group(2)))
  if sorted(blocks) != list(range(len(blocks))) or not blocks:
    raise InputError(f"the Swin stages {sorted(blocks)} are not 0..N-1")
  table = lambda i: tensors[f"layers.{i}.blocks.0.attn.relative_position_bias_table"]
  source_window = (math.isqrt(table(0).shape[0]) + 1) // 2
  embed_dim = patch.shape[0]
  return {"image_size": image_size, "patch_size": patch.shape[2], "embed_dim": embed_dim,
          "depths": tuple(len(blocks[i]) for i in sorted(blocks)),
          "num_heads": tuple(table(i).shape[1] for i in sorted(blocks)),
          "window_size": window_size or source_window,
          "mlp_ratio": tensors["layers.0.blocks.0.mlp.fc1.weight"].shape[0] / embed_dim}


def _swin_rules(config, interpolation: str):
  """Rules over Swin release names (layers.N.blocks.M...)."""
  kind = r"(?P<kind>weight|bias)"
  leaf = lambda m: "scale" if m.group("kind") == "weight" else "bias"
  block = lambda m: f"stage{m.group(1)}_block{m.group(2)}"
  windows = [w for _, w in config.stage_windows()]

  def linear(name):
    def to_ours(m, x):
      ours, value = _from_linear(x, m.group("kind"), "plain", 1)
      return {f"{name(m)}/{ours}": value}
    return to_ours

  def table(m, x):
    return {f"{block(m)}/attention/relative_position_bias_table":
            resize_relative_position_table(x, windows[int(m.group(1))], interpolation)}

  blocks = r"layers\.(\d+)\.blocks\.(\d+)"
  return [
      (r"patch_embed\.proj\.weight", lambda m, x: {"patch_embed/kernel": x.transpose(2, 3, 1, 0)}),
      (r"patch_embed\.proj\.bias", lambda m, x: {"patch_embed/bias": x}),
      (rf"patch_embed\.norm\.{kind}", lambda m, x: {f"patch_norm/{leaf(m)}": x}),
      (rf"{blocks}\.(norm[12])\.{kind}", lambda m, x: {f"{block(m)}/{m.group(3)}/{leaf(m)}": x}),
      (rf"{blocks}\.attn\.(qkv|proj)\.{kind}",
       linear(lambda m: f"{block(m)}/attention/{m.group(3)}")),
      (rf"{blocks}\.attn\.relative_position_bias_table", table),
      (rf"{blocks}\.mlp\.(fc[12])\.{kind}", linear(lambda m: f"{block(m)}/mlp/{m.group(3)}")),
      (rf"layers\.(\d+)\.downsample\.norm\.{kind}",
       lambda m, x: {f"stage{m.group(1)}_merge/norm/{leaf(m)}": x}),
      (r"layers\.(\d+)\.downsample\.reduction\.(?P<kind>weight)",
       linear(lambda m: f"stage{m.group(1)}_merge/reduction")),
      (rf"norm\.{kind}", lambda m, x: {f"norm/{leaf(m)}": x}),
      (rf"{blocks}\.attn\.relative_position_index|{blocks}\.attn_mask",
       "a buffer, rebuilt from the window size"),
      (r"head\..*", "the ImageNet classifier is not part of the image tower"),
  ]


def convert_swin(tensors: dict[str, np.ndarray], image_size: int, window_size: int | None = None,
                 interpolation: str = "geometric", prefix: str = ""):
  """(params of the `swin` tower, its fields, {dropped name: reason}) from a Swin release state
  dict (names under `prefix`), at `image_size`, with the relative-position tables resized to the
  target window (`interpolation`: "geometric" as the reference's loader, or "bicubic")."""
  if interpolation not in INTERPOLATIONS:
    raise InputError(f"--rel_pos_interpolation={interpolation!r} is not one of {INTERPOLATIONS}")
  own = {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}
  fields = swin_release_fields(own, image_size, window_size)
  spec = towers.spec_from_config({"kind": "swin", **fields}, "--source", "image")
  params, dropped = _apply_rules(own, _swin_rules(spec.config, interpolation),
                                 range(len(fields["depths"])), prefix="")
  _check_filled(params, _tower_shapes(spec), "swin tower")
  return _tree(params), fields, {prefix + k: v for k, v in dropped.items()}


_FORMAT = flags.DEFINE_enum("format", None, ["hf_bert", "hf_clip_vision", "swin", "reference"],
                            "The source checkpoint's format.")
_SOURCE = flags.DEFINE_string("source", None, "The source checkpoint (hf_*: a directory; swin: "
                              "the release's .pth file; reference: its checkpoint_best.pth).")
_OUTPUT = flags.DEFINE_string("output", None, "The safetensors file to write.")
_PART = flags.DEFINE_enum("part", "text", ["text", "fusion"], "hf_bert: convert into the text "
                          "tower or into the fusion encoder (its cross-attention from the "
                          "checkpoint if it has one, else initialized fresh).")
_LAYERS = flags.DEFINE_string("layers", "", "hf_bert: encoder layers START:STOP (default: all).")
_MAX_TOKENS = flags.DEFINE_integer("max_tokens", 512, "hf_bert: the tower's max_tokens (the "
                                   "position table is cut to it).", lower_bound=1)
_IMAGE_SIZE = flags.DEFINE_integer("image_size", 384, "swin, reference: the image tower's input "
                                   "size (reference: the checkpoint's config image_res wins).",
                                   lower_bound=1)
_NUM_HEADS = flags.DEFINE_integer("num_heads", 0, "reference: the BERT's attention heads (0: "
                                  "width / 64, as BERT's).", lower_bound=0)
_WINDOW_SIZE = flags.DEFINE_integer("window_size", 0, "swin: the tower's window (0: the "
                                    "checkpoint's); the relative-position tables are resized.",
                                    lower_bound=0)
_INTERPOLATION = flags.DEFINE_enum("rel_pos_interpolation", "geometric", list(INTERPOLATIONS),
                                   "swin: how the relative-position tables are resized: "
                                   "'geometric' (the reference's loader) or 'bicubic' (Swin's).")


def _layer_range(text: str, num_layers: int) -> range:
  if not text:
    return range(num_layers)
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    raise InputError(f"--layers={text!r} is not START:STOP") from None
  if not 0 <= start < stop <= num_layers:
    raise InputError(f"--layers={text} must lie within the checkpoint's {num_layers} layers")
  return range(start, stop)


def run(format_: str, source: str, output: str, layers: str = "", max_tokens: int = 512,
        part: str = "text", image_size: int = 384, window_size: int = 0,
        interpolation: str = "geometric", num_heads: int = 0) -> dict:
  """Converts `source` into `output`; returns its `init` and the config fields it fits (for
  `reference`: {section: fields} of the whole student)."""
  vocab = os.path.join(source, "vocab.txt")
  if format_ == "reference":
    tensors, extra = read_pytorch(source)
    reference_config = extra.get("config")
    if isinstance(reference_config, dict) and "image_res" in reference_config:
      image_size = int(reference_config["image_res"])
    params, sections, dropped = convert_reference(tensors, image_size, max_tokens, num_heads)
    init_field, fields, vocab = "model.init", sections, "<the reference's bert vocab.txt>"
  else:
    if format_ == "swin":
      params, fields, dropped = convert_swin(read_pytorch(source)[0], image_size,
                                             window_size or None, interpolation)
      section, kind = "model.image", "swin"
    else:
      hf_config, tensors = read_hf_directory(source)
      if format_ == "hf_clip_vision":
        params, fields, dropped = convert_hf_clip_vision(hf_config, tensors)
        section, kind = "model.image", "clip_vit"
      else:
        span = _layer_range(layers, hf_config.get("num_hidden_layers", 0))
        if part == "text":
          params, fields, dropped = convert_hf_bert_text(hf_config, tensors, span, max_tokens)
        else:
          params, fields, dropped = convert_hf_bert_fusion(hf_config, tensors, span)
        section, kind = f"model.{part}", ""
    sections = {section: {"kind": kind, **fields} if kind else fields}
    init_field = f"{section}.init"
    if section != "model.text" or not os.path.exists(vocab):
      vocab = ""
  weights.save_safetensors(output, params)
  print(f"wrote {output}: {len(traverse_util.flatten_dict(params))} tensors; dropped "
        f"{len(dropped)} ({', '.join(sorted(set(dropped.values())))})")
  overrides = " ".join(f"--config.{section}.{k}={_flag_value(v)}"
                       for section, values in sections.items() for k, v in values.items())
  print(f"use it with: --config.{init_field}={output} {overrides}"
        + (f" --config.tokenizer.vocab_file={vocab}" if vocab else ""))
  return {"init": output, **fields}


def _flag_value(value) -> str:
  """A field value as a --config override takes it (tuples as '(2,2,18,2)')."""
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ")"
  return str(value)


def main(argv):
  cli.run_guarded("rebalance_jax.convert", argv, lambda: run(
      _FORMAT.value, _SOURCE.value, _OUTPUT.value, _LAYERS.value, _MAX_TOKENS.value,
      _PART.value, _IMAGE_SIZE.value, _WINDOW_SIZE.value, _INTERPOLATION.value, _NUM_HEADS.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["format", "source", "output"])
  app.run(main, flags_parser=cli.parse_flags)
