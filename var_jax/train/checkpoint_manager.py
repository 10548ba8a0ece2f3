"""Checkpoints: orbax CheckpointManager over any pytree state + per-process data-iterator state.

Reuse:
  mngr = CheckpointManager(workdir + '/checkpoints', keep=3, save_every=1000, async_save=True)
  step0 = mngr.latest_step()                          # None: fresh start
  state, data_state = mngr.restore(step0, abstract_state)   # abstract: ShapeDtypeStructs with shardings
  mngr.save(step, state, data_state=it.get_state())   # async; returns whether it saved
  mngr.wait(); mngr.close()

A checkpoint is a step directory holding `state` (orbax StandardSave: params,
optimizer state, step, rng, ...), `data` (one JSON file per process: that
process's grain iterator state) and `meta` (JSON, e.g. the config). orbax writes into
a temporary directory and renames it when complete, so a run killed mid-save
resumes from the last complete step; `latest_step()` ignores unfinished ones.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
from typing import Any, Optional, Tuple

import jax
import orbax.checkpoint as ocp
from etils import epath

log = logging.getLogger('var_jax.train')


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


class CheckpointManager:
  """Thin orbax wrapper: save/restore (state, data-iterator state, metadata)."""

  def __init__(self, directory: str, *, keep: int = 3, save_every: int = 1,
               async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, save_interval_steps=max(int(save_every), 1), create=True,
        enable_async_checkpointing=async_save, cleanup_tmp_directories=True)
    self._mngr = ocp.CheckpointManager(self.directory, options=options,
                                       item_names=('state', 'data', 'meta'))

  def latest_step(self) -> Optional[int]:
    return self._mngr.latest_step()

  def all_steps(self):
    return list(self._mngr.all_steps())

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

  def restore(self, step: int, abstract_state: Any, *, with_data: bool = True
              ) -> Tuple[Any, Any]:
    """(state, data_state or None). `abstract_state` holds ShapeDtypeStructs with shardings."""
    items = {'state': ocp.args.StandardRestore(abstract_state)}
    has_data = with_data and os.path.isdir(os.path.join(self.directory, str(step), 'data'))
    if has_data:
      items['data'] = ProcessJsonRestore()
    out = self._mngr.restore(int(step), args=ocp.args.Composite(**items))
    return out['state'], (out['data'] if has_data else None)

  def restore_meta(self, step: int) -> Any:
    if not os.path.isdir(os.path.join(self.directory, str(step), 'meta')):
      return None
    return self._mngr.restore(int(step), args=ocp.args.Composite(meta=ocp.args.JsonRestore()))['meta']

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
