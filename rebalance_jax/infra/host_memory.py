"""Host memory of XLA:CPU programs: a schedule that keeps fewer arrays alive at once, huge pages for
the buffers each run maps afresh, and the heap the compiler freed handed back to the system.

Measured on the paper's stage-2 step (bench/train_step.py, 2 CPU cores): XLA:CPU's default,
concurrency-optimized schedule computes independent work early, so that rematerialized
activations (`remat=True`) live as long as saved ones and the step needs 5.0 GiB of temporaries;
the memory-minimizing schedule needs 3.8 GiB and lets remat save what it should, for 1-3% more
time (2026-12-07). Compiling the step leaves about 1 GiB of freed heap that glibc keeps unless
trimmed.

XLA:CPU maps a program's temporaries (4 GiB for that step) afresh on every run and unmaps them
after it, so each step faulted in 1.1 million 4 KiB pages: 1.45 s of kernel time on the 2 cores
per 6 s step. With glibc's malloc backing large blocks by transparent huge pages (its
`glibc.malloc.hugetlb=1` tunable) the step took 5.5 s instead of 6.1 s, at the same peak memory
(2026-12-07). The tunable is read at process start only, hence `restart_with_huge_page_heap`.
"""

import ctypes
import os
import sys

_SCHEDULER_OPTION = "--xla_cpu_enable_concurrency_optimized_scheduler"


def prefer_memory_schedule() -> None:
  """XLA:CPU's memory-minimizing scheduler for this process's programs, unless XLA_FLAGS already
  sets the option. Takes effect only before JAX creates its CPU backend (before any computation);
  GPU and TPU programs are not affected."""
  flags = os.environ.get("XLA_FLAGS", "")
  if _SCHEDULER_OPTION not in flags:
    os.environ["XLA_FLAGS"] = f"{flags} {_SCHEDULER_OPTION}=false".strip()


_HUGE_PAGE_TUNABLE = "glibc.malloc.hugetlb"


def _huge_pages_would_help() -> bool:
  """Linux with glibc >= 2.35 (which has the tunable) and transparent huge pages in `madvise`
  mode (with `always` every large mapping gets them anyway; with `never` none can)."""
  if sys.platform != "linux":
    return False
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
      mode = f.read()
  except (ValueError, OSError, AttributeError):
    return False
  return name == "glibc" and tuple(map(int, version.split(".")[:2])) >= (2, 35) and \
      "[madvise]" in mode


def restart_with_huge_page_heap(entry: str) -> None:
  """Re-executes this process, same command and environment, with glibc's malloc backing large
  blocks by transparent huge pages (`GLIBC_TUNABLES=glibc.malloc.hugetlb=1`). Call it before any
  work: the process starts again from the beginning.

  Returns without restarting when the process was not started as `entry` (`python -m <entry>`,
  or the script `entry`: an entry point's main called in-process, e.g. by a test), when
  GLIBC_TUNABLES already names the tunable (`glibc.malloc.hugetlb=0` opts out), and where huge
  pages would not help."""
  argv = sys.orig_argv
  module = argv[argv.index("-m") + 1] if "-m" in argv[:-1] else None
  started_as = module == entry or (
      len(argv) > 1 and os.path.realpath(argv[1]) == os.path.realpath(entry))
  tunables = os.environ.get("GLIBC_TUNABLES", "")
  if not started_as or _HUGE_PAGE_TUNABLE in tunables or not _huge_pages_would_help():
    return
  os.environ["GLIBC_TUNABLES"] = ":".join(filter(None, [tunables, f"{_HUGE_PAGE_TUNABLE}=1"]))
  sys.stdout.flush()
  sys.stderr.flush()
  os.execv(sys.executable, [sys.executable, *argv[1:]])


def set_up_process(entry: str) -> None:
  """What every entry point (and a bench that times their work) does first, before JAX starts
  its backends: the huge-page heap (`restart_with_huge_page_heap`) and the memory-minimizing
  schedule (`prefer_memory_schedule`)."""
  restart_with_huge_page_heap(entry)
  prefer_memory_schedule()


def release_free_heap() -> None:
  """Hands the heap pages glibc holds free (left by compilation) back to the system; a no-op
  where the C library has no malloc_trim."""
  try:
    trim = ctypes.CDLL(None).malloc_trim
  except (OSError, AttributeError):
    return
  trim(0)
