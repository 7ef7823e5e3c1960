"""What the entry points share: flag parsing whose errors are one line, and a main that turns the
library's errors and stop requests into a message and an exit status.

Exit statuses: 0 done; 1 an error of the input (config, flag, data, checkpoint) or a non-finite
loss, printed as `<prog>: error: <message>`; 128 + signal (143 SIGTERM, 130 Ctrl-C) when stopped
gracefully: re-run the same command to continue.
"""

import errno
import os
import sys
from collections.abc import Callable

from absl import flags, logging

from rebalance_jax.infra import compilation_cache, distributed, host_memory, interrupts
from rebalance_jax.infra.errors import InputError
from rebalance_jax.training import loop


def parse_flags(argv: list[str], flag_values: flags.FlagValues = flags.FLAGS) -> list[str]:
  """absl's parsing (`app.run`'s flags_parser), with every parsing error (an unknown or wrongly
  typed `--config.<field>`, a config file that is missing or raises) one line and exit status 1."""
  try:
    remaining = flag_values(argv)
    if "config" in flag_values and flag_values["config"].present:
      flag_values.config.keys()  # ml_collections defers a config file's load error to first use
    return remaining
  except flags.Error as e:
    message = _flag_error_line(str(e))
  except OSError as e:
    message = _config_file_error_line(e, argv)
  except (AttributeError, KeyError, TypeError) as e:  # ml_collections: not a field of the config
    message = _field_error_line(e, argv)
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.exit(1)


def _flag_error_line(text: str) -> str:
  """absl's message in one line; for a config file that raised, its exception's own line (the last
  line of the traceback ml_collections puts in the message)."""
  text = text.removeprefix("flag ")
  if "Traceback (most recent call last)" in text:
    flag = text.split(": Error whilst parsing config file:")[0]
    return f"{flag}: {text.strip().splitlines()[-1]}"
  return " ".join(line.strip() for line in text.splitlines() if line.strip())


def _config_file_error_line(error: OSError, argv: list[str]) -> str:
  value = next((a.split("=", 1)[1] for a in reversed(argv[1:]) if a.startswith("--config=")), "")
  path = value.split(":")[0]
  if not os.path.isfile(path):
    return f"--config={value}: {path} is not a file"
  return f"--config={value}: cannot be loaded ({str(error).strip().splitlines()[-1].strip()})"


def _field_error_line(error: Exception, argv: list[str]) -> str:
  """The `--config.<field>` override naming a field the config does not have, and which one."""
  text = str(error.args[0] if isinstance(error, KeyError) and error.args else error)
  name, _, hint = text.partition("\n")
  name = name.strip("\"'")
  given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
  named = [f for f in given if name in f[len("--config."):].split(".")] or given[-1:] or ["--config"]
  what = (f"the config has no field {name!r}" if name.isidentifier() else
          f"not a field of the config ({name})")
  hint = f"; {hint.strip()[0].lower()}{hint.strip()[1:]}" if hint.strip() else ""
  return f"{named[0]}: {what}{hint} (the fields are listed in rebalance_jax/config/defaults.py)"


def run_guarded(prog: str, argv: list[str], work: Callable[[], object]) -> None:
  """Starts the process (`host_memory.set_up_process`: huge pages for XLA:CPU's buffers, its
  memory-minimizing schedule; distributed.start, the compilation cache), runs `work` and exits as
  the module docstring says. Started as `python -m <prog>`, the process first re-executes itself
  once (`host_memory.restart_with_huge_page_heap`)."""
  host_memory.set_up_process(prog)
  distributed.start(argv)
  compilation_cache.enable_from_flags()
  try:
    work()
  except interrupts.Interrupted as e:
    logging.warning("%s", e)
    sys.exit(e.exit_code)  # not finished: schedulers and retry loops run it again
  except KeyboardInterrupt:
    sys.stderr.write(f"{prog}: interrupted twice: stopped at once; re-run to resume from the last "
                     "checkpoint\n")
    sys.exit(130)
  except (InputError, loop.NonFiniteLossError) as e:
    sys.exit(f"{prog}: error: {e}")
  except Exception as e:
    full = _disk_full(e)
    if full is None:
      raise
    sys.stderr.write(f"{prog}: error: no space left on the device ({full}); free some and re-run "
                     "the same command: it resumes from the last complete checkpoint\n")
    sys.stderr.flush()
    # At once: the checkpointer's background writes would each report the full disk again while
    # the interpreter shuts down. Everything complete on disk was written atomically.
    os._exit(1)  # pylint: disable=protected-access


def _disk_full(error: BaseException) -> str | None:
  """The message of the disk-full error in `error`'s chain (ENOSPC, EDQUOT; TensorStore's
  RESOURCE_EXHAUSTED for a write; ArrayRecord's failed write), or None."""
  while error is not None:
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
      return str(error)
    text = str(error)
    if "RESOURCE_EXHAUSTED: Error writing" in text or "No space left on device" in text:
      return text.splitlines()[0]
    error = error.__cause__ or error.__context__
  return None

