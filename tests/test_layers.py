"""The package's layers and the absence of import cycles (setup.cfg's import-linter contracts)
hold, and the package root holds only the entry points and the few top-level modules."""

import os
import subprocess
import sys

from conftest import REPO

ENTRY_POINTS = {"train", "evaluate", "prepare", "teachers", "convert", "ablation"}
TOP_LEVEL_MODULES = {"cli", "losses"}
PACKAGES = {"study", "recipe", "config", "training", "evaluators", "data", "models", "infra"}


def test_the_import_contracts_are_kept():
  # In a subprocess: import-linter's command reconfigures logging, which would disable the
  # loggers of every later test in this process.
  run = subprocess.run([sys.executable, "-c", (
      "import sys; from importlinter import cli; "
      "sys.exit(cli.lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"),
      os.path.join(REPO, "setup.cfg")], cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "Contracts: 2 kept, 0 broken." in run.stdout


def test_the_package_root_holds_entry_points_and_packages():
  root = os.path.join(REPO, "rebalance_jax")
  modules = {name[:-3] for name in os.listdir(root) if name.endswith(".py")} - {"__init__"}
  packages = {name for name in os.listdir(root)
              if os.path.isfile(os.path.join(root, name, "__init__.py"))}
  assert modules == ENTRY_POINTS | TOP_LEVEL_MODULES
  assert packages == PACKAGES
