"""What the entry points share: flag parsing whose errors are one line, and a main that turns the
library's errors and stop requests into a message and an exit status.

Exit statuses: 0 done; 1 an error of the input (config, flag, data, checkpoint) or a non-finite
loss, printed as `<prog>: error: <message>`; 128 + signal (143 SIGTERM, 130 Ctrl-C) when stopped
gracefully: re-run the same command to continue.
"""

import re
import sys
from collections.abc import Callable

from absl import flags, logging

from rebalance_jax.infra import compilation_cache, distributed, interrupts
from rebalance_jax.infra.errors import InputError
from rebalance_jax.training import loop


def parse_flags(argv: list[str]) -> list[str]:
  """absl's parsing (`app.run`'s flags_parser), with an unknown `--config.<field>` reported as a
  flag error naming it; every parsing error is one line and exit status 1."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    message = str(e).splitlines()[0]
  except (AttributeError, KeyError, TypeError) as e:  # ml_collections: not a field of the config
    text = str(e).strip("\"'")
    given = [a.split("=")[0] for a in argv[1:] if a.startswith("--config.")]
    named = [f for f in given if f[len("--config."):] in text or
             re.search(rf"\.{re.escape(text)}(\.|$)", f)] or [" or ".join(given) or "--config"]
    what = (f"the config has no field {text!r}" if text.isidentifier() else
            f"not a field of the config ({text})")
    message = f"{named[0]}: {what} (the fields are listed in rebalance_jax/config/defaults.py)"
  sys.stderr.write(f"FATAL Flags parsing error: {message}\n")
  sys.exit(1)


def run_guarded(prog: str, argv: list[str], work: Callable[[], object]) -> None:
  """Starts the process (distributed.start, the compilation cache), runs `work` and exits as the
  module docstring says."""
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

