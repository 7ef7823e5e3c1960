"""Runs the frozen teachers over the training set once and stores their features (docs/method.md §3).

  python -m rebalance_jax.teachers --config=configs/flickr.py --workdir=runs/flickr

Writes config.teachers.features_dir (default <workdir>/teacher_features): one row per training
image and per caption, in chunks, with a manifest of what they are made from (teachers' weight
hashes, preprocessing, vocabulary, the annotation files). Sharded over every device and process
(run it like training on a pod); killed, it resumes at the first missing chunk when re-run.
Training reads these features and refuses ones made from anything else; it computes them itself
when they are absent, so this job is how to make them ahead of time or for several runs.
Teachers without converted `init` weights are pre-trained first (the demo's synthetic data).
"""

from absl import app, flags
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.config import spec
from rebalance_jax.recipe.teachers import feature_job

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file; override fields with --config.<field>=<value>.",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir (teacher pre-training "
                               "checkpoints; the default features directory).")


def main(argv):
  cli.run_guarded("rebalance_jax.teachers", argv,
                  lambda: feature_job.run_job(spec.from_config(_CONFIG.value), _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
