"""Native var-jax checkpoints: orbax-saved parameters plus a readable config.

Layout of a checkpoint directory:

    config.json            the ModelConfig, in the fixtures' config.json layout
    var_jax_format.json    format marker: {"format": "var-jax", "version": 1, items, buffers}
    params/                orbax (StandardCheckpointer) tree {'vae': ..., 'var': ..., 'buffers': ...}

'buffers' holds the reference buffers that carry information (the VQVAE's
`quantize.ema_vocab_hit_SV` training statistic) so that a converted checkpoint
exports back to the identical .pth files; derived buffers are regenerated.

Saving never overwrites a non-empty directory unless force=True, and then
writes a complete new checkpoint beside it before swapping it in, so an
interrupted save leaves the old one intact (what a killed save left beside the
target is swept, or moved back, by the next save: var_jax.safe_io.sweep_stale). The marker lists every file under
params/ with its size and CRC-32. Restoring checks those first (a truncated,
overwritten or missing file is named before orbax reads anything), builds the
expected tree from the config (`jax.eval_shape`, nothing allocated), checks every
key, shape and dtype against the stored metadata, then reads. Every failure is one
`CheckpointError` line naming the file; orbax's log lines and the "Event loop is
closed" tracebacks its reader threads print after a failed read are kept quiet.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import pathlib
import re
import shutil
import sys
import zlib
from typing import Any, Dict, Iterator, Mapping, Optional, Tuple

import numpy as np

from var_jax.config import ModelConfig
from var_jax.convert import mapping, naming
from var_jax.errors import CheckpointError

__all__ = ['CheckpointError', 'quiet_orbax', 'read_config', 'restore', 'save']

FORMAT, VERSION = 'var-jax', 1
MARKER, CONFIG, PARAMS = 'var_jax_format.json', 'config.json', 'params'
_CHUNK = 16 << 20


def _one_line(e: BaseException, n: int = 300) -> str:
  """An exception as one short line (tensorstore's source locations dropped)."""
  text = re.sub(r'\s*\[source locations=.*?\]', '', str(e), flags=re.S)
  text = ' '.join(text.split())
  return f'{type(e).__name__}: {text[:n]}'


def _drop_event_loop_noise(unraisable) -> None:
  """sys.unraisablehook: drops the RuntimeError('Event loop is closed') that tensorstore
  callbacks raise when reads still in flight finish after orbax gave up on a failed
  restore and closed its loop; passes everything else on."""
  exc = unraisable.exc_value
  if isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed':
    return
  _drop_event_loop_noise.previous(unraisable)


class _DropOrphanedReadErrors(logging.Filter):
  """On the 'asyncio' logger: drops 'Task exception was never retrieved' for the
  tensorstore reads of a restore that already failed (orbax stops awaiting the other
  arrays at the first error; their tasks report the same damage when collected, possibly
  long after, as a traceback). Other tasks' errors pass."""

  def filter(self, record: logging.LogRecord) -> bool:
    exc = record.exc_info[1] if record.exc_info else None
    return not (str(record.msg).startswith('Task exception was never retrieved')
                and exc is not None and 'tensorstore_spec=' in str(exc))


_ORPHANED_READS = _DropOrphanedReadErrors()


@contextlib.contextmanager
def quiet_orbax() -> Iterator[None]:
  """Runs orbax calls without their absl log lines (warnings and errors about files we
  report ourselves) and, from then on, without the event-loop tracebacks above."""
  if sys.unraisablehook is not _drop_event_loop_noise:
    _drop_event_loop_noise.previous = sys.unraisablehook
    sys.unraisablehook = _drop_event_loop_noise
  logging.getLogger('asyncio').addFilter(_ORPHANED_READS)   # once: filters are a set
  absl = logging.getLogger('absl')
  level = absl.level
  absl.setLevel(logging.CRITICAL)
  try:
    yield
  finally:
    absl.setLevel(level)


def _crc32(f: pathlib.Path) -> int:
  crc = 0
  with open(f, 'rb') as fh:
    while chunk := fh.read(_CHUNK):
      crc = zlib.crc32(chunk, crc)
  return crc


def _file_table(params_dir: pathlib.Path) -> Dict[str, list]:
  """{relative path: [size, crc32]} of every file under params_dir."""
  return {f.relative_to(params_dir).as_posix(): [f.stat().st_size, _crc32(f)]
          for f in sorted(p for p in params_dir.rglob('*') if p.is_file())}


def _verify_files(params_dir: pathlib.Path, table: Any) -> None:
  """Checks the files the marker lists (checkpoints written before the list: no-op)."""
  if table is None:
    return
  if not isinstance(table, dict):
    raise CheckpointError(f'{params_dir.parent / MARKER}: its file list is malformed')
  for rel, entry in table.items():
    f = params_dir / rel
    if not (isinstance(entry, list) and len(entry) == 2 and all(type(x) is int for x in entry)):
      raise CheckpointError(f'{params_dir.parent / MARKER}: malformed entry for {rel}')
    if not f.is_file():
      raise CheckpointError(f'{f}: missing (the checkpoint is incomplete or corrupt)')
    size = f.stat().st_size
    if size != entry[0]:
      raise CheckpointError(f'{f}: corrupt, {size} bytes where {entry[0]} were written '
                            '(truncated or overwritten)')
    if _crc32(f) != entry[1]:
      raise CheckpointError(f'{f}: corrupt, its contents changed since the checkpoint was '
                            'written (CRC-32 mismatch)')


def _buffers_tree(buffers: Mapping[str, Mapping[str, Any]]) -> Dict[str, Any]:
  """{'vae': {'quantize.ema_vocab_hit_SV': arr}} -> nested dicts orbax can name."""
  return {part: naming.unflatten({tuple(k.split('.')): np.asarray(v) for k, v in bufs.items()})
          for part, bufs in buffers.items() if bufs}


def save(directory: str | os.PathLike, config: ModelConfig, vae_params: Any,
         var_params: Any = None, *, buffers: Optional[Mapping[str, Mapping[str, Any]]] = None,
         force: bool = False) -> pathlib.Path:
  """Writes a checkpoint to `directory`: new or empty, or with force a var-jax checkpoint
  to replace (never a folder of anything else: force is not a licence to delete it)."""
  import orbax.checkpoint as ocp
  from var_jax.safe_io import require_local, sweep_stale, uninterruptible
  require_local(directory, 'checkpoint directory')
  target = pathlib.Path(directory).absolute()
  sweep_stale(target)   # .NAME.tmp-<pid> / .old-<pid> of a save that was killed
  if target.exists() and not target.is_dir():
    raise FileExistsError(f'{target} exists and is not a directory')
  if target.is_dir() and any(target.iterdir()):
    if not force:
      raise FileExistsError(f'{target} is not empty; choose a new directory or pass force=True '
                            '(--force) to replace it')
    if not (target / MARKER).is_file():
      raise FileExistsError(f'{target} is not empty and not a var-jax checkpoint (no {MARKER}); '
                            'force replaces only a checkpoint: choose a new directory')
  if (var_params is None) != (config.var is None):
    raise ValueError('VAR params and config.var must be given together')
  tree: Dict[str, Any] = {'vae': vae_params}
  if var_params is not None:
    tree['var'] = var_params
  bufs = _buffers_tree(buffers or {})
  if bufs:
    tree['buffers'] = bufs
  marker = {'format': FORMAT, 'version': VERSION, 'items': sorted(k for k in tree if k != 'buffers'),
            'buffers': {f'{part}:{".".join(path)}': [list(np.shape(v)), str(np.asarray(v).dtype)]
                        for part, sub in bufs.items() for path, v in naming.flatten(sub).items()}}
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f'.{target.name}.tmp-{os.getpid()}'
  old = target.parent / f'.{target.name}.old-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  tmp.mkdir()
  try:
    with uninterruptible():   # a Ctrl-C / SIGTERM of the CLI waits: no background writer
      ckptr = ocp.StandardCheckpointer()   # may outlive the cleanup below
      ckptr.save(tmp / PARAMS, tree)
      ckptr.wait_until_finished()
      ckptr.close()
    marker['files'] = _file_table(tmp / PARAMS)
    (tmp / CONFIG).write_text(config.to_json() + '\n')
    (tmp / MARKER).write_text(json.dumps(marker, indent=1) + '\n')
    with uninterruptible():   # the old checkpoint out, the new one in
      if target.exists():
        target.rename(old)
      tmp.rename(target)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(old, ignore_errors=True)
  return target


def _read_json(path: pathlib.Path, what: str) -> Any:
  try:
    return json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f'{path} is not valid JSON ({what} is corrupt): {e}') from None


