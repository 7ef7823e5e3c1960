"""Evaluates a run's student checkpoints with the paper's protocols (docs/method.md §7).

  python -m rebalance_jax.evaluate --config=configs/demo.py --workdir=runs/demo

Evaluates the checkpoint each stage selected (config.eval.select_on: by default the best on the
validation split; or --stages, --step), restoring only its parameters, or with --weights a
whole student's converted weights (a model trained with the reference implementation), and
writes <workdir>/eval/results.json, results.md (a paper-shaped table) and results.png (recall@K
curves and NDCG bars). The config must be the one the run was trained with.
"""

from absl import app, flags
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.config import spec
from rebalance_jax.recipe.evaluation import evaluate_run

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "The run's config file (with the same --config.<field> overrides).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The run's workdir.")
_STAGES = flags.DEFINE_list("stages", None, "Stages to evaluate (default: every stage of the "
                            "config).")
_WEIGHTS = flags.DEFINE_string("weights", None, "Evaluate this whole-student weights file instead "
                                "of the run's checkpoints (python -m rebalance_jax.convert "
                                "--format=reference: a model trained with the reference "
                                "implementation); the workdir only receives eval/.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: the one each stage selected "
                             "by config.eval.select_on).", lower_bound=0)


def _evaluate() -> None:
  config = _CONFIG.value
  if _WEIGHTS.value:  # the file says what model it is; nothing else of the config's is loaded
    config = spec.for_weights_file(config, _WEIGHTS.value)
  evaluate_run(spec.from_config(config), _WORKDIR.value, _STAGES.value, _STEP.value,
               _WEIGHTS.value)


def main(argv):
  cli.run_guarded("rebalance_jax.evaluate", argv, _evaluate)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
