"""The one training loop: `state, summary = train_and_evaluate(config, workdir)`.

The loop owns what every run needs: the device mesh and logical-axis rules, the data
iterator (its position is checkpointed), the metrics writer (one metrics.jsonl row
per step, also after resumes), the checkpoint manager (resume from the newest
checkpoint that restores; a damaged one is moved aside), preemption (SIGTERM, or
jax.distributed's notice with several processes: save, stop, status 'preempted'), the
log/save/eval cadence, the non-finite-loss policy (run.nan_policy) and the export.

A model plugs in as a task class, built from a `Context` (`TASKS[config.task]`:
var_task.VARTask, vqvae_task.VQVAETask), that supplies only what differs:

  name                        prefix of its log lines
  image_size(config)          classmethod: the resolution its data is read at
  batch_shardings             {key: NamedSharding} of the batch arrays its steps read
  abstract_state, state_shardings   shapes and shardings of its train state (the
                              restore target); the state has `.skipped` (updates dropped)
  init_state()                a fresh state, born sharded
  train_step(state, batch, step) -> (state, device metrics with 'loss', 'finite')
  host_metrics(metrics)       -> {name: float}, the scalars to log (vectors expanded)
  evaluate(state, batches)    -> {name: float}, over an iterator of global eval batches
  export(state, directory)    writes the trained model (called on every process)
  describe()                  one line for the start of the log
  flops_per_image, tokens_per_image   for MFU and tokens/s (0: not reported)

Everything runs the same on one device, a multi-device mesh, or several processes
(each feeds its slice of every global batch).
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import sys
import time
from typing import Any, Dict, Optional, Tuple

import jax
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh

from var_jax import parallel, safe_io
from var_jax.data import images as data_lib
from var_jax.train import checkpoint_manager, preemption, state as state_lib, writer as writer_lib

# Exit status of `var-jax train` when it stopped on a preemption notice after saving
# (EX_TEMPFAIL of sysexits.h: run the same command again). 0 only when training finished.
PREEMPTED_EXIT_CODE = 75


@dataclasses.dataclass(frozen=True)
class Context:
  """What the loop decides before a task is built."""
  config: Any                 # the whole (locked) ConfigDict
  mesh: Mesh
  rules: Tuple[Tuple[str, Any], ...]
  source: Any                 # the training split (random access)
  global_batch: int
  steps_per_epoch: int
  total_steps: int

  @contextlib.contextmanager
  def activate(self):
    """The mesh and logical-axis rules, for jitted calls and init."""
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      yield


def task_class(config):
  """The task class named by config.task ('var' or 'vqvae')."""
  name = config.get('task', 'var')
  if name == 'var':
    from var_jax.train.var_task import VARTask
    return VARTask
  if name == 'vqvae':
    from var_jax.train.vqvae_task import VQVAETask
    return VQVAETask
  raise ValueError(f"config.task must be 'var' or 'vqvae', got {name!r}")


def mesh_and_rules(config, devices=None) -> Tuple[Mesh, Tuple[Tuple[str, Any], ...]]:
  """The (data, fsdp, tensor) mesh of config.mesh and the logical-axis rules."""
  c = config
  mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
  rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                for k, v in c.logical_axis_rules) or parallel.LOGICAL_RULES
  return mesh, rules


def check_run_options(rc) -> None:
  """ValueError naming the config.run key whose value the loop cannot honour, before any
  work: keep < 1 made orbax delete every checkpoint (a rerun silently started over);
  save_every < 1 meant a checkpoint at every step; log_every < 1 and eval_batches = 0
  failed only after compiling and training up to the first log or eval step; a misspelt
  nan_policy meant 'skip'."""
  if int(rc.keep) < 1:
    raise ValueError(f'config.run.keep must be >= 1 (checkpoints kept), got {rc.keep}')
  if int(rc.save_every) < 1:   # was taken as 1: a checkpoint at every step
    raise ValueError(f'config.run.save_every must be >= 1 (steps between checkpoints; the '
                     f'end of a run always saves), got {rc.save_every}')
  if int(rc.log_every) < 1:
    raise ValueError(f'config.run.log_every must be >= 1 (steps), got {rc.log_every}')
  if int(rc.eval_batches) == 0:
    raise ValueError('config.run.eval_batches must be >= 1, or -1 for the whole eval split '
                     '(config.run.eval_every=0 turns evaluation off), got 0')
  if rc.nan_policy not in ('stop', 'skip'):
    raise ValueError(f"config.run.nan_policy must be 'stop' or 'skip', got {rc.nan_policy!r}")


def make_context(config, devices=None, image_size: Optional[int] = None) -> Context:
  """Mesh, rules, training source and step counts from a config."""
  c = config
  check_run_options(c.run)
  mesh, rules = mesh_and_rules(c, devices)
  if image_size is None:
    image_size = task_class(c).image_size(c)
  source = data_lib.make_source(c.data, 'train', image_size)
  gb = int(c.batch_size)
  if gb <= 0:
    raise ValueError(f'config.batch_size must be >= 1, got {gb}')
  steps_per_epoch = max(len(source) // gb, 1)
  total = int(c.total_steps) if c.total_steps > 0 else int(c.get('ep', 0) * steps_per_epoch)
  if total <= 0:
    raise ValueError('set config.total_steps or config.ep (> 0)')
  return Context(c, mesh, rules, source, gb, steps_per_epoch, total)


def make_task(config, devices=None):
  """The task for config.task, with its mesh over `devices` (default: all)."""
  cls = task_class(config)
  return cls(make_context(config, devices, cls.image_size(config)))


def train_and_evaluate(config, workdir: str, *, stop_after: Optional[int] = None,
                       devices=None) -> Tuple[Any, Dict[str, Any]]:
  """Builds the task of `config` and runs it in `workdir` (see `run`); SIGTERM while the
  task is built also ends in a checkpoint and status 'preempted'."""
  safe_io.require_local(workdir, 'workdir')   # before the task is built
  with preemption.StopFlag() as stop:
    return run(make_task(config, devices), workdir, stop_after=stop_after, stop=stop)


def run(task, workdir: str, *, stop_after: Optional[int] = None,
        stop: Optional[preemption.StopFlag] = None) -> Tuple[Any, Dict[str, Any]]:
  """Trains `task` to total_steps (or `stop_after` steps in total), resuming from the newest
  checkpoint in workdir/checkpoints. Returns (final state, summary); summary['status'] is
  'done' or 'preempted'. A task (its compiled steps) can run several workdirs in turn.
  `stop`: an installed StopFlag (default: one installed here, before the restore), so
  that SIGTERM at any moment of the start-up is a preemption, not the process's death."""
  ctx = task.ctx
  c, rc = ctx.config, ctx.config.run
  safe_io.require_local(workdir, 'workdir')   # 'gs://b/run' would become ./gs:/b/run
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  say = lambda msg: writer_lib.print0(f'[{task.name}] {msg}')
  mngr = checkpoint_manager.CheckpointManager(
      os.path.join(workdir, 'checkpoints'), keep=rc.keep, save_every=rc.save_every,
      async_save=rc.async_checkpoint)
  writer = None
  own_stop = stop is None
  if own_stop:
    stop = preemption.StopFlag().install()
  try:
    it = data_lib.make_train_pipeline(ctx.source, c.data, seed=c.seed,
                                      global_batch_size=ctx.global_batch,
                                      image_size=task.image_size(c))
    found = mngr.restore_latest(state_lib.abstract_with_shardings(task.abstract_state,
                                                                  task.state_shardings))
    if found is not None:
      start, state, data_state = found
      if data_state is not None:
        it.set_state(data_state)
      say(f'resumed from step {start} ({mngr.directory})')
      _warn_config_changes(workdir, c, task.name)
    else:
      start, state = 0, task.init_state()
    writer = writer_lib.Writer(workdir, resume_step=start, name=task.name)
    if start == 0 and jax.process_index() == 0:
      with open(os.path.join(workdir, 'config.json'), 'w') as f:
        f.write(c.to_json_best_effort(indent=1))
      writer.text('config', c.to_json_best_effort(indent=1))
    end = ctx.total_steps if stop_after is None else min(stop_after, ctx.total_steps)
    say(f'{task.describe()}; mesh {dict(ctx.mesh.shape)}, global batch {ctx.global_batch}, '
        f'{ctx.steps_per_epoch} steps/epoch, steps {start} -> {end} of {ctx.total_steps}, '
        f'{jax.process_count()} process(es)')
    state, step, status, last, last_eval = _loop(task, state, it, start, end, mngr, writer,
                                                 stop, say)
    mngr.wait()
  finally:
    mngr.close()
    if writer is not None:
      writer.close()
    if own_stop:
      stop.restore()
  export = None
  if status == 'done' and step == ctx.total_steps and rc.export:
    export = os.path.join(workdir, 'export')
    task.export(state, export)
  summary = {'status': status, 'step': step, 'export': export,
             'skipped_updates': int(jax.device_get(state.skipped)),
             'skipped_images': it.num_skipped, **last,
             **{f'eval_{k}': v for k, v in last_eval.items()}}
  return state, summary


