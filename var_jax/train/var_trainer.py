"""VAR training loop: frozen VQVAE tokenizer + VAR transformer, sharded over a device mesh.

    trainer = VARTrainer(load_config('configs/var_tiny.py'), workdir='/tmp/run')
    summary = trainer.train()          # resumes from workdir/checkpoints if present

The step (var_jax.train.var_step) is jit-compiled once with explicit in/out shardings:
params and optimizer moments by the logical-axis rules (data / fsdp / tensor mesh
axes), batches split over (data, fsdp), the tokenizer's params replicated. Every
process runs the same loop on its slice of each global batch (var_jax.data.images).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax import parallel
from var_jax.config import ModelConfig, VARConfig, VQVAEConfig
from var_jax.data import images as data_lib
from var_jax.train import checkpoint_manager, optim, preemption, writer as metrics_lib
from var_jax.train import state as state_lib, var_step as step_lib

log = logging.getLogger('var_jax.train')


def load_vqvae(vae_cfg_section) -> tuple:
  """(VQVAEConfig, params) from config.vae: a reference .pth, a native checkpoint dir, or ''
  for a randomly initialised tokenizer built from the section's fields."""
  c = vae_cfg_section
  want = VQVAEConfig(vocab_size=c.vocab_size, z_channels=c.z_channels, ch=c.ch,
                     ch_mult=tuple(c.ch_mult), num_res_blocks=c.num_res_blocks,
                     using_sa=c.using_sa, using_mid_sa=c.using_mid_sa, quant_resi=c.quant_resi,
                     share_quant_resi=c.share_quant_resi, v_patch_nums=tuple(c.patch_nums))
  path = c.checkpoint
  if not path:
    return want, random_vqvae_params(want)
  import var_jax
  if os.path.isdir(path):
    pipe = var_jax.load(path)
    got = dataclasses.replace(pipe.config.vae, v_patch_nums=want.v_patch_nums)
  elif os.path.isfile(path):
    pipe = var_jax.from_torch(path, config=ModelConfig(vae=want, var=None))
    got = pipe.config.vae
  else:
    raise ValueError(f'config.vae.checkpoint {path!r} not found (a .pth file or a native '
                     "checkpoint directory; '' for a random tokenizer)")
  return got, pipe.vae_params


