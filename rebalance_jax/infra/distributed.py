"""Multi-process start-up: `jax.distributed.initialize()` before any other JAX call, when asked.

Flags (shared by `train` and `evaluate`):
  --distributed=auto|on|off   auto: initialize when --coordinator_address is given or under a SLURM
                              job with several tasks; on: always (Cloud TPU pods, where JAX finds
                              the coordinator itself); off: never (a plain single host).
  --coordinator_address, --num_processes, --process_id   explicit cluster (e.g. launch/local.py).
"""

import os

import jax
from absl import app, flags, logging

from rebalance_jax.infra import logs

_MODE = flags.DEFINE_enum("distributed", "auto", ["auto", "on", "off"],
                          "Multi-process initialization (jax.distributed.initialize).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "host:port of process 0 in a multi-process run.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")


def _slurm_multi_task() -> bool:
  return int(os.environ.get("SLURM_NTASKS", "1")) > 1 and "SLURM_JOB_ID" in os.environ


def start(argv) -> None:
  """The start of an entry point's main: no stray arguments, multi-process set-up, quiet logs."""
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  maybe_initialize()
  logs.quiet_library_logs()


def maybe_initialize() -> None:
  """Initializes jax.distributed per the flags; must run before anything touches a device."""
  mode = _MODE.value
  if mode == "off" or (mode == "auto" and not _COORDINATOR.value and not _slurm_multi_task()):
    return
  jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                             num_processes=_NUM_PROCESSES.value, process_id=_PROCESS_ID.value)
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