def config_changes(old: Dict[str, Any], new: Dict[str, Any], prefix: str = '') -> list:
  """['key: old -> new', ...] for the dotted keys whose values differ between two config
  dicts (a key only in one of them shows `(none)` on the other side)."""
  out = []
  for k in sorted(set(old) | set(new)):
    a, b = old.get(k, '(none)'), new.get(k, '(none)')
    if isinstance(a, dict) and isinstance(b, dict):
      out += config_changes(a, b, f'{prefix}{k}.')
    elif a != b:
      out.append(f'{prefix}{k}: {json.dumps(a)} -> {json.dumps(b)}')
  return out


def _warn_config_changes(workdir: str, config, name: str) -> None:
  """On resume: a warning listing what differs from WORKDIR/config.json (the config the run
  started with), since a checkpoint of the same shapes restores under any other values."""
  path = os.path.join(workdir, 'config.json')
  if jax.process_index() != 0 or not os.path.isfile(path):
    return
  try:
    with open(path) as f:
      old = json.load(f)
  except (OSError, ValueError):
    return
  changes = config_changes(old, json.loads(config.to_json_best_effort()))
  if changes:
    shown = '; '.join(changes[:8]) + (f'; and {len(changes) - 8} more' if len(changes) > 8 else '')
    print(f'[{name}] WARNING: resuming with a config that differs from {path} (the one this '
          f'run started with): {shown}', file=sys.stderr, flush=True)


