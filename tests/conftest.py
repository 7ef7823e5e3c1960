"""Test session setup: 8 fake CPU devices and a persistent compilation cache, set before JAX loads."""

import importlib.util
import os
import re
import sys
import tempfile

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
# "_v2": entries written before the guard below may hold the executables it now refuses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "rebalance_jax_test_xla_cache_v2"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

# A collective instruction in XLA's HLO text: "<shape> all-to-all(...", "<shape> all-reduce-start(...".
_COLLECTIVE = re.compile(r"\s(?:all-reduce|all-gather|all-to-all|ragged-all-to-all|reduce-scatter|"
                         r"collective-permute|collective-broadcast|send|recv)(?:-start)?\(")


def _collective_in_nested_computation(executable) -> bool:
  """Whether a compiled module has a collective outside its ENTRY computation (in a while,
  conditional or call body)."""
  for module in executable.hlo_modules():
    in_entry = False
    for line in module.to_string().splitlines():
      if line.endswith("{") and not line.startswith(" "):  # a computation's header line
        in_entry = line.startswith("ENTRY ")
      elif not in_entry and _COLLECTIVE.search(line):
        return True
  return False


def _keep_unsafe_cpu_executables_out_of_the_persistent_cache():
  """XLA:CPU loads a cached executable with a collective inside a while/conditional/call body
  unsoundly: deserializing the nested thunk sequence gives its collectives a new communicator
  resource instead of the one every other collective of the program shares, so a device may run
  such a collective at the same time as a top-level one (e.g. the ring `ppermute` loop of the
  chunked losses next to an all-to-all). With 8 fake devices on the CPU client's small thread
  pool, the devices then wait on each other's collectives until XLA's rendezvous timeout aborts
  the process (SIGABRT). Freshly compiled executables order all collectives and are fine.
  See bench/cpu_cache_collectives_repro.py. These executables are compiled every time (neither
  written nor read); everything else keeps using the cache."""
  try:
    from jax._src import compilation_cache
    get, put = compilation_cache.get_executable_and_time, compilation_cache.put_executable_and_time
  except (ImportError, AttributeError):  # jax internals moved: no cache beats an abort
    jax.config.update("jax_enable_compilation_cache", False)
    return

  def unsafe(backend, executable) -> bool:
    if getattr(backend, "platform", None) != "cpu":
      return False
    try:
      return _collective_in_nested_computation(executable)
    except Exception:  # pylint: disable=broad-except  (cannot tell: do not cache)
      return True

  def get_executable_and_time(cache_key, compile_options, backend, *args, **kwargs):
    executable, compile_time = get(cache_key, compile_options, backend, *args, **kwargs)
    if executable is not None and unsafe(backend, executable):
      return None, None  # an entry written without this guard: compile afresh
    return executable, compile_time

  def put_executable_and_time(cache_key, module_name, executable, backend, *args, **kwargs):
    if not unsafe(backend, executable):
      put(cache_key, module_name, executable, backend, *args, **kwargs)

  compilation_cache.get_executable_and_time = get_executable_and_time
  compilation_cache.put_executable_and_time = put_executable_and_time


_keep_unsafe_cpu_executables_out_of_the_persistent_cache()

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
flags.FLAGS.mark_as_parsed()

assert jax.device_count() == 8, "tests expect 8 fake CPU devices"


def load_config(spec: str):
  """Loads 'configs/<name>.py[:arg]' as the --config flag would."""
  path, _, arg = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("config", os.path.join(REPO, path))
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(arg) if arg else module.get_config()


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(data_cache):
  config = load_config("configs/demo.py:tiny")
  config.data.cache_dir = data_cache
  return config
