"""Optimiser and schedules with the reference's recipe (AdamW, lr warm-up + 'lin0' decay, cosine wd).

Reuse: `tx = make_optimizer(params, OptimSpec(...), total_steps)` gives an optax
GradientTransformation for any param tree (`spec_from_section(config.optim, ...)` reads
the spec from a training config); `lr_schedule(...)` / `wd_schedule(...)`
are jit-friendly functions of the optimizer step, equal to the reference's
`lr_wd_annealing` at every step; `no_decay_mask(params)` picks the params without
weight decay (1-D params, biases, and the reference's `nowd_keys`).

The chain is clip_by_global_norm -> Adam moments -> + wd(t) * p -> * -lr(t), which is
torch AdamW: p <- p - lr * (adam_update + wd * p).
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

# Names the reference keeps out of weight decay (train.py: filter_params nowd_keys),
# matched as substrings of the '/'-joined flax path, plus every 1-D param and bias.
NOWD_KEYS = ('cls_token', 'start_token', 'task_token', 'cfg_uncond', 'pos_embed', 'pos_1LC',
             'pos_start', 'start_pos', 'lvl_embed', 'gamma', 'beta', 'ada_gss', 'moe_bias',
             'scale_mul')


@dataclasses.dataclass(frozen=True)
class OptimSpec:
  peak_lr: float = 1e-4
  b1: float = 0.9
  b2: float = 0.95
  eps: float = 1e-8
  weight_decay: float = 0.05
  weight_decay_end: float = 0.05
  grad_clip: float = 2.0     # <= 0: no clipping
  schedule: str = 'lin0'     # the reference's sche
  warmup_steps: float = 0.0
  warmup_start: float = 0.005   # wp0: lr factor at step 0
  final_lr: float = 0.01        # wpe: lr factor at the end


def spec_from_section(o, *, global_batch: int, steps_per_epoch: int, total_steps: int,
                      schedule: str | None = None) -> OptimSpec:
  """The OptimSpec of a config's optim section (names in configs/common.py).

  peak lr: `lr` if > 0, else base_lr * global_batch / 256; warm-up: `warmup_steps` if the
  section has it, else warmup_epochs (0: total/50, the reference); weight_decay_end < 0:
  constant weight decay. `schedule` replaces the section's (progressive training)."""
  peak = o.lr if o.lr > 0 else o.get('base_lr', 0.0) * global_batch / 256
  if peak <= 0:
    raise ValueError('set config.optim.lr or config.optim.base_lr (> 0)')
  if 'warmup_steps' in o:
    warmup = float(o.warmup_steps)
  else:
    warmup = o.warmup_epochs * steps_per_epoch if o.warmup_epochs > 0 else total_steps / 50
  wd_end = o.weight_decay if o.weight_decay_end < 0 else o.weight_decay_end
  return OptimSpec(peak_lr=peak, b1=o.b1, b2=o.b2, eps=o.eps, weight_decay=o.weight_decay,
                   weight_decay_end=wd_end, grad_clip=o.grad_clip,
                   schedule=schedule or o.schedule, warmup_steps=warmup,
                   warmup_start=o.warmup_start, final_lr=o.final_lr)


def lr_multiplier(step, sche: str, warmup_steps: float, total_steps: int, wp0: float, wpe: float):
  """Reference lr_wd_annealing's lr factor (before * peak_lr) at `step` (traceable):
  linear warm-up from wp0 (warmup_start), then schedule `sche` down to wpe (final_lr)."""
  wp = float(round(warmup_steps))
  it = jnp.asarray(step, jnp.float32)
  warm = wp0 + (1 - wp0) * it / max(wp, 1.0)
  pasd = (it - wp) / max(total_steps - 1 - wp, 1.0)
  rest = 1 - pasd
  if sche == 'cos':
    after = wpe + (1 - wpe) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))
  elif sche in ('lin', 'lin0'):
    t = 0.15 if sche == 'lin' else 0.05
    after = jnp.where(pasd < t, 1.0, wpe + (1 - wpe) * rest / (1 - t))
  elif sche == 'lin00':
    after = wpe + (1 - wpe) * rest
  elif sche.startswith('lin'):
    t = float(sche[3:])
    max_rest = 1 - t
    mid = (1 + wpe + (1 - wpe) * max_rest) / 2
    after = jnp.where(pasd < t, 1 + (mid - 1) * pasd / t, wpe + (mid - wpe) * rest / max_rest)
  elif sche == 'exp':
    t = 0.15
    after = jnp.where(pasd < t, 1.0, jnp.exp((pasd - t) / (1 - t) * math.log(wpe)))
  else:
    raise ValueError(f'unknown lr schedule {sche!r} (cos, lin, lin0, lin00, lin<T>, exp)')
  return jnp.where(it < wp, warm, after)


def lr_schedule(spec: OptimSpec, total_steps: int) -> Callable:
  return lambda step: spec.peak_lr * lr_multiplier(
      step, spec.schedule, spec.warmup_steps, total_steps, spec.warmup_start, spec.final_lr)


def wd_schedule(spec: OptimSpec, total_steps: int) -> Callable:
  """Cosine from weight_decay to weight_decay_end over the whole run (reference)."""
  wd, wd_end = spec.weight_decay, spec.weight_decay_end

  def fn(step):
    pasd = jnp.asarray(step, jnp.float32) / max(total_steps - 1, 1)
    return wd_end + (wd - wd_end) * (0.5 + 0.5 * jnp.cos(math.pi * pasd))
  return fn


def _path_str(path) -> str:
  return '/'.join(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)


def no_decay_mask(params: Any, nowd_keys=NOWD_KEYS) -> Any:
  """True where weight decay applies (ndim > 1, not a bias, no nowd key in the path)."""
  def decays(path, p):
    name = _path_str(path)
    leaf = name.rsplit('/', 1)[-1]
    if jnp.ndim(p) <= 1 or leaf == 'bias' or leaf.endswith('_bias'):
      return False
    return not any(k in name for k in nowd_keys)
  return jax.tree_util.tree_map_with_path(decays, params)


class ScheduleCount(NamedTuple):
  count: jax.Array


def add_decayed_weights_scheduled(schedule: Callable, mask: Any) -> optax.GradientTransformation:
  """updates + wd(step) * params on the masked leaves."""
  def init(params):
    del params
    return ScheduleCount(jnp.zeros([], jnp.int32))

  def update(updates, state, params):
    wd = schedule(state.count)
    updates = jax.tree_util.tree_map(
        lambda u, p, m: u + wd * p.astype(u.dtype) if m else u, updates, params, mask)
    return updates, ScheduleCount(state.count + 1)

  return optax.GradientTransformation(init, update)


def make_optimizer(params: Any, spec: OptimSpec, total_steps: int,
                   nowd_keys=NOWD_KEYS) -> optax.GradientTransformation:
  """The reference AdamW recipe for `params` (unboxed or boxed abstract tree)."""
  mask = no_decay_mask(_unbox(params), nowd_keys)
  parts = []
  if spec.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(spec.grad_clip))
  parts += [
      optax.scale_by_adam(b1=spec.b1, b2=spec.b2, eps=spec.eps),
      add_decayed_weights_scheduled(wd_schedule(spec, total_steps), mask),
      optax.scale_by_learning_rate(lr_schedule(spec, total_steps)),
  ]
  return optax.chain(*parts)


def _unbox(tree):
  from flax.linen import meta
  return meta.unbox(tree)