def _loop(task, state, it, start: int, end: int, mngr, writer, stop, say):
  """The steps start -> end with their cadence; returns (state, step, status, last, last_eval)."""
  ctx = task.ctx
  rc = ctx.config.run
  eval_every = rc.eval_every if rc.eval_every >= 0 else 10 * ctx.steps_per_epoch
  peak = rc.peak_flops_per_device or writer_lib.peak_flops()
  acc = writer_lib.MeanAccumulator()
  last: Dict[str, float] = {}
  last_eval: Dict[str, float] = {}
  pending = None              # (step, device metrics) not yet checked on the host
  t_log, n_log = time.perf_counter(), 0

  def check(p):
    nonlocal last
    s, dev = p
    host = jax.device_get(dev)
    if not bool(host.pop('finite')):
      msg = (f'non-finite loss or gradient at step {s} (loss={float(host["loss"]):.4g}, '
             f'grad_norm={float(host.get("grad_norm", np.nan)):.4g})')
      if rc.nan_policy == 'stop':
        raise FloatingPointError(msg + '; stopping without saving a checkpoint (the last '
                                 'saved one is intact). Try a lower lr or run.nan_policy=skip.')
      say(f'{msg}: update skipped')
    last = task.host_metrics(host)
    acc.add(last)

  step, status = start, 'done'
  while step < end:
    if stop.requested or (jax.process_count() > 1 and mngr.reached_preemption(step)):
      status = 'preempted'
      break
    batch = global_batch(next(it), task.batch_shardings)
    with ctx.activate():
      state, dev_metrics = task.train_step(state, batch, step)
    if pending is not None:
      check(pending)
    pending = (step, dev_metrics)
    step += 1
    n_log += 1
    log_now = step % rc.log_every == 0
    save_now = mngr.should_save(step) or step == end
    row = {}
    if log_now or save_now:
      check(pending)
      pending = None
    if log_now:
      dt = (time.perf_counter() - t_log) / n_log
      row.update({f'train/{k}': v for k, v in acc.result().items()})
      row.update({'train/step_time_s': dt, 'train/images_per_s': ctx.global_batch / dt,
                  'train/epoch': step / ctx.steps_per_epoch,
                  'train/skipped_images': it.num_skipped})
      if task.tokens_per_image:
        row['train/tokens_per_s'] = ctx.global_batch * task.tokens_per_image / dt
      if task.flops_per_image and peak > 0:
        row['train/mfu'] = task.flops_per_image * ctx.global_batch / dt / (jax.device_count() * peak)
      t_log, n_log = time.perf_counter(), 0
    if save_now:
      mngr.save(step, state, data_state=it.get_state(), meta={'step': step}, force=step == end)
    if eval_every > 0 and (step % eval_every == 0 or step == ctx.total_steps):
      with ctx.activate():
        last_eval = task.evaluate(state, _eval_batches(task))
      row.update({f'eval/{k}': v for k, v in last_eval.items()})
      t_log = time.perf_counter()
    if row:
      writer.scalars(step, row)
  if pending is not None:
    check(pending)
  if status == 'preempted' and mngr.latest_step() != step:
    mngr.save(step, state, data_state=it.get_state(), meta={'step': step}, force=True)
    say(f'stop requested: saved step {step}, exiting')
  scalars = {k: float(v) for k, v in last.items() if np.ndim(v) == 0}
  return state, step, status, scalars, last_eval


def global_batch(local: Dict[str, np.ndarray], shardings: Dict[str, Any]) -> Dict[str, jax.Array]:
  """This process's slice of a batch -> global arrays (the keys `shardings` names)."""
  return {k: jax.make_array_from_process_local_data(shardings[k], v)
          for k, v in local.items() if k in shardings}


def _eval_batches(task):
  """The eval split as global batches ('mask' marks real examples in the padded last one)."""
  ctx = task.ctx
  shardings = dict(task.batch_shardings, mask=parallel.batch_sharding(ctx.mesh, 1))
  it = data_lib.make_eval_pipeline(ctx.config.data, global_batch_size=ctx.global_batch,
                                   image_size=task.image_size(ctx.config))
  max_batches = ctx.config.run.eval_batches
  for i, local in enumerate(it):
    if 0 <= max_batches <= i:
      return
    yield global_batch(local, shardings)
