"""Checkpoints: orbax CheckpointManager over any pytree state + per-process data-iterator state.

Reuse:
  mngr = CheckpointManager(workdir + '/checkpoints', keep=3, save_every=1000, async_save=True)
  found = mngr.restore_latest(abstract_state)   # None: fresh start; abstract: ShapeDtypeStructs with shardings
  step0, state, data_state = found
  mngr.save(step, state, data_state=it.get_state())   # async; returns whether it saved
  mngr.wait(); mngr.close()

A checkpoint is a step directory holding `state` (orbax StandardSave: params,
optimizer state, step, rng, ...), `data` (one JSON file per process: that
process's grain iterator state) and `meta` (JSON, e.g. the step). orbax writes into
a temporary directory and renames it when complete, so a run killed mid-save
resumes from the last complete step; `latest_step()` ignores unfinished ones.
A complete checkpoint that cannot be read (a damaged disk, a truncated copy) is
moved to `<workdir>/damaged_checkpoints/<step>` (never deleted) with a warning naming
its step and the reason, and `restore_latest` goes on to the previous one. A
checkpoint whose shapes do not match the model (another config), or that another
number of processes wrote (no data-iterator position for this one), is an error
instead: nothing is moved; so is running out of memory while restoring.
"""
from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath


class ProcessJsonHandler(ocp.CheckpointHandler):
  """Each process saves its own JSON document (process_{i}-of-{n}.json)."""

  def _file(self, directory) -> epath.Path:
    return epath.Path(directory) / f'process_{jax.process_index()}-of-{jax.process_count()}.json'

  def save(self, directory, args: 'ProcessJsonSave'):
    self._file(directory).write_text(json.dumps(args.item))

  def restore(self, directory, args: Optional['ProcessJsonRestore'] = None):
    f = self._file(directory)
    if not f.exists():
      raise ValueError(f'{f} not found: was the checkpoint written with another process count?')
    return json.loads(f.read_text())

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


@ocp.args.register_with_handler(ProcessJsonHandler, for_save=True)
@dataclasses.dataclass
class ProcessJsonSave(ocp.args.CheckpointArgs):
  item: Any


@ocp.args.register_with_handler(ProcessJsonHandler, for_restore=True)
@dataclasses.dataclass
class ProcessJsonRestore(ocp.args.CheckpointArgs):
  item: Any = None


def out_of_memory(e: BaseException) -> bool:
  """Whether an exception says the host or an accelerator ran out of memory (MemoryError,
  XLA's RESOURCE_EXHAUSTED), anywhere in its chain: a failure of the machine, not damage."""
  while e is not None:
    text = str(e)
    if isinstance(e, MemoryError) or 'RESOURCE_EXHAUSTED' in text or 'out of memory' in text.lower():
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: BaseException) -> str:
  return f'{type(e).__name__}: {e}'.splitlines()[0][:300]


def _path(keys) -> str:
  """'params/blocks_0/attn/kernel' for a tree path of attributes, dict keys or indices."""
  return '/'.join(str(getattr(k, 'name', getattr(k, 'key', getattr(k, 'idx', k)))) for k in keys)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


class ShapeMismatch(Exception):
  """A readable checkpoint of another model or process count (not damage: never moved aside)."""


