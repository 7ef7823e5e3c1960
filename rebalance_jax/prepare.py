"""Prepares a real dataset once: parses its annotations, verifies every image and writes the TFDS
ArrayRecord dataset that training and evaluation read (data/real.py, data/prepared.py).

  python -m rebalance_jax.prepare --config=configs/flickr.py \\
      --config.data.image_root=/data/flickr30k/images \\
      --config.data.annotation_file=/data/flickr30k/dataset_flickr30k.json

Writes config.data.prepared_dir (default <cache_dir>/prepared/<name>-<hash of the annotation
files>); nothing is downloaded. A bad example (missing, corrupt or non-image file, an image without
captions, an empty or non-UTF-8 caption, a malformed annotation) stops it with a message naming
the file and the field, or with --config.data.on_bad_example=skip is left out, counted and
reported at the end. Training runs this itself when the prepared dataset is absent; a complete
one is reused.
"""

from absl import app, flags, logging
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.config import spec
from rebalance_jax.data import sources

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file of a real dataset (configs/flickr.py, coco.py, "
    "vizwiz.py); override fields with --config.<field>=<value>.", lock_config=True)


SHOWN = 10  # bad examples listed at the end


def report(directory: str, record: dict) -> None:
  """What `prepare` made: the splits' sizes and the bad examples it left out."""
  sizes = ", ".join(f"{name} {s['images']} images / {s['captions']} captions"
                    for name, s in record["splits"].items())
  logging.info("prepared %s in %s: %s", record["dataset"], directory, sizes)
  skipped = record["skipped"]
  if skipped["count"]:
    logging.warning("skipped %d bad examples (all of them in %s/prepared.json); the first:\n  %s",
                    skipped["count"], directory, "\n  ".join(skipped["messages"][:SHOWN]))
  print(f"{directory}\n{sizes}; skipped {skipped['count']} bad examples")


def main(argv):
  cli.run_guarded("rebalance_jax.prepare", argv,
                  lambda: report(*sources.prepare(spec.from_config(_CONFIG.value).data)))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config"])
  app.run(main, flags_parser=cli.parse_flags)
