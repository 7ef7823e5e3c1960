"""JAX's persistent compilation cache, made safe for XLA:CPU programs with collectives.

XLA:CPU (jaxlib 0.10.2; jax 0.12 too) loads a cached executable that has a collective inside a
while, conditional or call body unsoundly: deserializing the nested thunks gives those collectives
a communicator resource of their own instead of the one every collective of the program shares,
so a device may run such a collective (the ring `ppermute` loop of the chunked losses) at the same
time as a top-level one (an all-to-all). The devices then wait on each other in different
rendezvous until XLA's timeout aborts the process (SIGABRT). Freshly compiled executables order
all their collectives and are sound. `bench/cpu_cache_collectives_repro.py` reproduces it.

`guard_cpu_collectives()` keeps exactly those executables out of the cache (neither written nor
read; they are compiled every time); everything else keeps using it. The entry points enable the
cache with the guard (`--compilation_cache_dir`); the tests do too.
"""

import os
import re

import jax
from absl import flags, logging

_CACHE_DIR = flags.DEFINE_string(
    "compilation_cache_dir", "~/.cache/rebalance_jax/xla",
    "JAX's persistent compilation cache (a rerun compiles faster); '' turns it off.")

# A collective instruction in HLO text: "<shape> all-to-all(...", "<shape> all-reduce-start(...".
_COLLECTIVE = re.compile(r"\s(?:all-reduce|all-gather|all-to-all|ragged-all-to-all|reduce-scatter|"
                         r"collective-permute|collective-broadcast|send|recv)(?:-start)?\(")


def collective_in_nested_computation(executable) -> bool:
  """Whether a compiled executable has a collective outside its ENTRY computation (in a while,
  conditional or call body)."""
  for module in executable.hlo_modules():
    in_entry = False
    for line in module.to_string().splitlines():
      if line.endswith("{") and not line.startswith(" "):  # a computation's header line
        in_entry = line.startswith("ENTRY ")
      elif not in_entry and _COLLECTIVE.search(line):
        return True
  return False


def guard_cpu_collectives() -> None:
  """Keeps CPU executables with nested collectives out of the persistent cache (idempotent). If
  JAX's cache internals are not where this expects them, turns the persistent cache off instead:
  no cache beats an abort."""
  try:
    from jax._src import compilation_cache  # pylint: disable=import-outside-toplevel
    get, put = compilation_cache.get_executable_and_time, compilation_cache.put_executable_and_time
  except (ImportError, AttributeError):
    jax.config.update("jax_enable_compilation_cache", False)
    return
  if getattr(get, "guards_cpu_collectives", False):
    return

  def unsafe(backend, executable) -> bool:
    if getattr(backend, "platform", None) != "cpu":
      return False
    try:
      return collective_in_nested_computation(executable)
    except Exception:  # noqa: BLE001 -- cannot tell: do not cache
      return True

  def get_executable_and_time(cache_key, compile_options, backend, *args, **kwargs):
    executable, compile_time = get(cache_key, compile_options, backend, *args, **kwargs)
    if executable is not None and unsafe(backend, executable):
      return None, None  # an entry written without the guard: compile afresh
    return executable, compile_time

  def put_executable_and_time(cache_key, module_name, executable, backend, *args, **kwargs):
    if not unsafe(backend, executable):
      put(cache_key, module_name, executable, backend, *args, **kwargs)

  get_executable_and_time.guards_cpu_collectives = True
  compilation_cache.get_executable_and_time = get_executable_and_time
  compilation_cache.put_executable_and_time = put_executable_and_time


def enable_from_flags() -> None:
  """Turns the persistent cache on at --compilation_cache_dir, with the guard."""
  if not _CACHE_DIR.value:
    return
  guard_cpu_collectives()
  directory = os.path.expanduser(_CACHE_DIR.value)
  jax.config.update("jax_compilation_cache_dir", directory)
  logging.info("persistent compilation cache: %s", directory)