class CheckpointManager:
  """Thin orbax wrapper: save/restore (state, data-iterator state, metadata)."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(
        self.directory, options=options,
        item_handlers={'state': ocp.StandardCheckpointHandler(), 'data': ProcessJsonHandler(),
                       'meta': ocp.JsonCheckpointHandler()})

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def should_save(self, step: int) -> bool:
    return self._mngr.should_save(step)

  def save(self, step: int, state: Any, *, data_state: Any = None, meta: Any = None,
           force: bool = False) -> bool:
    """Saves if `step` is a save step (or `force`); async unless the manager is sync.

    `data_state` is captured now (a JSON-able dict), so the iterator may advance
    while the write finishes in the background."""
    items = {'state': ocp.args.StandardSave(state)}
    if data_state is not None:
      items['data'] = ProcessJsonSave(data_state)
    if meta is not None:
      items['meta'] = ocp.args.JsonSave(meta)
    return self._mngr.save(int(step), args=ocp.args.Composite(**items), force=force)

  def restore(self, step: int, abstract_state: Any) -> Tuple[Any, Any]:
    """(state, data_state or None). `abstract_state` holds ShapeDtypeStructs with shardings."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = os.path.isdir(os.path.join(self.directory, str(step), 'data'))
    if has_data:
      items['data'] = ProcessJsonRestore()
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out['state'], (out['data'] if has_data else None)

  def restore_latest(self, abstract_state: Any) -> Optional[Tuple[int, Any, Any]]:
    """(step, state, data_state) of the newest checkpoint that restores; None if none does.

    A checkpoint that cannot be read is moved aside (see the module docstring); one
    written for other shapes raises ValueError (the config changed: nothing is moved)."""
    from var_jax.checkpoint import quiet_orbax
    while True:
      step = self._mngr.latest_step()
      if step is None:
        return None
      try:
        with quiet_orbax():
          self._check_shapes(step, abstract_state)
          self._check_processes(step)
          state, data = self.restore(step, abstract_state)
        return step, state, data
      except ShapeMismatch as e:
        raise ValueError(str(e)) from None
      except Exception as e:   # orbax/tensorstore raise assorted types for unreadable files
        if out_of_memory(e):   # the machine, not the files: moving them aside starts over
          raise MemoryError(f'checkpoint {step} in {self.directory} could not be restored for '
                            f'lack of memory ({_first_line(e)}); nothing was moved: free '
                            'memory (or use more devices) and rerun') from None
        reason = _first_line(e)
        where = self._set_aside(step)
        print(f'[checkpoint] WARNING: checkpoint {step} cannot be restored ({reason}); moved '
              f'to {where}, trying the previous one', file=sys.stderr, flush=True)

  def _check_shapes(self, step: int, abstract_state: Any) -> None:
    """ShapeMismatch if the stored state's tree or shapes differ from `abstract_state`."""
    stored = self._mngr.item_metadata(step)['state']
    tree = getattr(stored, 'tree', stored)
    want = jax.tree_util.tree_flatten_with_path(abstract_state)[0]
    have = {_path(k): v for k, v in jax.tree_util.tree_flatten_with_path(
        tree, is_leaf=lambda x: hasattr(x, 'shape'))[0]}
    problems = []
    for path, leaf in want:
      key = _path(path)
      got = have.pop(key, None)
      if got is None:
        problems.append(f'{key} missing')
      elif tuple(got.shape) != tuple(leaf.shape):
        problems.append(f'{key} has shape {tuple(got.shape)}, the model {tuple(leaf.shape)}')
    problems += [f'{k} not in the model' for k in have]
    if problems:
      raise ShapeMismatch(
          f'checkpoint {step} in {self.directory} was written for another model or optimizer '
          f'({len(problems)} difference(s), e.g. {"; ".join(problems[:3])}); use another '
          '--workdir or the config it was trained with')

  def _check_processes(self, step: int) -> None:
    """ShapeMismatch if step's data-iterator files were written by another process count
    (a readable checkpoint: moving it aside as damage restarted the run from step 0)."""
    data = os.path.join(self.directory, str(step), 'data')
    names = os.listdir(data) if os.path.isdir(data) else []
    counts = sorted({n[:-len('.json')].rsplit('-of-', 1)[1] for n in names
                     if n.startswith('process_') and '-of-' in n and n.endswith('.json')})
    if counts and str(jax.process_count()) not in counts:   # a missing file of ours is damage
      raise ShapeMismatch(
          f'checkpoint {step} in {self.directory} was written by {" or ".join(counts)} '
          f'process(es); this run has {jax.process_count()} (each process resumes its own data '
          'position): resume with as many processes, or use another --workdir')

  def _set_aside(self, step: int) -> str:
    """Moves step `step` to <workdir>/damaged_checkpoints/<step>[.n]; all processes agree."""
    src = os.path.join(self.directory, str(step))
    dst_root = os.path.join(os.path.dirname(self.directory), 'damaged_checkpoints')
    dst = os.path.join(dst_root, str(step))
    n = 1
    while os.path.exists(dst):
      dst, n = os.path.join(dst_root, f'{step}.{n}'), n + 1
    _sync(f'var_jax_set_aside_{step}_begin')   # every process has chosen `dst`
    if jax.process_index() == 0:
      os.makedirs(dst_root, exist_ok=True)
      os.replace(src, dst)
    _sync(f'var_jax_set_aside_{step}_end')
    self._mngr.reload()
    return dst

  def reached_preemption(self, step: int) -> bool:
    """True on every process once a preemption notice reached the cluster (jax.distributed)."""
    try:
      return self._mngr.reached_preemption(int(step))
    except Exception:  # no preemption service (single process without jax.distributed)
      return False

  def wait(self) -> None:
    self._mngr.wait_until_finished()

  def close(self) -> None:
    self._mngr.wait_until_finished()
    self._mngr.close()
