"""Multi-scale VQVAE training loop, on the VAR trainer's mesh, data, optimiser and checkpoints.

    trainer = VQVAETrainer(load_config('configs/digits_vqvae.py'), workdir='/tmp/vq')
    summary = trainer.train()   # resumes from workdir/checkpoints; exports workdir/export

The steps (losses, straight-through VQ, discriminator, EMA, restarts) are the pure
functions of var_jax.train.vqvae_step, jitted here once with explicit shardings:
params and optimizer moments by the logical-axis rules, batches over (data, fsdp).
Logs: train/{loss, l1, mse, vq, lpips, g_loss, d_loss, d_weight, grad_norm},
train_usage/scale_{pn} (% of the codebook above the reference's hit margin), and
eval/{psnr, ssim, l1, lpips, usage_{pn}, perplexity_{pn}} on the eval split.
The export (workdir/export) is a native checkpoint: `var_jax.load(dir)`, and
config.vae.checkpoint of the VAR trainer.
"""
from __future__ import annotations

import json
import logging
import os
import time
from typing import Any, Dict, Optional

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax import parallel
from var_jax.config import ModelConfig
from var_jax.data import images as data_lib
from var_jax.eval import metrics as eval_lib
from var_jax.train import checkpoint_manager, losses, optim, preemption, writer as metrics_lib
from var_jax.train import vqvae_step as vs
from var_jax.train.state import TrainState, abstract_with_shardings, count_params, to_host

log = logging.getLogger('var_jax.train')


