"""Shared pieces of the var-jax commands: error reporting without tracebacks, var_jax's
info messages on stderr, and the persistent compilation cache of the console command."""
from __future__ import annotations

import logging
import os
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


def show_info_logs() -> None:
  """Prints var_jax's info messages (e.g. the attention kernel chosen, a top-k clipped to
  the vocabulary) to stderr as `var-jax: message`, once per process."""
  logger = logging.getLogger('var_jax')
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter('var-jax: %(message)s'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time of each message."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


# --- persistent compilation cache ---------------------------------------------------
CACHE_ENV = 'VAR_JAX_COMPILATION_CACHE'   # a directory, or off/0/no/false to disable
_OFF = ('', '0', 'off', 'no', 'false', 'none')


def compilation_cache_dir(environ=None) -> str | None:
  """Where the console command keeps jax's persistent compilation cache (None: off).

  $VAR_JAX_COMPILATION_CACHE if set (off/0/no/false disables it), else
  $XDG_CACHE_HOME/var_jax/jax_cache (default ~/.cache/var_jax/jax_cache)."""
  env = os.environ if environ is None else environ
  value = env.get(CACHE_ENV)
  if value is not None:
    return None if value.strip().lower() in _OFF else value
  base = env.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'var_jax', 'jax_cache')


def enable_compilation_cache(environ=None) -> str | None:
  """Turns on jax's persistent compilation cache (a second run reuses the compiled
  sampler instead of compiling again); returns the directory, or None when off. A
  cache directory the user gave jax itself (JAX_COMPILATION_CACHE_DIR) is kept."""
  import jax
  if jax.config.jax_compilation_cache_dir:
    return jax.config.jax_compilation_cache_dir
  path = compilation_cache_dir(environ)
  if path is None:
    return None
  try:
    os.makedirs(path, exist_ok=True)
  except OSError as e:
    print(f'var-jax: warning: no compilation cache ({path}: {e.strerror})', file=sys.stderr)
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.2)
  return path
