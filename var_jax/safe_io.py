"""Outputs that never lose a user's file, and leave nothing behind when killed.

    safe_io.check_output(args.out, force=args.force, flag='--out')   # before any work
    with safe_io.atomic_write(path) as f: ...                        # complete or absent

`check_output` vets an output path before any compute starts: a URL (gs://...) is
refused (`require_local`), a folder is never
taken for a file, an existing file is replaced only with force (or when it is the
caller's own partial output), a non-empty folder only with force and only if it is
one var-jax wrote; the parent must be writable. `atomic_write` writes through
`.NAME.tmp<pid>` beside the target, renamed over it only when complete and removed
on every exit path. `sweep_stale` removes what killed runs left: only names of that
pattern (and `.NAME.tmp-<pid>` / `.NAME.old-<pid>` folders of checkpoint saves)
whose process is gone, never anything else.
"""
from __future__ import annotations

import contextlib
import os
import pathlib
import re
import shutil
from typing import Any, Callable, Dict, Iterator, Mapping, Optional

_STALE = re.compile(r'^\.(?P<name>.+)\.(?P<kind>tmp-?|old-)(?P<pid>\d+)$')
_URL = re.compile(r'^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*)://')


def require_local(path: str | os.PathLike | None, flag: str) -> None:
  """ValueError for a URL (gs://, s3://, http://, ...): var-jax reads and writes local or
  mounted file systems only, and os/pathlib would take 'gs://bucket/run' for a folder
  'gs:' under the current directory, so checkpoints or samples would silently stay on
  this machine's disk."""
  m = None if path is None else _URL.match(os.fspath(path))
  if m:
    raise ValueError(f'{flag} {path}: var-jax uses local or mounted file systems, not '
                     f'{m.group("scheme")}:// URLs (this path would become a local folder '
                     f'"{m.group("scheme")}:"); mount the bucket or share (e.g. gcsfuse, '
                     'Filestore/NFS) and give its path')


def temp_path(path: str | os.PathLike) -> pathlib.Path:
  """`.NAME.tmp<pid>` beside `path`: where `atomic_write` writes before the rename."""
  path = pathlib.Path(path)
  return path.with_name(f'.{path.name}.tmp{os.getpid()}')


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, mode: str = 'wb') -> Iterator[Any]:
  """Yields a file object for `temp_path(path)`; renamed over `path` when the block
  succeeds, removed on every other exit (exceptions, KeyboardInterrupt, and SIGTERM
  under the CLI, which raises it as an exception)."""
  path = pathlib.Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  tmp = temp_path(path)
  try:
    with open(tmp, mode) as f:
      yield f
    os.replace(tmp, path)
  finally:
    with contextlib.suppress(FileNotFoundError):
      tmp.unlink()


def _process_gone(pid: int) -> bool:
  if pid == os.getpid():   # ours from an earlier process with a reused pid: nothing of
    return True            # this process is in flight when a sweep runs
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return True
  except (PermissionError, OverflowError):
    return False
  return False


def _remove(p: pathlib.Path) -> None:
  if p.is_dir() and not p.is_symlink():
    shutil.rmtree(p, ignore_errors=True)
  else:
    with contextlib.suppress(FileNotFoundError):
      p.unlink()


def sweep_stale(path: str | os.PathLike, *, inside: bool = False) -> list:
  """Removes what killed var-jax runs left for `path` and returns it: `.NAME.tmp<pid>`
  and `.NAME.tmp-<pid>` files and folders (NAME = path's name) whose process is gone. A
  `.NAME.old-<pid>` folder (a checkpoint mid-replacement when its run died) goes back
  to `path` when `path` is missing, else is removed (its replacement is complete).
  With inside=True, every `.*.tmp<pid>` entry in the folder `path` (a run's own folder).
  Nothing else is ever touched."""
  path = pathlib.Path(path)
  folder = path if inside else path.parent
  if not folder.is_dir():
    return []
  removed = []
  for entry in sorted(folder.iterdir()):
    m = _STALE.match(entry.name)
    if not m or not _process_gone(int(m['pid'])):
      continue
    if not inside and m['name'] != path.name:
      continue
    if m['kind'] == 'old-':
      if inside:
        continue
      if not os.path.lexists(path):
        entry.rename(path)
        continue
    _remove(entry)
    removed.append(entry)
  return removed