def _read_marker(d: pathlib.Path) -> Dict[str, Any]:
  if not d.is_dir():
    raise FileNotFoundError(f'checkpoint directory not found: {d}')
  marker = d / MARKER
  if not marker.is_file():
    raise CheckpointError(f'{d} is not a var-jax checkpoint ({MARKER} missing); convert reference '
                          'weights with `var-jax convert`')
  info = _read_json(marker, 'the format marker')
  if not isinstance(info, dict):
    raise CheckpointError(f'{marker} is corrupt: not a JSON object')
  version = info.get('version')
  if info.get('format') != FORMAT or type(version) is not int or version > VERSION:
    raise CheckpointError(f'{marker}: unsupported format {info.get("format")!r} version '
                          f'{version!r} (this var-jax reads {FORMAT} <= {VERSION})')
  return info


def read_config(directory: str | os.PathLike) -> ModelConfig:
  d = pathlib.Path(directory)
  _read_marker(d)
  if not (d / CONFIG).is_file():
    raise CheckpointError(f'{d}: {CONFIG} is missing')
  raw = _read_json(d / CONFIG, 'the model config')
  try:
    return ModelConfig.from_dict(raw)
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise CheckpointError(f'{d / CONFIG} is not a valid model config: {e}') from e


def _expected_tree(directory: pathlib.Path, info: Mapping[str, Any],
                   config: ModelConfig) -> Dict[str, Any]:
  import jax
  tree = {'vae': mapping.abstract_params(config, what=mapping.VQVAE)}
  if config.var is not None:
    tree['var'] = mapping.abstract_params(config, what=mapping.VAR)
  bufs: Dict[str, Dict[tuple, Any]] = {}
  try:
    for name, (shape, dtype) in info.get('buffers', {}).items():
      part, key = name.split(':', 1)
      bufs.setdefault(part, {})[tuple(key.split('.'))] = jax.ShapeDtypeStruct(
          tuple(int(n) for n in shape), np.dtype(dtype))
  except (ValueError, TypeError, AttributeError) as e:
    raise CheckpointError(f'{directory / MARKER}: malformed buffers entry ({e})') from None
  if bufs:
    tree['buffers'] = {part: naming.unflatten(flat) for part, flat in bufs.items()}
  return tree


