"""Trains the method end to end: teachers, teacher features, every stage, evaluation.

  python -m rebalance_jax.train --config=configs/demo.py --workdir=runs/demo

The config is read once (`spec.from_config`); its stages run in `init_from` order (`recipe.phases.run`).
Each phase resumes from what the workdir already holds, so re-running the same command after an
interruption continues where it stopped. The workdir's layout is in rebalance_jax/recipe/phases.py.
"""

from absl import app, flags
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.config import spec
from rebalance_jax.recipe import phases

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Experiment config file, e.g. configs/demo.py (or configs/demo.py:tiny). "
    "Override any field with --config.<field>=<value>.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and results.")


def main(argv):
  cli.run_guarded("rebalance_jax.train", argv,
                  lambda: phases.run(spec.from_config(_CONFIG.value), _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
