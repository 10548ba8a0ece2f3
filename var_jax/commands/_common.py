"""Shared pieces of the var-jax commands: error reporting without tracebacks."""
from __future__ import annotations

import sys

USAGE, FAILURE = 2, 1  # exit codes: bad arguments / the job could not be done


class CommandError(Exception):
  """An error to report as `var-jax <cmd>: error: <message>` with an exit code."""

  def __init__(self, message: str, code: int = FAILURE):
    super().__init__(message)
    self.code = code


def report(cmd: str, error: BaseException, code: int) -> int:
  print(f'var-jax {cmd}: error: {error}', file=sys.stderr)
  return code


def guarded(cmd: str, fn, args) -> int:
  """Runs fn(args); known failures become a one-line message and an exit code."""
  from var_jax.errors import CheckpointError
  try:
    return int(fn(args) or 0)
  except CommandError as e:
    return report(cmd, e, e.code)
  except (FileNotFoundError, FileExistsError, NotADirectoryError, PermissionError,
          CheckpointError) as e:
    return report(cmd, e, FAILURE)
  except ValueError as e:
    return report(cmd, e, USAGE)
