"""User-facing errors.

Every error a user can cause (a bad config, missing data, a checkpoint that does not fit) is raised
as a `GacdError` subclass whose message names the problem and the fix. The command line prints the
message and exits non-zero without a traceback; anything else is a bug and keeps its traceback.
"""


class GacdError(Exception):
  """Base class: the message says what is wrong and how to fix it."""


class ConfigError(GacdError):
  """A config value that does not exist, is out of range, or names an unknown component."""


class DataError(GacdError):
  """A dataset that is unknown, not prepared, or has the wrong shape."""


class CheckpointError(GacdError):
  """A checkpoint or teacher directory that is missing, corrupt, or holds another model."""


class WorkdirError(GacdError):
  """A run directory that another process is writing, or that cannot be written."""