def _writable_parent(path: pathlib.Path, flag: str) -> None:
  """The nearest existing parent of `path` must be a folder we can create files in."""
  parent = path.absolute().parent
  while not os.path.lexists(parent) and parent != parent.parent:
    parent = parent.parent
  if not parent.is_dir():
    raise NotADirectoryError(f'{flag} {path}: {parent} is not a folder')
  probe = parent / f'.var-jax-probe.tmp{os.getpid()}'
  try:
    os.close(os.open(probe, os.O_CREAT | os.O_WRONLY, 0o600))
    os.unlink(probe)
  except OSError as e:
    raise PermissionError(f'{flag} {path}: cannot write in {parent} ({e.strerror})') from None


def check_output(path: str | os.PathLike | None, *, force: bool = False, kind: str = 'file',
                 flag: str = '--out', owned: bool = False,
                 is_ours: Optional[Callable[[pathlib.Path], bool]] = None) -> Optional[pathlib.Path]:
  """Vets an output path before any work starts; raises an OSError naming `flag` if it
  must not be written, and sweeps stale temporaries of killed runs at that name.

  kind='file': a folder there is refused; an existing file only with force, or when
  `owned` (the caller's own partial output). kind='dir' (a folder written as a whole): a
  file there is refused; a non-empty folder only with force, and then only if
  is_ours(folder) (a folder this program wrote, e.g. a checkpoint); without is_ours
  never. kind='into' (a folder that files are written into, each checked on its own):
  a file there is refused. The nearest existing parent must be a writable folder
  (tried by creating and removing a temporary file)."""
  if path is None:
    return None
  require_local(path, flag)
  path = pathlib.Path(path)
  if kind not in ('file', 'dir', 'into'):
    raise ValueError(f'kind must be file, dir or into, got {kind!r}')
  if os.path.lexists(path):
    if kind == 'file' and path.is_dir():
      raise IsADirectoryError(f'{flag} {path} is a folder; give a file name')
    if kind != 'file' and not path.is_dir():
      raise FileExistsError(f'{flag} {path} exists and is not a folder')
    if kind == 'file' and not (force or owned):
      raise FileExistsError(f'{flag} {path} exists; refusing to overwrite it (pass --force to '
                            'replace it)')
    if kind == 'dir' and any(path.iterdir()):
      if not force:
        raise FileExistsError(f'{flag} {path} is not empty; choose a new folder or pass --force '
                              'to replace it')
      if is_ours is None or not is_ours(path):
        raise FileExistsError(f'{flag} {path} is not empty and was not written by var-jax; '
                              'refusing to replace it, even with --force')
  inside = kind == 'into' and path.is_dir()   # files go into the folder, else beside path
  _writable_parent(path / '_' if inside else path, flag)
  sweep_stale(path)
  return path


def check_distinct(paths: Mapping[str, Any]) -> None:
  """ValueError when two output flags name the same path ({flag: path or None})."""
  seen: Dict[str, str] = {}
  for flag, p in paths.items():
    if p is None:
      continue
    key = os.path.realpath(p)
    if key in seen:
      raise ValueError(f'{seen[key]} and {flag} name the same file {p}')
    seen[key] = flag


def check_not_inputs(outputs: Mapping[str, Any], inputs: Mapping[str, Any]) -> None:
  """ValueError when an output flag names a file the command reads ({flag: path, a list
  of paths, or None}): not even --force writes over an input (e.g. `eval --out` on the
  samples it scores, `edit --out` on the photo it edits)."""
  read = {}
  for flag, paths in inputs.items():
    for p in [paths] if isinstance(paths, (str, os.PathLike)) else paths or ():
      read.setdefault(os.path.realpath(p), flag)
  for flag, p in outputs.items():
    if p is not None and os.path.realpath(p) in read:
      raise ValueError(f'{flag} {p} is the {read[os.path.realpath(p)]} file this command '
                       'reads; give another output name')


# --- work that must not stop halfway ---------------------------------------------

class _Shield:
  depth = 0
  pending: Optional[BaseException] = None


@contextlib.contextmanager
def uninterruptible() -> Iterator[None]:
  """Holds back the exceptions the command line raises for SIGTERM and Ctrl-C (through
  `interrupt`) until the block ends: for steps that must not stop halfway, e.g. an orbax
  save whose background writers would outlive the cleanup of its temporary folder."""
  _Shield.depth += 1
  try:
    yield
  finally:
    _Shield.depth -= 1
    if _Shield.depth == 0 and _Shield.pending is not None:
      exc, _Shield.pending = _Shield.pending, None
      raise exc


def interrupt(exc: BaseException) -> None:
  """Raises `exc` now, or when the current `uninterruptible` block ends (signal handlers)."""
  if _Shield.depth:
    _Shield.pending = _Shield.pending or exc
    return
  raise exc
