"""The VAR train and eval steps as pure functions (jitted with shardings by var_task).

One step: the batch's targets -> VAR logits -> label-smoothed CE weighted per token
(reference loss_weight 1/L, progressive-training weights passed as lw_L) -> grads
averaged over `grad_accum` micro-batches (lax.scan) -> optimizer update. The targets
(token ids gt_BL and the teacher-forcing input x_BLCv) come from `make_targets`: from
uint8 images through the frozen VQVAE (img_to_idx + idx_to_var_input), or from
pre-tokenised token ids (idx_to_var_input only: no encoder in the step). A non-finite
loss or grad norm leaves params and optimizer state unchanged (the host stops or
skips, per config).
"""
from __future__ import annotations

from typing import Callable, Dict, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from var_jax.data.augment import to_pm1
from var_jax.train.state import TrainState


def loss_weights(L: int, begin_ends: Sequence[Tuple[int, int]], prog_si: int = -1,
                 prog_wp: float = 1.0) -> np.ndarray:
  """Reference loss_weight: 1/L per token; in progressive stage si only [0, end) counts and
  the newest scale is scaled by prog_wp."""
  lw = np.full((L,), 1.0 / L, np.float32)
  if prog_si >= 0:
    bg, ed = begin_ends[prog_si]
    lw[ed:] = 0
    lw[bg:ed] *= min(max(prog_wp, 0.0), 1.0)
  return lw


def progressive_stage(step: int, *, num_scales: int, until: float, start_stage: int,
                      warmup_steps: float, total_steps: int, stage_warmup_steps: float):
  """(prog_si, prog_wp) of the reference's progressive training at optimizer step `step`:
  after the lr warm-up the trained scales grow from `start_stage` to all of them by
  `until` x total_steps; each new scale's weight ramps up over stage_warmup_steps.
  prog_si = -1 (all scales, full weight) when progressive training is off or done."""
  S = num_scales
  if until <= 0:
    return -1, 1.0

  def stage(g):
    if g <= warmup_steps:
      return start_stage
    if g >= total_steps * until:
      return S - 1
    progress = min(max((g - warmup_steps) / (total_steps * until - warmup_steps), 0), 1)
    return start_stage + round(progress * (S - 1 - start_stage))

  si = stage(step)
  lo, hi = 0, step   # first step of this stage (stage() is non-decreasing)
  while lo < hi:
    mid = (lo + hi) // 2
    lo, hi = (mid + 1, hi) if stage(mid) < si else (lo, mid)
  prog_wp = max(min((step - lo + 1) / max(stage_warmup_steps, 1e-9), 1), 0.01)
  if si == stage(0):
    prog_wp = 1.0
  return (-1 if si == S - 1 else si), prog_wp


