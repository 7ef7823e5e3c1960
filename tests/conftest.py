"""Test session setup: 8 fake CPU devices and a persistent compilation cache, set before JAX loads."""

import collections
import importlib.util
import os
import sys
import tempfile

# Backend optimization level 0: the tests' programs are tiny, so LLVM's optimizations cost more
# (a third of each compilation) than they save when the program runs.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8"
                           " --xla_backend_optimization_level=0").strip()
# "_v2": entries written before the guard (infra/compilation_cache.py) may hold what it now refuses.
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR",
                      os.path.join(tempfile.gettempdir(), "rebalance_jax_test_xla_cache_v2"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import orbax.checkpoint as ocp  # noqa: E402
import pytest  # noqa: E402
from absl import flags  # noqa: E402

from rebalance_jax.infra import compilation_cache  # noqa: E402

compilation_cache.guard_cpu_collectives()  # the cache aborts CPU programs with looped collectives

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


def pytest_collection_modifyitems(items):
  """Files with the most slow tests first (a stable sort otherwise): the xdist workers take whole
  files in this order, so the longest ones start early and the two workers finish together."""
  slow = collections.Counter(item.path for item in items if item.get_closest_marker("slow"))
  items.sort(key=lambda item: -slow[item.path])


@pytest.fixture(scope="session")
def data_cache(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data_cache"))


@pytest.fixture
def tiny_config(data_cache):
  config = load_config("configs/demo.py:tiny")
  config.data.cache_dir = data_cache
  return config


def saved_state(workdir, stage):
  """The train state of a stage's latest checkpoint as numpy, whatever topology wrote it."""
  directory = os.path.join(workdir, stage, "checkpoints")
  manager = ocp.CheckpointManager(directory)
  step = manager.latest_step()
  manager.close()
  path = os.path.join(directory, str(step), "state")
  checkpointer = ocp.PyTreeCheckpointer()
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                          checkpointer.metadata(path).item_metadata.tree)
  return step, checkpointer.restore(path, args=ocp.args.PyTreeRestore(restore_args=as_numpy))


def stage2_loss_and_grads(config, train: bool = False):
  """((stage-2 loss, metrics), gradients) of a fresh student of `config` (its towers at 16 px and
  16 tokens, teachers 24- and 40-wide, as the tiny config's) on a fixed random batch of 8."""
  from rebalance_jax.config import spec  # pylint: disable=import-outside-toplevel
  from rebalance_jax.models.student import Student, init_student  # pylint: disable=import-outside-toplevel
  from rebalance_jax.training import objective
  exp = spec.from_config(config)
  model = Student(exp.student_config(vocab_size=50))
  params = init_student(model, jax.random.key(0))
  rng = np.random.default_rng(0)
  batch = {"image": rng.random((8, 16, 16, 3), np.float32),
           "ids": rng.integers(1, 50, (8, 16)).astype(np.int32),
           "mask": np.ones((8, 16), np.int32), "image_id": np.arange(8, dtype=np.int32)}
  teacher = (rng.normal(size=(8, 24)).astype(np.float32),
             rng.normal(size=(8, 40)).astype(np.float32))
  fn = lambda p: objective.stage_loss(p, batch, teacher, jax.random.key(1), model=model,
                                      objective=exp.stage("stage2").objective,
                                      num_negative_groups=1, train=train)
  return jax.jit(jax.value_and_grad(fn, has_aux=True))(params)
