"""Shared pieces of the var-jax commands: error reporting without tracebacks, var_jax's
info messages on stderr, and the persistent compilation cache of the console command.

Errors (`guarded`): one line `var-jax CMD: error: message` (a second line for a hint),
exit status 2 for bad arguments (argparse's errors, ValueError), 1 for files that are
missing, unusable or must not be overwritten (OSError, CheckpointError, `reading`) and for
anything unexpected, 130 on Ctrl-C, 143 on SIGTERM (both raised as exceptions, held back
inside safe_io.uninterruptible steps, so temporary files are removed on the way out). `--debug` or VAR_JAX_DEBUG=1 shows the traceback.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
import threading

USAGE, FAILURE = 2, 1  # exit codes: bad arguments / the job could not be done
INTERRUPTED, TERMINATED = 130, 143   # Ctrl-C, SIGTERM (128 + signal number)
DEBUG_ENV = 'VAR_JAX_DEBUG'
DEBUG_HINT = 'rerun with --debug (or VAR_JAX_DEBUG=1) for the traceback'


class CommandError(Exception):
  """An error to report as `var-jax <cmd>: error: <message>` with an exit code."""

  def __init__(self, message: str, code: int = FAILURE):
    super().__init__(message)
    self.code = code


class Terminated(BaseException):
  """SIGTERM, raised in the main thread like KeyboardInterrupt (see `guarded`)."""


def debug_mode(args=None) -> bool:
  """--debug on the command line, or VAR_JAX_DEBUG=1 in the environment."""
  return bool(getattr(args, 'debug', False)) or os.environ.get(DEBUG_ENV, '') not in ('', '0')


def report(cmd: str, error: BaseException | str, code: int, hint: str | None = None) -> int:
  print(f'var-jax {cmd}: error: {error}', file=sys.stderr)
  if hint:
    print(hint, file=sys.stderr)
  return code


@contextlib.contextmanager
def reading(*paths: str | None):
  """Files being read: their ValueError / OSError is a bad file (exit 1), not a bad
  argument; the message names the files given here when it names none of them."""
  try:
    yield
  except CommandError:
    raise
  except (ValueError, OSError) as e:
    text = _os_error(e) if isinstance(e, OSError) else str(e)
    named = [str(p) for p in paths if p is not None]
    if named and not any(p in text for p in named):
      text = f'{", ".join(named)}: {text}'
    raise CommandError(text, FAILURE) from e


_SIGNALS_ACTIVE = []   # the signals raised as exceptions right now (see _signals_raise)


def _on_signal(signum, frame):
  del frame
  from var_jax.safe_io import interrupt
  interrupt(Terminated() if signum == signal.SIGTERM else KeyboardInterrupt())


def _resend_swallowed(unraisable) -> None:
  """sys.unraisablehook: an exception raised by _on_signal inside a gc callback or a
  __del__ is swallowed there; the signal is sent again (from a thread, a moment later:
  once that callback is over) so that it still stops the run."""
  exc = unraisable.exc_value
  if _SIGNALS_ACTIVE and isinstance(exc, (Terminated, KeyboardInterrupt)):
    signum = signal.SIGTERM if isinstance(exc, Terminated) else signal.SIGINT
    threading.Timer(0.01, os.kill, (os.getpid(), signum)).start()
    return
  _resend_swallowed.previous(unraisable)


@contextlib.contextmanager
def _signals_raise():
  """SIGTERM raises Terminated and Ctrl-C KeyboardInterrupt in the main thread (so that
  `finally` blocks remove temporary files), held back inside safe_io.uninterruptible
  blocks; the previous handlers come back afterwards. A no-op outside the main thread."""
  try:
    old = {signal.SIGTERM: signal.signal(signal.SIGTERM, _on_signal)}
  except ValueError:   # not the main thread
    yield
    return
  if signal.getsignal(signal.SIGINT) is signal.default_int_handler:
    old[signal.SIGINT] = signal.signal(signal.SIGINT, _on_signal)
  if sys.unraisablehook is not _resend_swallowed:
    _resend_swallowed.previous = sys.unraisablehook
    sys.unraisablehook = _resend_swallowed
  _SIGNALS_ACTIVE.append(True)
  try:
    yield
  finally:
    _SIGNALS_ACTIVE.pop()
    for signum, handler in old.items():
      signal.signal(signum, handler)


def _one_line(e: BaseException) -> str:
  text = str(e).strip().splitlines()
  return f'{type(e).__name__}: {text[0] if text else ""}'.rstrip(': ')


def _os_error(e: OSError) -> str:
  """`path: reason` for the system's OSErrors ('[Errno 2] ...' otherwise), our own as raised."""
  if e.errno is None or not e.strerror:
    return str(e)
  return f'{e.filename}: {e.strerror}' if e.filename else e.strerror


