"""User-facing errors: the CLI prints them as one line instead of a traceback."""


class UserError(Exception):
  """Bad input from the user (a flag, a file, a checkpoint); the message names the thing."""
