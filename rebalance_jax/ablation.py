"""The ablation study: every arm of config.study over its seeds, then report.md and its figures.

  python -m rebalance_jax.ablation --config=configs/ablation.py --workdir=runs/ablation

Runs are trained one after another (`study.runner.run_study`); re-running the command skips the
finished
ones and resumes an interrupted one. The workdir ends up with:
  <student>/<level>/seed<k>/   one trunk per (student, imbalance level, seed): a training
                               workdir (recipe/phases.py) with stage 1 and each arm's stage, and
                               study/<arm>.json, each run's record
  study.json                   every run's record
  report.md, figures/          the tables (mean ± std over seeds, paired differences against
                               the equal-compute baseline) and figures
The study runs in one process: its runs are small, and trained one after another.
"""

from absl import app, flags
from ml_collections import config_flags

from rebalance_jax import cli
from rebalance_jax.study import runner

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Study config file, e.g. configs/ablation.py (or configs/ablation.py:quick). "
    "Override any field with --config.<field>=<value> (the study's own: --config.study.<field>).",
    lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Directory of the study's runs and report.")


def main(argv):
  cli.run_guarded("rebalance_jax.ablation", argv,
                  lambda: runner.run_study(_CONFIG.value, _WORKDIR.value))


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main, flags_parser=cli.parse_flags)