def describe(e: BaseException):
  """(exit status, one-line message, hint or None) for an exception a command raised."""
  from var_jax.errors import CheckpointError
  if isinstance(e, KeyboardInterrupt):
    return INTERRUPTED, 'interrupted', None
  if isinstance(e, Terminated):
    return TERMINATED, 'terminated (SIGTERM)', None
  if isinstance(e, CommandError):
    return e.code, str(e), None
  if isinstance(e, CheckpointError):
    return FAILURE, str(e), None
  if isinstance(e, OSError):
    return FAILURE, _os_error(e), None
  if isinstance(e, ValueError):
    return USAGE, str(e), None
  if isinstance(e, MemoryError):   # a bare one (numpy's) says nothing, ours say what to do
    return FAILURE, str(e).strip().splitlines()[0] if str(e).strip() else 'out of memory', None
  return FAILURE, _one_line(e), DEBUG_HINT   # a bug or a runtime failure (XLA, ...)


def _quiet_third_party() -> None:
  """After an error the console command says one line: what other libraries' threads
  log or raise on the way out (orbax's background savers, absl warnings, asyncio's
  "Event loop is closed") is noise. The console process exits right after."""
  logging.getLogger('absl').setLevel(logging.CRITICAL + 1)
  sys.unraisablehook = lambda unraisable: None
  threading.excepthook = lambda args: None


def guarded(cmd: str, fn, args, *, signals: bool = False) -> int:
  """Runs fn(args); every failure becomes a one-line message and an exit code (see the
  module docstring). With signals=True, SIGTERM and Ctrl-C are raised as exceptions
  that safe_io.uninterruptible blocks hold back (see _signals_raise). In debug mode
  exceptions propagate (with their traceback)."""
  try:
    with _signals_raise() if signals else contextlib.nullcontext():
      return int(fn(args) or 0)
  except (Exception, KeyboardInterrupt, Terminated) as e:
    if debug_mode(args):
      raise
    if getattr(args, 'console', False):   # set by cli.main for the console command
      _quiet_third_party()
    code, message, hint = describe(e)
    return report(cmd, message, code, hint)


def show_info_logs() -> None:
  """Prints var_jax's info messages (e.g. the attention kernel chosen, a top-k clipped to
  the vocabulary) to stderr as `var-jax: message`, once per process; other libraries'
  warnings as `var-jax: warning: name: message`. A handler on the root logger also keeps
  absl from installing logging.basicConfig's (which printed every message twice)."""
  logger = logging.getLogger('var_jax')
  if not any(isinstance(h, _StderrHandler) for h in logger.handlers):
    handler = _StderrHandler()
    handler.setFormatter(logging.Formatter('var-jax: %(message)s'))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
  root = logging.getLogger()
  if not any(isinstance(h, _StderrHandler) for h in root.handlers):
    handler = _StderrHandler()
    handler.setLevel(logging.WARNING)
    handler.setFormatter(logging.Formatter('var-jax: warning: %(name)s: %(message)s'))
    handler.addFilter(lambda r: not (r.name == 'var_jax' or r.name.startswith('var_jax.')))
    root.addHandler(handler)


class _StderrHandler(logging.StreamHandler):
  """Writes to whatever sys.stderr is at the time of each message."""

  @property
  def stream(self):
    return sys.stderr

  @stream.setter
  def stream(self, value):
    pass


def add_sampling_arguments(parser) -> None:
  """--cfg, --top-k, --top-p, --seed and --more-smooth with the reference's ImageNet
  defaults (checked later by var_jax.sampling_args), for sample and edit."""
  parser.add_argument('--cfg', type=float, default=1.5, help='classifier-free guidance scale (>= 0)')
  parser.add_argument('--top-k', type=int, default=900, help='top-k filter (0: off)')
  parser.add_argument('--top-p', type=float, default=0.96, help='nucleus filter in [0, 1) (0: off)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--more-smooth', action='store_true', help="the reference's Gumbel smoothing")


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
