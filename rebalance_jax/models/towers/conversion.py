"""What every weight converter shares: reading other frameworks' checkpoints, explicit name rules,
shape checks, and the registry of formats (`python -m rebalance_jax.convert --format=...`).

A format is a function `(source path, Options) -> Converted`. A tower's formats sit with the
tower, in its registry entry (`towers.TowerKind.converters`: swin, hf_bert, hf_clip_vision); a
format of the whole student (a model trained with the reference implementation) registers with
`register` (`models/reference.py`). A format is a list of name rules: each source tensor is mapped
to a parameter or dropped by a rule that says why, and every parameter of the target must be
filled with the shape it expects; any other tensor or parameter is an error that lists them.
PyTorch pickles (`.pth`, `pytorch_model.bin`) are read with torch (the `convert` extra,
`weights_only=True`); training never imports it.
"""

import dataclasses
import importlib
import json
import os
import re
import shlex
from collections.abc import Callable

import jax
import numpy as np
import safetensors.numpy
from flax import traverse_util

from rebalance_jax.infra.errors import InputError
from rebalance_jax.models import towers, weights


@dataclasses.dataclass(frozen=True)
class Options:
  """The convert command's options; each format reads those it needs."""
  layers: str = ""          # hf_bert: encoder layers START:STOP ('' = all)
  max_tokens: int = 512     # hf_bert, reference: the text tower's position table is cut to it
  part: str = "text"        # hf_bert: "text" (the text tower) or "fusion" (the fusion encoder)
  image_size: int = 384     # swin, reference: the image tower's input size
  window_size: int = 0      # swin: the tower's window (0: the checkpoint's)
  interpolation: str = "geometric"  # swin: how relative-position tables are resized
  num_heads: int = 0        # reference: the BERT's attention heads (0: width / 64)


@dataclasses.dataclass(frozen=True)
class Converted:
  params: dict               # the parameter tree written to the output file
  sections: dict[str, dict]  # {config section: the fields it fits}, e.g. {"model.image": {...}}
  init_field: str            # the config field that reads the file, e.g. "model.image.init"
  dropped: dict[str, str]    # {source tensor: why it is not used}
  vocab_file: str = ""       # the source's vocabulary, for config.tokenizer.vocab_file
  notes: tuple[str, ...] = ()  # what else a config using the file must match


Converter = Callable[[str, Options], Converted]
_WHOLE_MODEL: dict[str, Converter] = {}
# Modules that register whole-model formats when imported (imported on the first lookup: they
# build on this module).
_BUILTIN_MODULES = ("rebalance_jax.models.reference",)


def register(name: str, converter: Converter) -> None:
  """Makes `converter` the format `name` of a whole model (a tower's formats live in its
  registry entry)."""
  _WHOLE_MODEL[name] = converter


def formats() -> dict[str, Converter]:
  """{format: converter}: every tower's and every registered whole-model format."""
  for module in _BUILTIN_MODULES:
    importlib.import_module(module)
  found = {}
  for kind in towers.kinds():
    found.update(towers.get(kind).converters)
  return {**found, **_WHOLE_MODEL}


def convert(format_: str, source: str, output: str, options: Options) -> Converted:
  """Converts `source` (in format `format_`) and writes the parameters to `output`."""
  known = formats()
  if format_ not in known:
    raise InputError(f"--format={format_!r} is not one of {tuple(sorted(known))}")
  converted = known[format_](source, options)
  # The fields the file fits travel with it (evaluate --weights reads them).
  weights.save_safetensors(output, converted.params, converted.sections)
  return converted


_TOWER_ROLES = {"model.image.init": ("the student's image tower", "the image teacher",
                                      "teachers.image"),
                "model.text.init": ("the student's text tower", "the text teacher",
                                     "teachers.text")}


def usage_lines(converted: Converted, output: str) -> list[str]:
  """The config flags that use a converted file, quoted for a shell: for a tower, one line as the
  student's tower and one as the teacher of its modality; a placeholder the converter cannot fill
  (e.g. a vocabulary it was not given) is a note after them."""
  def flags(init_field: str, sections: dict) -> str:
    words = [f"--config.{init_field}={output}"] + [
        f"--config.{section}.{k}={flag_value(v)}" for section, values in sections.items()
        for k, v in values.items()]
    if converted.vocab_file and not converted.vocab_file.startswith("<"):
      words.append(f"--config.tokenizer.vocab_file={converted.vocab_file}")
    return " ".join(shlex.quote(w) for w in words)

  if converted.init_field in _TOWER_ROLES:
    student, teacher, section = _TOWER_ROLES[converted.init_field]
    (values,) = converted.sections.values()
    lines = [f"as {student}: {flags(converted.init_field, converted.sections)}",
             f"as {teacher}: {flags(f'{section}.init', {section: values})}"]
  else:
    lines = [f"with: {flags(converted.init_field, converted.sections)}"]
  if converted.vocab_file.startswith("<"):
    lines.append(f"and --config.tokenizer.vocab_file=PATH, PATH being "
                 f"{converted.vocab_file.strip('<>')}")
  return lines + list(converted.notes)


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
    raise InputError(f"{flag}={path} " + ("is a directory, not a checkpoint file"
                                          if os.path.isdir(path) else "does not exist"))
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


def from_linear(x: np.ndarray, kind: str, layout: str, num_heads: int) -> tuple[str, np.ndarray]:
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


def tower_shapes(spec: towers.TowerSpec) -> dict[str, tuple]:
  return flat_shapes(jax.eval_shape(lambda r: towers.init_params(spec, r), jax.random.key(0)))


def flat_shapes(params) -> dict[str, tuple]:
  """{'/'-joined name: shape} of a parameter tree."""
  return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(params).items()}


def apply_rules(tensors: dict[str, np.ndarray], rules, layers: range, prefix: str = "bert."):
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
        try:
          mapped = target(match, np.asarray(tensor, np.float32))
        except ValueError as e:  # a reshape into heads or a window that its size does not fit
          raise InputError(f"tensor {name} {tuple(np.shape(tensor))} does not fit this "
                           f"format's layout ({e})") from None
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


def check_filled(params: dict, expected: dict, what: str, fresh: str | None = None) -> None:
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


def tree(params: dict):
  return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in params.items()})


def layer_range(text: str, num_layers: int) -> range:
  if not text:
    return range(num_layers)
  try:
    start, stop = (int(x) for x in text.split(":"))
  except ValueError:
    raise InputError(f"--layers={text!r} is not START:STOP") from None
  if not 0 <= start < stop <= num_layers:
    raise InputError(f"--layers={text} must lie within the checkpoint's {num_layers} layers")
  return range(start, stop)


def flag_value(value) -> str:
  """A field value as a --config override takes it (tuples as '(2,2,18,2)')."""
  if isinstance(value, tuple):
    return "(" + ",".join(str(v) for v in value) + ")"
  return str(value)
