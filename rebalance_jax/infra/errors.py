"""Errors caused by the user's input (a config value, a data file, a checkpoint, a flag).

The command-line entry points print these as one clear message, without a traceback.
"""


class InputError(ValueError):
  """A bad config value, data file, or checkpoint; the message names the field or file."""
