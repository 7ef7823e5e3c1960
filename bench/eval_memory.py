"""Memory of the evaluation's embedding passes at paper scale, from XLA's memory analysis.

  python bench/eval_memory.py [--config configs/flickr.py] [--batches 32 64 128 256]
      [--dtype float32|bfloat16]

For each evaluation batch size, compiles (does not run) the two passes `retrieval.encode` makes,
`predict.student_predictor`'s `embed_images` (the student's image tower on a batch of images at
config.data.image_size) and `embed_texts` (the text tower on a batch of data.max_tokens tokens),
on one device with abstract parameters (nothing is initialized or loaded), and prints XLA's
temporary, argument and output bytes. The image pass dominates; its temporaries grow linearly
with the batch. On an accelerator these are its memory; on a CPU host the process also holds
the runtime, the data pipeline and the evaluation's stored token states, so leave a few GB.
"""

import argparse

import jax
import jax.numpy as jnp
from eval_transfer import load_config  # bench/: `python bench/eval_memory.py` puts it on the path

from rebalance_jax.config import spec
from rebalance_jax.evaluators import predict
from rebalance_jax.models.student import Student, init_student

GIB = 2**30


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="configs/flickr.py")
  parser.add_argument("--batches", type=int, nargs="+", default=[32, 64, 128, 256])
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  args = parser.parse_args()

  config = load_config(args.config)
  for section in (config.model.image, config.model.text):
    section.dtype = args.dtype
  for field in ("model.image.init", "model.text.init", "model.fusion.init", "teachers.image.init",
                "teachers.text.init"):  # shapes only: the converted files are not needed
    *parents, key = field.split(".")
    node = config
    for part in parents:
      node = node[part]
    node[key] = ""
  exp = spec.from_config(config)
  model = Student(exp.student_config(vocab_size=30522))
  params = jax.eval_shape(lambda r: init_student(model, r), jax.random.key(0))
  predictor = predict.student_predictor(model, encode_captions=None)
  size, tokens = exp.data.image_size, exp.data.max_tokens
  print(f"{args.config}: image tower {exp.student.image.kind} at {size} px, text tower at "
        f"{tokens} tokens, {args.dtype} compute; XLA memory analysis on one device")
  for batch in args.batches:
    images = jax.ShapeDtypeStruct((batch, size, size, 3), jnp.uint8)
    ids = jax.ShapeDtypeStruct((batch, tokens), jnp.int32)
    for name, fn, inputs in (("images", predictor.embed_images, (images,)),
                             ("texts", predictor.embed_texts, (ids, ids))):
      memory = jax.jit(fn).lower(params, *inputs).compile().memory_analysis()
      print(f"batch {batch:4d} {name:6s}: temporaries {memory.temp_size_in_bytes / GIB:6.2f} GiB, "
            f"arguments {memory.argument_size_in_bytes / GIB:5.2f} GiB, outputs "
            f"{memory.output_size_in_bytes / GIB:5.2f} GiB", flush=True)


if __name__ == "__main__":
  main()
