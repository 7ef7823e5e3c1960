"""`ruff check` passes over the repository (ruff.toml: unused imports and variables, undefined
names, import order, bugbear)."""

import os
import shutil
import subprocess
import sys

from conftest import REPO


def _ruff() -> list[str]:
  beside = os.path.join(os.path.dirname(sys.executable), "ruff")
  return [beside if os.path.exists(beside) else shutil.which("ruff") or "ruff"]


def test_ruff_check_passes():
  run = subprocess.run(_ruff() + ["check", "--no-cache", "."], cwd=REPO, capture_output=True,
                       text=True, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