class VQVAETrainer:
  """Builds everything from a config; `train()` runs (and resumes) the loop."""

  def __init__(self, config, workdir: str, devices=None):
    from var_jax.tokenizer.vqvae import VQVAE
    c = self.cfg = config
    self.workdir = os.path.abspath(workdir)
    self.mesh = parallel.make_mesh(c.mesh.data, c.mesh.fsdp, c.mesh.tensor, devices=devices)
    self.rules = tuple((k, tuple(v) if isinstance(v, list) else v)
                       for k, v in c.logical_axis_rules) or parallel.LOGICAL_RULES
    self.vae_cfg = vs.vqvae_config_from(c.model)
    self.image_size = self.vae_cfg.image_size
    self.vae = VQVAE(self.vae_cfg, dtype=jnp.dtype(c.dtype), param_dtype=jnp.dtype(c.param_dtype))
    lc = c.loss
    self.lpips_params = (losses.load_lpips_params(lc.lpips_weights) if lc.lpips > 0 else None)
    if lc.lpips > 0 and self.lpips_params is None:
      metrics_lib.print0('[train-vqvae] perceptual loss OFF: loss.lpips > 0 but the LPIPS '
                         f'weights {lc.lpips_weights!r} are not there (see var_jax.train.losses)')
    self.use_lpips = self.lpips_params is not None
    self.lpips = losses.LPIPS(dtype=jnp.dtype(c.dtype))
    self.use_disc = lc.disc > 0
    self.disc = losses.PatchDiscriminator(lc.disc_ndf, lc.disc_layers, dtype=jnp.dtype(c.dtype))

    # data and schedule
    self.train_source = data_lib.make_source(c.data, 'train', self.image_size)
    self.global_batch = int(c.batch_size)
    self.steps_per_epoch = max(len(self.train_source) // self.global_batch, 1)
    self.total_steps = int(c.total_steps)
    o = c.optim
    spec = dict(b1=o.b1, b2=o.b2, eps=o.eps, wd=o.wd, wd_end=o.wd_end, grad_clip=o.clip,
                sche=o.sche, warmup_steps=o.warmup_steps, wp0=o.wp0, wpe=o.wpe)
    self.optim_spec = optim.OptimSpec(peak_lr=o.lr, **spec)
    self.disc_spec = optim.OptimSpec(peak_lr=o.disc_lr if o.disc_lr > 0 else o.lr, **spec)

    # state
    S = self.image_size
    dummy = jnp.zeros((1, S, S, self.vae_cfg.in_channels), jnp.float32)
    self._vae_init = lambda r: self.vae.init({'params': r}, dummy)['params']
    self._disc_init = lambda r: self.disc.init({'params': r}, dummy)['params']
    abstract_vae = jax.eval_shape(self._vae_init, jax.random.PRNGKey(0))
    self.tx = optim.make_optimizer(abstract_vae, self.optim_spec, self.total_steps)
    self.dtx = None
    if self.use_disc:
      d_steps = max(self.total_steps - lc.disc_start, 1)
      self.dtx = optim.make_optimizer(jax.eval_shape(self._disc_init, jax.random.PRNGKey(0)),
                                      self.disc_spec, d_steps)
    abstract_boxed = jax.eval_shape(self._boxed_state, jax.random.PRNGKey(0))
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_boxed), self.mesh, self.rules)
    self.abstract_state = nn.meta.unbox(abstract_boxed)
    self.num_params = count_params(self.abstract_state.gen.params)

    # jitted steps
    repl = parallel.replicated(self.mesh)
    self._img_sh = parallel.batch_sharding(self.mesh, 4)
    self._mask_sh = parallel.batch_sharding(self.mesh, 1)
    lp_sh = jax.tree_util.tree_map(lambda _: repl, self.lpips_params)
    self._train_steps = {}
    for use_disc in ((False, True) if self.use_disc else (False,)):
      fn = vs.make_train_step(self.vae, self.disc, self.lpips, self.tx, self.dtx, lc,
                              use_disc=use_disc, use_lpips=self.use_lpips, ema_decay=float(c.ema),
                              vocab=self.vae_cfg.vocab_size)
      self._train_steps[use_disc] = jax.jit(
          fn, in_shardings=(self.state_shardings, self._img_sh, lp_sh),
          out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    cb = c.codebook
    self._restart = jax.jit(
        vs.make_restart_fn(self.vae, threshold=cb.restart_threshold, noise=cb.restart_noise),
        in_shardings=(self.state_shardings, self._img_sh, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self._eval_step = jax.jit(
        vs.make_eval_step(self.vae, self.lpips, use_lpips=self.use_lpips,
                          vocab=self.vae_cfg.vocab_size),
        in_shardings=(self.state_shardings.gen.params,
                      {'image': self._img_sh, 'mask': self._mask_sh}, lp_sh),
        out_shardings=repl)

  # --- state ----------------------------------------------------------------------
  def _boxed_state(self, rng):
    r_vae, r_state, r_disc, r_cb = jax.random.split(rng, 4)
    params = self._vae_init(r_vae)
    if self.cfg.model.codebook_init:
      unboxed = vs.init_codebook(nn.meta.unbox(params), r_cb, self.cfg.model.codebook_init,
                                 self.vae_cfg.vocab_size)
      params = jax.tree_util.tree_map(
          lambda b, u: b.replace_boxed(u) if isinstance(b, nn.meta.AxisMetadata) else u,
          params, unboxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    zero = jnp.zeros([], jnp.int32)
    gen = TrainState(step=zero, params=params, opt_state=self.tx.init(params), rng=r_state,
                     skipped=zero)
    disc = None
    if self.use_disc:
      dp = self._disc_init(r_disc)
      disc = TrainState(step=zero, params=dp, opt_state=self.dtx.init(dp),
                        rng=jax.random.fold_in(r_state, 1), skipped=zero)
    ema = params if self.cfg.ema > 0 else None
    hits = jnp.zeros((self.vae_cfg.num_scales, self.vae_cfg.vocab_size), jnp.float32)
    return vs.VQState(gen=gen, disc=disc, ema=ema, hits_SV=hits)

  def init_state(self) -> vs.VQState:
    """A fresh state, born sharded (jit with out_shardings; compiled once per trainer)."""
    if not hasattr(self, '_init_jit'):
      self._init_jit = jax.jit(lambda r: nn.meta.unbox(self._boxed_state(r)),
                               out_shardings=self.state_shardings)
    with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
      return self._init_jit(jax.random.PRNGKey(self.cfg.seed))

  def eval_params(self, state: vs.VQState):
    """The weights evaluated and exported: the EMA when on."""
    return state.ema if state.ema is not None else state.gen.params

  # --- data -----------------------------------------------------------------------
  def make_train_iter(self):
    return data_lib.make_train_pipeline(self.train_source, self.cfg.data, seed=self.cfg.seed,
                                        global_batch_size=self.global_batch,
                                        image_size=self.image_size)

  def _global(self, arr, sh):
    return jax.make_array_from_process_local_data(sh, arr)

  # --- eval -----------------------------------------------------------------------
  def evaluate(self, params, max_batches: int = -1) -> Dict[str, float]:
    it = data_lib.make_eval_pipeline(self.cfg.data, global_batch_size=self.global_batch,
                                     image_size=self.image_size)

    def step(local):
      batch = {'image': self._global(local['image'], self._img_sh),
               'mask': self._global(local['mask'], self._mask_sh)}
      with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
        return self._eval_step(params, batch, self.lpips_params)

    total = metrics_lib.sum_over_batches(it, step, max_batches)
    hits = total.pop('hits')
    n = max(float(total.pop('count')), 1.0)
    res = {k: float(v) / n for k, v in total.items()}
    for pn, u, p in zip(self.vae_cfg.v_patch_nums, eval_lib.codebook_usage(hits),
                        eval_lib.codebook_perplexity(hits)):
      res[f'usage_{pn}'], res[f'perplexity_{pn}'] = float(u), float(p)
    res['usage_all'] = float(eval_lib.codebook_usage(hits.sum(0, keepdims=True))[0])
    return res

  # --- the loop ---------------------------------------------------------------------
  def train(self, stop_after: Optional[int] = None) -> Dict[str, Any]:
    """Runs to total_steps (or `stop_after` steps in total), resuming from the latest checkpoint."""
    c, run = self.cfg, self.cfg.run
    os.makedirs(self.workdir, exist_ok=True)
    writer = metrics_lib.Writer(self.workdir)
    mngr = checkpoint_manager.CheckpointManager(os.path.join(self.workdir, 'checkpoints'), keep=run.keep,
                                           save_every=run.save_every, async_save=run.async_checkpoint)
    it = self.make_train_iter()
    start = mngr.latest_step()
    if start is not None:
      state, data_state = mngr.restore(start, abstract_with_shardings(self.abstract_state,
                                                                      self.state_shardings))
      if data_state is not None:
        it.set_state(data_state)
      metrics_lib.print0(f'[train-vqvae] resumed from step {start} ({mngr.directory})')
    else:
      start, state = 0, self.init_state()
      if jax.process_index() == 0:
        with open(os.path.join(self.workdir, 'config.json'), 'w') as f:
          f.write(c.to_json_best_effort(indent=1))
    end = self.total_steps if stop_after is None else min(stop_after, self.total_steps)
    extras = [n for n, on in (('LPIPS', self.use_lpips), (f'disc from {c.loss.disc_start}', self.use_disc),
                              (f'EMA {c.ema}', c.ema > 0),
                              ('restarts', c.codebook.restart_every > 0)) if on]
    metrics_lib.print0(
        f'[train-vqvae] VQVAE {self.image_size}px f{self.vae_cfg.downsample} vocab '
        f'{self.vae_cfg.vocab_size} Cvae {self.vae_cfg.Cvae} ch {self.vae_cfg.ch}: '
        f'{self.num_params / 1e6:.2f}M params, mesh {dict(self.mesh.shape)}, batch '
        f'{self.global_batch}, steps {start} -> {end} of {self.total_steps}, '
        f'lr {self.optim_spec.peak_lr:.3g}, extras: {", ".join(extras) or "none"}')
    stop = preemption.StopFlag().install()
    acc = metrics_lib.MeanAccumulator()
    last: Dict[str, Any] = {}
    last_eval: Dict[str, float] = {}
    status, step = 'done', start
    eval_every = run.eval_every if run.eval_every >= 0 else 10 * self.steps_per_epoch
    cb = c.codebook
    t_log, n_log = time.perf_counter(), 0
    pending = None   # the previous step's device metrics, read after the next step is queued

    def check(dev):
      nonlocal last
      host = jax.device_get(dev)
      if not bool(host.pop('finite')):
        msg = f'non-finite loss or gradient (loss={float(host["loss"]):.4g})'
        if run.nan_policy == 'stop':
          raise FloatingPointError(msg + '; stopping (the last checkpoint is intact)')
        metrics_lib.print0(f'[train-vqvae] {msg}: update skipped')
      usage = host.pop('usage_per_scale')
      acc.add(host)
      last = dict(host, **{f'usage_{pn}': u for pn, u in zip(self.vae_cfg.v_patch_nums, usage)})

    try:
      while step < end:
        if stop.requested or (jax.process_count() > 1 and mngr.reached_preemption(step)):
          status = 'preempted'
          break
        images = self._global(next(it)['image'], self._img_sh)
        use_disc = self.use_disc and step >= c.loss.disc_start
        with jax.set_mesh(self.mesh), nn.logical_axis_rules(self.rules):
          state, dev = self._train_steps[use_disc](state, images, self.lpips_params)
          step += 1
          if (cb.restart_every > 0 and step % cb.restart_every == 0
              and (cb.restart_until < 0 or step <= cb.restart_until) and step < end):
            state, n_dead = self._restart(state, images, jax.random.PRNGKey(c.seed + step))
            dev = dict(dev, restarted=n_dead)
        if pending is not None:
          check(pending)
        pending = dev
        n_log += 1
        save_now = mngr.should_save(step) or step == end
        if step % run.log_every == 0 or save_now:
          check(pending)
          pending = None
        if step % run.log_every == 0:
          dt = (time.perf_counter() - t_log) / n_log
          writer.scalars(step, acc.result() | {'step_time_s': dt, 'images_per_s': self.global_batch / dt,
                                               'epoch': step / self.steps_per_epoch}, prefix='train')
          writer.scalars(step, {f'scale_{pn}': last[f'usage_{pn}'] for pn in self.vae_cfg.v_patch_nums},
                         prefix='train_usage')
          t_log, n_log = time.perf_counter(), 0
        if save_now:
          mngr.save(step, state, data_state=it.get_state(), meta={'step': step}, force=step == end)
        if eval_every > 0 and (step % eval_every == 0 or step == self.total_steps):
          last_eval = self.evaluate(self.eval_params(state), run.eval_batches)
          writer.scalars(step, last_eval, prefix='eval')
          t_log = time.perf_counter()
      if pending is not None:
        check(pending)
      if status == 'preempted':
        mngr.save(step, state, data_state=it.get_state(), meta={'step': step}, force=True)
        metrics_lib.print0(f'[train-vqvae] stop requested: saved step {step}, exiting')
      mngr.wait()
    finally:
      mngr.close()
      writer.close()
      stop.restore()
    self.state = state
    export = None
    if status == 'done' and step == self.total_steps and run.export:
      export = self.export(state)
    return {'status': status, 'step': step, 'export': export,
            'skipped_updates': int(jax.device_get(state.gen.skipped)),
            **{k: float(np.asarray(v)) for k, v in last.items() if np.ndim(v) == 0},
            **{f'eval_{k}': v for k, v in last_eval.items()}}

  def export(self, state: vs.VQState, directory: Optional[str] = None) -> str:
    """A native var_jax checkpoint of the (EMA) tokenizer, with its code-hit statistics."""
    from var_jax import checkpoint
    out = directory or os.path.join(self.workdir, 'export')
    params, hits = to_host((self.eval_params(state), state.hits_SV))
    hits = np.asarray(hits, np.float32)
    if jax.process_index() == 0:
      checkpoint.save(out, ModelConfig(vae=self.vae_cfg, var=None), params,
                      buffers={'vae': {'quantize.ema_vocab_hit_SV': hits}}, force=True)
      metrics_lib.print0(f'[train-vqvae] exported {out} (var_jax.load, or config.vae.checkpoint '
                         'of the VAR trainer)')
    return out

