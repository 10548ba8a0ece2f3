"""The VQVAE task of the training loop: the multi-scale tokenizer, its losses, EMA and restarts.

    task = loop.make_task(load_config('configs/digits_vqvae.py'))
    state, summary = loop.run(task, '/tmp/vq')   # resumes; exports workdir/export at the end

The steps (losses, straight-through VQ, discriminator, EMA, dead-code restarts) are the
pure functions of var_jax.train.vqvae_step, jitted here once with explicit shardings:
params and optimizer moments by the logical-axis rules, batches over (data, fsdp).
Logs: train/{loss, l1, mse, vq, lpips, g_loss, d_loss, d_weight, grad_norm, usage_<pn>}
(usage: % of the codebook above the reference's hit margin, per scale) and
eval/{psnr, ssim, l1, lpips, usage_<pn>, perplexity_<pn>} on the eval split.
The export is a native checkpoint: `var_jax.load(dir)`, and config.vae.checkpoint of
the VAR task.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax import parallel
from var_jax.config import ModelConfig, VQVAEConfig
from var_jax.eval import metrics as eval_lib
from var_jax.train import loss_networks, optim, state as state_lib, vqvae_step as vs
from var_jax.train import writer as writer_lib


class VQVAETask:
  """See var_jax.train.loop for the interface."""
  name = 'vqvae'
  flops_per_image = 0.0
  tokens_per_image = 0

  @classmethod
  def image_size(cls, config) -> int:
    return VQVAEConfig.from_section(config.model).image_size

  def __init__(self, ctx):
    from var_jax.tokenizer.vqvae import VQVAE
    self.ctx = c = ctx
    cfg = ctx.config
    if cfg.data.kind == 'tokens':
      raise ValueError("data.kind='tokens' trains the VAR only; the VQVAE needs images")
    self.vae_cfg = VQVAEConfig.from_section(cfg.model)
    dtype = jnp.dtype(cfg.dtype)
    self.vae = VQVAE(self.vae_cfg, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype))
    lc = cfg.loss
    self.lpips_params = loss_networks.load_lpips_params(lc.lpips_weights) if lc.lpips > 0 else None
    if lc.lpips > 0 and self.lpips_params is None:
      writer_lib.print0(f'[{self.name}] perceptual loss OFF: loss.lpips > 0 but the LPIPS weights '
                        f'{lc.lpips_weights!r} are not there (see var_jax.train.loss_networks)')
    self.use_lpips = self.lpips_params is not None
    self.lpips = loss_networks.LPIPS(dtype=dtype)
    self.use_disc = lc.disc > 0
    self.disc = loss_networks.PatchDiscriminator(lc.disc_ndf, lc.disc_layers, dtype=dtype)

    # optimisers
    o = cfg.optim
    kw = dict(global_batch=c.global_batch, steps_per_epoch=c.steps_per_epoch, total_steps=c.total_steps)
    self.optim_spec = optim.spec_from_section(o, **kw)
    S = self.image_size(cfg)
    dummy = jnp.zeros((1, S, S, self.vae_cfg.in_channels), jnp.float32)
    self._vae_init = lambda r: self.vae.init({'params': r}, dummy)['params']
    self._disc_init = lambda r: self.disc.init({'params': r}, dummy)['params']
    self.tx = optim.make_optimizer(jax.eval_shape(self._vae_init, jax.random.PRNGKey(0)),
                                   self.optim_spec, c.total_steps)
    self.dtx = None
    if self.use_disc:
      disc_spec = dataclasses.replace(self.optim_spec, peak_lr=o.disc_lr if o.disc_lr > 0 else o.lr)
      self.dtx = optim.make_optimizer(jax.eval_shape(self._disc_init, jax.random.PRNGKey(0)),
                                      disc_spec, max(c.total_steps - lc.disc_start, 1))

    # state
    abstract_boxed = jax.eval_shape(self._boxed_state, jax.random.PRNGKey(0))
    self.state_shardings = nn.logical_to_mesh_sharding(
        nn.get_partition_spec(abstract_boxed), c.mesh, c.rules)
    self.abstract_state = nn.meta.unbox(abstract_boxed)
    self.num_params = state_lib.count_params(self.abstract_state.gen.params)
    self._init = jax.jit(lambda r: nn.meta.unbox(self._boxed_state(r)),
                         out_shardings=self.state_shardings)

    # jitted steps
    repl = parallel.replicated(c.mesh)
    img_sh = parallel.batch_sharding(c.mesh, 4)
    self.batch_shardings = {'image': img_sh}
    lp_sh = jax.tree_util.tree_map(lambda _: repl, self.lpips_params)
    self._train_steps = {}
    for use_disc in ((False, True) if self.use_disc else (False,)):
      fn = vs.make_train_step(self.vae, self.disc, self.lpips, self.tx, self.dtx, lc,
                              use_disc=use_disc, use_lpips=self.use_lpips,
                              ema_decay=float(cfg.ema), vocab=self.vae_cfg.vocab_size)
      self._train_steps[use_disc] = jax.jit(
          fn, in_shardings=(self.state_shardings, img_sh, lp_sh),
          out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    cb = cfg.codebook
    self._restart = jax.jit(
        vs.make_restart_fn(self.vae, threshold=cb.restart_threshold, noise=cb.restart_noise),
        in_shardings=(self.state_shardings, img_sh, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    self._eval_step = jax.jit(
        vs.make_eval_step(self.vae, self.lpips, use_lpips=self.use_lpips,
                          vocab=self.vae_cfg.vocab_size),
        in_shardings=(self.state_shardings.gen.params,
                      {'image': img_sh, 'mask': parallel.batch_sharding(c.mesh, 1)}, lp_sh),
        out_shardings=repl)

  def _boxed_state(self, rng):
    cfg = self.ctx.config
    r_vae, r_state, r_disc, r_cb = jax.random.split(rng, 4)
    params = self._vae_init(r_vae)
    if cfg.init.codebook:
      unboxed = vs.init_codebook(nn.meta.unbox(params), r_cb, cfg.init.codebook,
                                 self.vae_cfg.vocab_size)
      params = jax.tree_util.tree_map(
          lambda b, u: b.replace_boxed(u) if isinstance(b, nn.meta.AxisMetadata) else u,
          params, unboxed, is_leaf=lambda x: isinstance(x, nn.meta.AxisMetadata))
    zero = jnp.zeros([], jnp.int32)
    gen = state_lib.TrainState(step=zero, params=params, opt_state=self.tx.init(params),
                               rng=r_state, skipped=zero)
    disc = None
    if self.use_disc:
      dp = self._disc_init(r_disc)
      disc = state_lib.TrainState(step=zero, params=dp, opt_state=self.dtx.init(dp),
                                  rng=jax.random.fold_in(r_state, 1), skipped=zero)
    ema = params if cfg.ema > 0 else None
    hits = jnp.zeros((self.vae_cfg.num_scales, self.vae_cfg.vocab_size), jnp.float32)
    return vs.VQState(gen=gen, disc=disc, ema=ema, hits_SV=hits)

  def eval_params(self, state: vs.VQState):
    """The weights evaluated and exported: the EMA when on."""
    return state.ema if state.ema is not None else state.gen.params

  # --- the interface of var_jax.train.loop ----------------------------------------------
  def describe(self) -> str:
    cfg, v = self.ctx.config, self.vae_cfg
    extras = [n for n, on in (('LPIPS', self.use_lpips),
                              (f'disc from {cfg.loss.disc_start}', self.use_disc),
                              (f'EMA {cfg.ema}', cfg.ema > 0),
                              ('restarts', cfg.codebook.restart_every > 0)) if on]
    return (f'VQVAE {v.image_size}px f{v.downsample} vocab {v.vocab_size} Cvae {v.Cvae} ch {v.ch}: '
            f'{self.num_params / 1e6:.2f}M params, lr {self.optim_spec.peak_lr:.3g}, '
            f'extras: {", ".join(extras) or "none"}')

  def init_state(self) -> vs.VQState:
    with self.ctx.activate():
      return self._init(jax.random.PRNGKey(self.ctx.config.seed))

  def train_step(self, state, batch, step: int):
    cfg, cb = self.ctx.config, self.ctx.config.codebook
    images = batch['image']
    use_disc = self.use_disc and step >= cfg.loss.disc_start
    state, metrics = self._train_steps[use_disc](state, images, self.lpips_params)
    done = step + 1
    if (cb.restart_every > 0 and done % cb.restart_every == 0
        and (cb.restart_until < 0 or done <= cb.restart_until) and done < self.ctx.total_steps):
      state, n_dead = self._restart(state, images, jax.random.PRNGKey(cfg.seed + done))
      metrics = dict(metrics, restarted=n_dead)
    return state, metrics

  def host_metrics(self, host: Dict[str, Any]) -> Dict[str, float]:
    out = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
    out.update({f'usage_{pn}': float(u)
                for pn, u in zip(self.vae_cfg.v_patch_nums, host['usage_per_scale'])})
    return out

  def evaluate(self, state, batches) -> Dict[str, float]:
    params = self.eval_params(state)
    total = writer_lib.sum_over_batches(
        batches, lambda b: self._eval_step(params, b, self.lpips_params))
    hits = total.pop('hits')
    n = max(float(total.pop('count')), 1.0)
    res = {k: float(v) / n for k, v in total.items()}
    for pn, u, p in zip(self.vae_cfg.v_patch_nums, eval_lib.codebook_usage(hits),
                        eval_lib.codebook_perplexity(hits)):
      res[f'usage_{pn}'], res[f'perplexity_{pn}'] = float(u), float(p)
    res['usage_all'] = float(eval_lib.codebook_usage(hits.sum(0, keepdims=True))[0])
    return res

  def export(self, state: vs.VQState, directory: str) -> None:
    """A native var_jax checkpoint of the (EMA) tokenizer, with its code-hit statistics."""
    from var_jax import checkpoint
    params, hits = state_lib.to_host((self.eval_params(state), state.hits_SV))
    if jax.process_index() == 0:
      checkpoint.save(directory, ModelConfig(vae=self.vae_cfg, var=None), params,
                      buffers={'vae': {'quantize.ema_vocab_hit_SV': np.asarray(hits, np.float32)}},
                      force=True)
      writer_lib.print0(f'[{self.name}] exported {directory} (var_jax.load, or config.vae.checkpoint '
                        'of the VAR trainer)')
