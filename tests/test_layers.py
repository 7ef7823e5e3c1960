"""The package's layers (setup.cfg's import-linter contract) hold, no import cycle exists, and the
package root holds only the entry points and the few top-level modules."""

import os
import subprocess
import sys

import grimp
from conftest import REPO

ENTRY_POINTS = {"train", "evaluate", "prepare", "teachers", "convert", "ablation"}
TOP_LEVEL_MODULES = {"cli", "losses"}
PACKAGES = {"study", "recipe", "config", "training", "evaluators", "data", "models", "infra"}


def test_the_layers_contract_is_kept():
  # In a subprocess: import-linter's command reconfigures logging, which would disable the
  # loggers of every later test in this process.
  run = subprocess.run([sys.executable, "-c", (
      "import sys; from importlinter import cli; "
      "sys.exit(cli.lint_imports(config_filename=sys.argv[1], no_cache=True, no_logo=True))"),
      os.path.join(REPO, "setup.cfg")], cwd=REPO, capture_output=True, text=True, check=False)
  assert run.returncode == 0, run.stdout + run.stderr
  assert "Contracts: 1 kept, 0 broken." in run.stdout


def _cycles(edges: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, cycles = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in edges[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while not component or component[-1] != v:
        component.append(stack.pop())
        on_stack.discard(component[-1])
      if len(component) > 1:
        cycles.append(sorted(component))

  for module in sorted(edges):
    if module not in index:
      visit(module)
  return cycles


def test_no_import_cycles():
  graph = grimp.build_graph("rebalance_jax", exclude_type_checking_imports=True)
  edges = {m: set(graph.find_modules_directly_imported_by(m)) for m in graph.modules}
  assert _cycles(edges) == []
  # The check itself finds a cycle.
  assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]


def test_the_package_root_holds_entry_points_and_packages():
  root = os.path.join(REPO, "rebalance_jax")
  modules = {name[:-3] for name in os.listdir(root) if name.endswith(".py")} - {"__init__"}
  packages = {name for name in os.listdir(root)
              if os.path.isfile(os.path.join(root, name, "__init__.py"))}
  assert modules == ENTRY_POINTS | TOP_LEVEL_MODULES
  assert packages == PACKAGES