def random_vqvae_params(cfg: VQVAEConfig, seed: int = 1234):
  """A random tokenizer without compiling its forward (eval_shape + numpy): conv/dense
  kernels ~ N(0, 1/fan_in), norms 1, biases 0, codebook ~ N(0, 1). Deterministic in seed."""
  from flax import traverse_util
  from var_jax.tokenizer.vqvae import VQVAE
  size = cfg.image_size
  shapes = nn.meta.unbox(jax.eval_shape(
      VQVAE(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params'])
  rng = np.random.default_rng(seed)
  out = {}
  for path, a in sorted(traverse_util.flatten_dict(shapes, sep='/').items()):
    leaf = path.rsplit('/', 1)[-1]
    if leaf == 'kernel':
      fan_in = int(np.prod(a.shape[:-1]))
      v = rng.standard_normal(a.shape) / np.sqrt(fan_in)
    elif leaf == 'scale':
      v = np.ones(a.shape)
    elif leaf == 'embedding':
      v = rng.standard_normal(a.shape)
    else:
      v = np.zeros(a.shape)
    out[path] = jnp.asarray(v, a.dtype)
  return traverse_util.unflatten_dict(out, sep='/')


class VARTrainer:
  """Builds everything from a config; `train()` runs (and resumes) the loop."""

  def __init__(self, config, workdir: str, devices=None):
    from var_jax.transformer.model import VAR
    from var_jax.tokenizer.vqvae import VQVAE
    self.cfg, self.workdir = config, os.path.abspath(workdir)
    os.makedirs(self.workdir, exist_ok=True)
    c = config
    self.mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    self.rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                       for k, v in c.logical_axis_rules) or parallel.LOGICAL_RULES

    # models
    self.vae_cfg, vae_params = load_vqvae(c.vae)
    m = c.model
    self.var_cfg = VARConfig(
        num_classes=m.num_classes, depth=m.depth, embed_dim=m.embed_dim, num_heads=m.num_heads,
        mlp_ratio=m.mlp_ratio, drop_rate=m.drop_rate, attn_drop_rate=m.attn_drop_rate,
        drop_path_rate=m.drop_path_rate, norm_eps=m.norm_eps, shared_aln=m.shared_aln,
        cond_drop_rate=m.cond_drop_rate, attn_l2_norm=m.attn_l2_norm,
        patch_nums=self.vae_cfg.v_patch_nums)
    self.model_config = ModelConfig(vae=self.vae_cfg, var=self.var_cfg)
    self.V, self.Cvae = self.vae_cfg.vocab_size, self.vae_cfg.Cvae
    self.vae_model = VQVAE(self.vae_cfg, dtype=jnp.dtype(c.vae.dtype))
    self.var_model = VAR(self.var_cfg, self.V, self.Cvae, dtype=jnp.dtype(c.dtype),
                         param_dtype=jnp.dtype(c.param_dtype), init_std=m.ini,
                         init_adaln=m.aln, init_adaln_gamma=m.alng, init_head=m.hd)
    self.vae_params = state_lib.replicate_tree(vae_params, self.mesh)

    # data and schedule
    self.image_size = self.vae_cfg.image_size
    self.train_source = data_lib.make_source(c.data, 'train', self.image_size)
    n_cls = getattr(self.train_source, 'num_classes', None)
    if n_cls is not None and n_cls > m.num_classes:
      raise ValueError(f'data has {n_cls} classes but config.model.num_classes={m.num_classes}')
    self.global_batch = int(c.batch_size)
    self.steps_per_epoch = max(len(self.train_source) // self.global_batch, 1)
    self.total_steps = int(c.total_steps) if c.total_steps > 0 else int(c.ep * self.steps_per_epoch)
    o = c.optim
    warmup = o.wp * self.steps_per_epoch if o.wp > 0 else self.total_steps / 50
    self.optim_spec = optim.OptimSpec(
        peak_lr=o.lr if o.lr > 0 else o.tblr * self.global_batch / 256, b1=o.b1, b2=o.b2,
        eps=o.eps, wd=o.twd, wd_end=o.twde or o.twd, grad_clip=o.tclip,
        sche=f'lin{c.pg:g}' if c.pg > 0 else o.sche, warmup_steps=warmup, wp0=o.wp0, wpe=o.wpe)
    self.pg_warmup_steps = (c.pgwp * self.steps_per_epoch if c.pgwp > 0 else self.total_steps / 300)

    # state, steps
    init_fn = lambda rng: self.var_model.init(
        {'params': rng}, *(_dummy(self.var_cfg, self.Cvae)))['params']
    abstract_boxed = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
    self.tx = optim.make_optimizer(abstract_boxed, self.optim_spec, self.total_steps)
    self._init_fn = init_fn
    self._init_jit = None
    self.abstract_state, self.state_shardings = state_lib.state_shardings(
        init_fn, self.tx, self.mesh, self.rules)
    self.num_params = state_lib.count_params(self.abstract_state.params)
    self.lr_fn = optim.lr_schedule(self.optim_spec, self.total_steps)
    train_step = step_lib.make_train_step(
        self.var_model, self.vae_model, self.tx, label_smooth=o.ls, grad_accum=o.ac,
        lr_fn=self.lr_fn)
    repl = parallel.replicated(self.mesh)
    self._batch_sh = {'image': parallel.batch_sharding(self.mesh, 4),
                      'label': parallel.batch_sharding(self.mesh, 1),
                      'mask': parallel.batch_sharding(self.mesh, 1)}
    vae_sh = jax.tree_util.tree_map(lambda _: repl, self.vae_params)
    train_batch_sh = {k: self._batch_sh[k] for k in ('image', 'label')}
    self._train_step = jax.jit(
        train_step, in_shardings=(self.state_shardings, vae_sh, train_batch_sh, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self._eval_step = jax.jit(
        step_lib.make_eval_step(self.var_model, self.vae_model),
        in_shardings=(self.state_shardings.params, vae_sh, self._batch_sh), out_shardings=repl)
    self.flops_per_image = step_lib.var_flops_per_image(self.var_cfg, self.V, self.Cvae)
    self.peak_flops = c.run.peak_flops_per_device or step_lib.peak_flops()

  # --- pieces ----------------------------------------------------------------------
  def init_state(self):
    if self._init_jit is None:
      self._init_jit, _ = state_lib.make_sharded_init(self._init_fn, self.tx, self.mesh, self.rules)
    return self._init_jit(jax.random.PRNGKey(self.cfg.seed))

  def make_train_iter(self):
    return data_lib.make_train_pipeline(self.train_source, self.cfg.data, seed=self.cfg.seed,
                                        global_batch_size=self.global_batch,
                                        image_size=self.image_size)

  def global_batch_arrays(self, local: Dict[str, np.ndarray]) -> Dict[str, jax.Array]:
    return {k: jax.make_array_from_process_local_data(self._batch_sh[k], v)
            for k, v in local.items() if k in ('image', 'label')}

  def prog_stage(self, step: int):
    """(prog_si, prog_wp) of the reference's progressive training at optimizer step `step`."""
    c, S = self.cfg, len(self.var_cfg.patch_nums)
    if c.pg <= 0:
      return -1, 1.0
    wp_it, max_it = self.optim_spec.warmup_steps, self.total_steps

    def stage(g):
      if g <= wp_it:
        return c.pg0
      if g >= max_it * c.pg:
        return S - 1
      progress = min(max((g - wp_it) / (max_it * c.pg - wp_it), 0), 1)
      return c.pg0 + round(progress * (S - 1 - c.pg0))

    si = stage(step)
    lo, hi = 0, step   # first step of this stage (stage() is non-decreasing)
    while lo < hi:
      mid = (lo + hi) // 2
      lo, hi = (mid + 1, hi) if stage(mid) < si else (lo, mid)
    prog_wp = max(min((step - lo + 1) / max(self.pg_warmup_steps, 1e-9), 1), 0.01)
    if si == stage(0):
      prog_wp = 1.0
    return (-1 if si == S - 1 else si), prog_wp

  def loss_weights(self, step: int) -> np.ndarray:
    si, wp = self.prog_stage(step)
    return step_lib.loss_weights(self.var_cfg.L, self.var_cfg.begin_ends, si, wp)

  def evaluate(self, params, max_batches: int = -1) -> Dict[str, float]:
    it = data_lib.make_eval_pipeline(self.cfg.data, global_batch_size=self.global_batch,
                                     image_size=self.image_size)

    def step(local):
      batch = {k: jax.make_array_from_process_local_data(self._batch_sh[k], v)
               for k, v in local.items()}
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return self._eval_step(params, self.vae_params, batch)

    total = metrics_lib.sum_over_batches(it, step, max_batches)
    n = max(float(total.pop('count')), 1.0)
    return {k: float(v) / n for k, v in total.items() if np.ndim(v) == 0}

  # --- the loop -----------------------------------------------------------------------
  def train(self, stop_after: Optional[int] = None, workdir: Optional[str] = None) -> Dict[str, Any]:
    """Runs to total_steps (or `stop_after` optimizer steps in total), resuming from the
    latest complete checkpoint. Returns a summary dict (last metrics, step, status).
    `workdir` replaces the constructor's (reuses the compiled steps for another run)."""
    c, run = self.cfg, self.cfg.run
    if workdir is not None:
      self.workdir = os.path.abspath(workdir)
      os.makedirs(self.workdir, exist_ok=True)
    writer = metrics_lib.Writer(self.workdir)
    mngr = checkpoint_manager.CheckpointManager(os.path.join(self.workdir, 'checkpoints'), keep=run.keep,
                                           save_every=run.save_every, async_save=run.async_checkpoint)
    it = self.make_train_iter()
    start = mngr.latest_step()
    if start is not None:
      target = state_lib.abstract_with_shardings(self.abstract_state, self.state_shardings)
      state, data_state = mngr.restore(start, target)
      if data_state is not None:
        it.set_state(data_state)
      metrics_lib.print0(f'[train] resumed from step {start} ({mngr.directory})')
    else:
      start = 0
      state = self.init_state()
      if jax.process_index() == 0:
        with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
          f.write(c.to_json_best_effort(indent=1))
        writer.text('config', c.to_json_best_effort(indent=1))
    end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
    metrics_lib.print0(
        f'[train] VAR d{self.var_cfg.depth}: {self.num_params / 1e6:.2f}M params, mesh '
        f'{dict(self.mesh.shape)}, global batch {self.global_batch} (grad accum {c.optim.ac}), '
        f'{self.steps_per_epoch} steps/epoch, steps {start} -> {end} of {self.total_steps}, '
        f'peak lr {self.optim_spec.peak_lr:.3g}, {jax.process_count()} process(es)')

    stop = preemption.StopFlag().install()
    acc = metrics_lib.MeanAccumulator()
    pending = None                  # (step, device metrics) not yet checked on the host
    last = {}
    status = 'done'
    t_log, steps_since_log = time.perf_counter(), 0
    eval_every = run.eval_every if run.eval_every >= 0 else 10 * self.steps_per_epoch
    tokens_per_step = self.global_batch * self.var_cfg.L

    def check(p):
      nonlocal last
      s, dev = p
      host = jax.device_get(dev)
      if not bool(host['finite']):
        msg = (f'non-finite loss or gradient at step {s} (loss={float(host["loss"]):.4g}, '
               f'grad_norm={float(host["grad_norm"]):.4g})')
        if run.nan_policy == 'stop':
          raise FloatingPointError(msg + '; stopping without saving a checkpoint (the last '
                                   'saved one is intact). Try a lower lr or nan_policy=skip.')
        metrics_lib.print0(f'[train] {msg}: update skipped')
      acc.add({k: v for k, v in host.items() if k != 'finite'})
      last = host

    step = start
    try:
      while step < end:
        if stop.requested or (jax.process_count() > 1 and mngr.reached_preemption(step)):
          status = 'preempted'
          break
        batch = self.global_batch_arrays(next(it))
        lw = jnp.asarray(self.loss_weights(step))
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          state, dev_metrics = self._train_step(state, self.vae_params, batch, lw)
        if pending is not None:
          check(pending)
        pending = (step, dev_metrics)
        step += 1
        steps_since_log += 1
        save_now = mngr.should_save(step) or step == end
        if step % run.log_every == 0 or save_now:
          check(pending)
          pending = None
        if step % run.log_every == 0:
          dt = (time.perf_counter() - t_log) / steps_since_log
          scal = acc.result()
          scal.update(step_time_s=dt, tokens_per_s=tokens_per_step / dt,
                      images_per_s=self.global_batch / dt, skipped_images=it.num_skipped,
                      epoch=step / self.steps_per_epoch)
          if self.peak_flops > 0:
            scal['mfu'] = self.flops_per_image * self.global_batch / dt / (
                jax.device_count() * self.peak_flops)
          writer.scalars(step, scal, prefix='train')
          pn = self.var_cfg.patch_nums
          writer.scalars(step, {f'L_{p * self.vae_cfg.downsample}': v for p, v in zip(pn, last['L_per_scale'])} |
                         {f'acc_{p * self.vae_cfg.downsample}': v for p, v in zip(pn, last['acc_per_scale'])},
                         prefix='train_scales')
          t_log, steps_since_log = time.perf_counter(), 0
        if save_now:
          mngr.save(step, state, data_state=it.get_state(), meta={'step': step},
                    force=step == end)
        if eval_every > 0 and (step % eval_every == 0 or step == self.total_steps):
          ev = self.evaluate(state.params, run.eval_batches)
          writer.scalars(step, ev, prefix='eval')
          t_log = time.perf_counter()
      if pending is not None:
        check(pending)
        pending = None
      if status == 'preempted' and mngr.latest_step() != step:
        mngr.save(step, state, data_state=it.get_state(), meta={'step': step}, force=True)
        metrics_lib.print0(f'[train] stop requested: saved step {step}, exiting')
      mngr.wait()
    finally:
      mngr.close()
      writer.close()
      stop.restore()
    if status == 'done' and step == self.total_steps and run.export:
      self.export(state.params)
    self.state = state
    return {'status': status, 'step': step, 'skipped_updates': int(jax.device_get(state.skipped)),
            'skipped_images': it.num_skipped,
            **{k: float(v) for k, v in last.items() if np.ndim(v) == 0}}

  def export(self, var_params) -> Optional[str]:
    """Writes workdir/export: a native var_jax checkpoint (tokenizer + trained VAR)."""
    try:
      from var_jax import checkpoint
    except ImportError:
      return None
    out = os.path.join(self.workdir, 'export')
    vae_params, var_params = state_lib.to_host((self.vae_params, var_params))
    if jax.process_index() == 0:   # one writer: the other processes hold the same values
      checkpoint.save(out, self.model_config, vae_params, var_params, force=True)
      metrics_lib.print0(f'[train] exported {out} (var_jax.load({out!r}))')
    return out


def _dummy(cfg: VARConfig, Cvae: int):
  return (jnp.zeros((1,), jnp.int32), jnp.zeros((1, cfg.L - cfg.first_l, Cvae), jnp.float32))