def _check_against_metadata(directory: pathlib.Path, expected: Dict[str, Any], stored: Any) -> None:
  want = naming.flatten(expected)
  have = naming.flatten(stored)
  problems = []
  for path, leaf in want.items():
    if path not in have:
      problems.append(f'{"/".join(path)}: missing (expected shape {tuple(leaf.shape)})')
      continue
    got = have[path]
    if tuple(got.shape) != tuple(leaf.shape) or np.dtype(got.dtype) != np.dtype(leaf.dtype):
      problems.append(f'{"/".join(path)}: stored {tuple(got.shape)} {np.dtype(got.dtype)}, '
                      f'expected {tuple(leaf.shape)} {np.dtype(leaf.dtype)}')
  problems += [f'{"/".join(p)}: unexpected (stored shape {tuple(have[p].shape)})'
               for p in have if p not in want]
  if problems:
    raise CheckpointError(f'{directory}: parameters do not match {CONFIG} ({len(problems)} '
                          'problem(s)):\n  ' + '\n  '.join(problems[:12]))


def restore(directory: str | os.PathLike) -> Tuple[ModelConfig, Any, Any, Dict[str, Dict[str, np.ndarray]]]:
  """Returns (config, vae_params, var_params or None, buffers) of a checkpoint."""
  import orbax.checkpoint as ocp
  d = pathlib.Path(directory).absolute()
  info = _read_marker(d)
  config = read_config(d)
  expected = _expected_tree(d, info, config)
  params_dir = d / PARAMS
  if not params_dir.is_dir():
    raise CheckpointError(f'{d}: the {PARAMS}/ directory is missing')
  _verify_files(params_dir, info.get('files'))
  if (params_dir / '_METADATA').is_file():
    _read_json(params_dir / '_METADATA', "orbax's tree metadata")
  with quiet_orbax():
    ckptr = ocp.StandardCheckpointer()
    try:
      try:
        stored = getattr(ckptr.metadata(params_dir).item_metadata, 'tree', None)
      except Exception as e:  # orbax raises assorted types for unreadable metadata
        raise CheckpointError(f'{params_dir}: unreadable checkpoint metadata '
                              f'({_one_line(e)})') from None
      if stored is None:
        raise CheckpointError(f'{params_dir}: unreadable checkpoint metadata (_METADATA or '
                              'manifest.ocdbt is damaged)')
      _check_against_metadata(d, expected, stored)
      try:
        tree = ckptr.restore(params_dir, expected)
      except Exception as e:
        raise CheckpointError(f'{params_dir}: corrupt checkpoint data ({_one_line(e)})') from None
    finally:
      ckptr.close()
  buffers = {part: {'.'.join(p): np.asarray(v) for p, v in naming.flatten(sub).items()}
             for part, sub in tree.get('buffers', {}).items()}
  return config, tree['vae'], tree.get('var'), buffers
