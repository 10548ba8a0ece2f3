"""The VAR task of the training loop: a frozen VQVAE tokenizer and the VAR transformer.

    task = loop.make_task(load_config('configs/var_tiny.py'))
    state, summary = loop.run(task, '/tmp/run')   # or loop.train_and_evaluate(config, workdir)

The step (var_jax.train.var_step) is jit-compiled once with explicit in/out shardings:
params and optimizer moments by the logical-axis rules (data / fsdp / tensor mesh
axes), batches split over (data, fsdp), the tokenizer's params replicated, the state
donated. With data.kind='tokens' the batches hold token maps made by `var-jax
tokenize` with this tokenizer (checked by fingerprint) and only the quantizer's
embedding runs in the step. The attention kernel (model.attention) is resolved once
and logged.
"""
from __future__ import annotations

from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import parallel
from var_jax.config import ModelConfig, VARConfig
from var_jax.train import frozen_tokenizer, optim, state as state_lib, var_step, writer as writer_lib

# Keys of the model section that configure the run, not the network.
MODEL_RUN_KEYS = ('attention', 'remat', 'scan_blocks')


class VARTask:
  """See var_jax.train.loop for the interface."""
  name = 'var'

  @classmethod
  def image_size(cls, config) -> int:
    return frozen_tokenizer.section_config(config.vae).image_size

  def __init__(self, ctx):
    from var_jax.transformer import attention as attention_lib
    from var_jax.transformer.model import VAR, dummy_inputs
    self.ctx = c = ctx
    cfg = ctx.config
    self.from_tokens = cfg.data.kind == 'tokens'

    # models
    self.vae_cfg, vae_params = frozen_tokenizer.load(cfg.vae)
    self.var_cfg = VARConfig.from_section(cfg.model, ignore=MODEL_RUN_KEYS,
                                          patch_nums=self.vae_cfg.v_patch_nums)
    self.model_config = ModelConfig(vae=self.vae_cfg, var=self.var_cfg)
    n_cls = getattr(ctx.source, 'num_classes', None)
    if n_cls is not None and n_cls > self.var_cfg.num_classes:
      raise ValueError(f'data has {n_cls} classes but config.model.num_classes={self.var_cfg.num_classes}')
    if self.from_tokens:
      ctx.source.check(frozen_tokenizer.fingerprint(self.vae_cfg, vae_params),
                       self.vae_cfg.v_patch_nums)
    V, Cvae = self.vae_cfg.vocab_size, self.vae_cfg.Cvae
    dtype = jnp.dtype(cfg.dtype)
    self.attention = attention_lib.resolve(cfg.model.attention, dtype)
    self.vae_model = frozen_tokenizer.make_model(self.vae_cfg, cfg.vae)
    ini = cfg.init
    self.var_model = VAR(self.var_cfg, V, Cvae, dtype=dtype, param_dtype=jnp.dtype(cfg.param_dtype),
                         attention=self.attention, remat=cfg.model.remat,
                         scan_blocks=bool(cfg.model.get('scan_blocks', True)), init_std=ini.std,
                         init_adaln=ini.adaln, init_adaln_gamma=ini.adaln_gamma, init_head=ini.head)
    self._vae_export = vae_params    # the whole tokenizer, for the export
    on_device = {'quantize': vae_params['quantize']} if self.from_tokens else vae_params
    self.vae_params = state_lib.replicate_tree(on_device, c.mesh)

    # optimiser and schedules
    o, pg = cfg.optim, cfg.progressive
    self.optim_spec = optim.spec_from_section(
        o, global_batch=c.global_batch, steps_per_epoch=c.steps_per_epoch,
        total_steps=c.total_steps, schedule=f'lin{pg.until:g}' if pg.until > 0 else None)
    self.stage_warmup_steps = (pg.warmup_epochs * c.steps_per_epoch if pg.warmup_epochs > 0
                               else c.total_steps / 300)
    init_fn = lambda rng: self.var_model.init({'params': rng}, *dummy_inputs(self.var_cfg, Cvae))['params']
    self.tx = optim.make_optimizer(jax.eval_shape(init_fn, jax.random.PRNGKey(0)), self.optim_spec,
                                   c.total_steps)
    self.abstract_state, self.state_shardings = state_lib.state_shardings(
        init_fn, self.tx, c.mesh, c.rules)
    self._init = state_lib.make_sharded_init(init_fn, self.tx, c.mesh, c.rules)[0]
    self.num_params = state_lib.count_params(self.abstract_state.params)

    # jitted steps
    repl = parallel.replicated(c.mesh)
    key, ndim = ('tokens', 2) if self.from_tokens else ('image', 4)
    self.batch_shardings = {key: parallel.batch_sharding(c.mesh, ndim),
                            'label': parallel.batch_sharding(c.mesh, 1)}
    vae_sh = jax.tree_util.tree_map(lambda _: repl, self.vae_params)
    targets = var_step.make_targets(self.vae_model, self.from_tokens)
    step = var_step.make_train_step(self.var_model, targets, self.tx,
                                    label_smooth=o.label_smoothing, grad_accum=o.grad_accum,
                                    lr_fn=optim.lr_schedule(self.optim_spec, c.total_steps))
    self._train_step = jax.jit(
        step, in_shardings=(self.state_shardings, vae_sh, self.batch_shardings, repl),
        out_shardings=(self.state_shardings, repl), donate_argnums=(0,))
    eval_sh = dict(self.batch_shardings, mask=parallel.batch_sharding(c.mesh, 1))
    self._eval_step = jax.jit(var_step.make_eval_step(self.var_model, targets),
                              in_shardings=(self.state_shardings.params, vae_sh, eval_sh),
                              out_shardings=repl)
    self.flops_per_image = writer_lib.var_flops_per_image(self.var_cfg, V, Cvae)
    self.tokens_per_image = self.var_cfg.L

  # --- the interface of var_jax.train.loop ----------------------------------------------
  def describe(self) -> str:
    cfg = self.ctx.config
    data = (f'tokens from {cfg.data.path}' if self.from_tokens else
            f'tokenizer {cfg.vae.checkpoint or "random"} in {cfg.vae.dtype} at precision '
            f'{cfg.vae.precision}')
    return (f'VAR d{self.var_cfg.depth}: {self.num_params / 1e6:.2f}M params, attention '
            f'{self.attention} (model.attention={cfg.model.attention}), remat {cfg.model.remat}, '
            f'blocks {"scanned" if self.var_model.scan_blocks else "unrolled"}, '
            f'{cfg.dtype} compute, {data}, grad accum {cfg.optim.grad_accum}, '
            f'peak lr {self.optim_spec.peak_lr:.3g}')

  def init_state(self) -> state_lib.TrainState:
    return self._init(jax.random.PRNGKey(self.ctx.config.seed))

  def loss_weights(self, step: int) -> np.ndarray:
    pg = self.ctx.config.progressive
    si, wp = var_step.progressive_stage(
        step, num_scales=len(self.var_cfg.patch_nums), until=pg.until,
        start_stage=pg.start_stage, warmup_steps=self.optim_spec.warmup_steps,
        total_steps=self.ctx.total_steps, stage_warmup_steps=self.stage_warmup_steps)
    return var_step.loss_weights(self.var_cfg.L, self.var_cfg.begin_ends, si, wp)

  def train_step(self, state, batch, step: int):
    return self._train_step(state, self.vae_params, batch, jnp.asarray(self.loss_weights(step)))

  def host_metrics(self, host: Dict[str, Any]) -> Dict[str, float]:
    """Scalars, with the per-scale vectors as L_<res> and acc_<res> (res in pixels)."""
    out = {k: float(v) for k, v in host.items() if np.ndim(v) == 0}
    res = [p * self.vae_cfg.downsample for p in self.var_cfg.patch_nums]
    for name in ('L', 'acc'):
      out.update({f'{name}_{r}': float(v) for r, v in zip(res, host[f'{name}_per_scale'])})
    return out

  def evaluate(self, state, batches) -> Dict[str, float]:
    total = writer_lib.sum_over_batches(
        batches, lambda b: self._eval_step(state.params, self.vae_params, b))
    n = max(float(total.pop('count')), 1.0)
    return {k: float(v) / n for k, v in total.items() if np.ndim(v) == 0}

  def export(self, state, directory: str) -> None:
    """A native var_jax checkpoint (tokenizer + trained VAR): var_jax.load(directory)."""
    from var_jax import checkpoint
    vae_params, var_params = state_lib.to_host((self._vae_export, state.params))
    if jax.process_index() == 0:   # one writer: the other processes hold the same values
      checkpoint.save(directory, self.model_config, vae_params, var_params, force=True)
      writer_lib.print0(f'[{self.name}] exported {directory} (var_jax.load({directory!r}))')