def token_stats(logits_BLV, gt_BL, last_l: int, begin_ends, valid_B=None) -> Dict[str, jax.Array]:
  """Unsmoothed CE and accuracy (%): means, last scale, and per scale. valid_B masks examples."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp, gt_BL[..., None], axis=-1)[..., 0]
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == gt_BL).astype(jnp.float32) * 100
  return _stats(nll_BL, hit_BL, last_l, begin_ends, valid_B)


def _stats(nll_BL, hit_BL, last_l: int, begin_ends, valid_B=None) -> Dict[str, jax.Array]:
  w_B = jnp.ones(nll_BL.shape[:1], jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
  n = jnp.maximum(w_B.sum(), 1.0)

  def mean(x_Bl):
    return (x_Bl.mean(axis=1) * w_B).sum() / n

  out = {'L_mean': mean(nll_BL), 'L_tail': mean(nll_BL[:, -last_l:]),
         'acc_mean': mean(hit_BL), 'acc_tail': mean(hit_BL[:, -last_l:])}
  out['L_per_scale'] = jnp.stack([mean(nll_BL[:, b:e]) for b, e in begin_ends])
  out['acc_per_scale'] = jnp.stack([mean(hit_BL[:, b:e]) for b, e in begin_ends])
  return out


def make_targets(vae_model, from_tokens: bool) -> Callable:
  """targets(vae_params, batch) -> (gt_BL int32, x_BLCv float32), no gradient.

  from_tokens=False: batch['image'] (uint8 or float in [-1, 1]) through the frozen
  tokenizer. from_tokens=True: batch['tokens'] (B, L) ids; only the quantizer's
  embedding and phi convs run (vae_params may hold only the 'quantize' subtree)."""

  def targets(vae_params, batch):
    variables = {'params': vae_params}
    if from_tokens:
      gt_BL = batch['tokens'].astype(jnp.int32)
      cur, idx_list = 0, []
      for pn in vae_model.config.v_patch_nums:
        idx_list.append(gt_BL[:, cur:cur + pn * pn])
        cur += pn * pn
    else:
      images = batch['image']
      img = to_pm1(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
      idx_list = vae_model.apply(variables, img, method='img_to_idx')
      gt_BL = jnp.concatenate([i.astype(jnp.int32) for i in idx_list], axis=1)
    x_BLCv = vae_model.apply(variables, idx_list, method='idx_to_var_input')
    return jax.lax.stop_gradient(gt_BL), jax.lax.stop_gradient(x_BLCv.astype(jnp.float32))
  return targets


def make_train_step(var_model, targets: Callable, tx: optax.GradientTransformation, *,
                    label_smooth: float = 0.0, grad_accum: int = 1,
                    lr_fn: Callable | None = None) -> Callable:
  """train_step(state, vae_params, batch, lw_L) -> (state, metrics). batch: label and the
  keys `targets` reads (image or tokens)."""
  cfg = var_model.config
  last_l = cfg.patch_nums[-1] ** 2

  def micro(params, vae_params, batch, lw_L, rng):
    gt_BL, x_BLCv = targets(vae_params, batch)

    def loss_fn(p):
      logits = var_model.apply({'params': p}, batch['label'], x_BLCv, train=True,
                               rngs={'dropout': rng})
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll_BL = -jnp.take_along_axis(logp, gt_BL[..., None], axis=-1)[..., 0]
      loss_BL = nll_BL
      if label_smooth > 0:   # torch CrossEntropyLoss(label_smoothing): mix with uniform target
        loss_BL = (1 - label_smooth) * nll_BL - label_smooth * logp.mean(axis=-1)
      loss = (loss_BL * lw_L[None]).sum(axis=-1).mean()
      # statistics here, from the same log-probabilities: the logits are not kept past the loss
      hit_BL = (jnp.argmax(logits, axis=-1) == gt_BL).astype(jnp.float32) * 100
      return loss, jax.lax.stop_gradient((nll_BL, hit_BL))

    (loss, (nll_BL, hit_BL)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    stats = _stats(nll_BL, hit_BL, last_l, cfg.begin_ends)
    stats['loss'] = loss
    return grads, stats

  def train_step(state: TrainState, vae_params, batch, lw_L):
    rng = state.step_rng()
    if grad_accum == 1:
      grads, stats = micro(state.params, vae_params, batch, lw_L, rng)
    else:
      B = batch['label'].shape[0]
      if B % grad_accum:
        raise ValueError(f'batch {B} not divisible by grad_accum={grad_accum}')

      def split(x):  # (B, ...) -> (ac, B/ac, ...): micro-batch k = examples k::ac (no resharding)
        return jnp.swapaxes(x.reshape((B // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

      micro_batches = jax.tree_util.tree_map(split, batch)

      def body(acc, xs):
        k, mb = xs
        g, s = micro(state.params, vae_params, mb, lw_L, jax.random.fold_in(rng, k))
        return jax.tree_util.tree_map(jnp.add, acc, (g, s)), None

      first = jax.tree_util.tree_map(lambda x: x[0], micro_batches)
      zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
          lambda: micro(state.params, vae_params, first, lw_L, rng)))
      (grads, stats), _ = jax.lax.scan(body, zeros, (jnp.arange(grad_accum), micro_batches))
      grads, stats = jax.tree_util.tree_map(lambda x: x / grad_accum, (grads, stats))

    grad_norm = optax.tree.norm(grads)
    finite = jnp.isfinite(stats['loss']) & jnp.isfinite(grad_norm)
    updates, new_opt = tx.update(grads, state.opt_state, state.params)
    new_params = optax.apply_updates(state.params, updates)
    keep = lambda new, old: jax.tree_util.tree_map(lambda a, b: jnp.where(finite, a, b), new, old)
    new_state = state.replace(
        step=state.step + 1, params=keep(new_params, state.params),
        opt_state=keep(new_opt, state.opt_state),
        skipped=state.skipped + (1 - finite.astype(jnp.int32)))
    metrics = dict(stats, grad_norm=grad_norm, finite=finite)
    if lr_fn is not None:
      metrics['lr'] = lr_fn(state.step - state.skipped)
    return new_state, metrics

  return train_step


def make_eval_step(var_model, targets: Callable) -> Callable:
  """eval_step(params, vae_params, batch) -> summed stats (weights = batch['mask'])."""
  cfg = var_model.config
  last_l = cfg.patch_nums[-1] ** 2

  def eval_step(params, vae_params, batch):
    gt_BL, x_BLCv = targets(vae_params, batch)
    logits = var_model.apply({'params': params}, batch['label'], x_BLCv, train=False)
    mask = batch.get('mask', jnp.ones(gt_BL.shape[:1], jnp.int32))
    stats = token_stats(logits, gt_BL, last_l, cfg.begin_ends, valid_B=mask)
    n = mask.astype(jnp.float32).sum()
    return {k: v * n for k, v in stats.items()} | {'count': n}

  return eval_step
