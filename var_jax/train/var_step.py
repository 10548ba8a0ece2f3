"""The VAR train and eval steps as pure functions (jit them with shardings in the trainer).

One step: uint8 images -> frozen VQVAE tokens (img_to_idx) and teacher-forcing input
(idx_to_var_input) -> VAR logits -> label-smoothed CE weighted per token (reference
loss_weight 1/L, progressive-training weights passed as lw_L) -> grads averaged over
`grad_accum` micro-batches (lax.scan) -> optimizer update. A non-finite loss or grad
norm leaves params and optimizer state unchanged (the host stops or skips, per config).
"""
from __future__ import annotations

from typing import Any, Callable, Dict, Sequence, Tuple

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


def token_stats(logits_BLV, gt_BL, last_l: int, begin_ends, valid_B=None) -> Dict[str, jax.Array]:
  """Unsmoothed CE and accuracy (%): means, last scale, and per scale. valid_B masks examples."""
  logp = jax.nn.log_softmax(logits_BLV.astype(jnp.float32), axis=-1)
  nll_BL = -jnp.take_along_axis(logp, gt_BL[..., None], axis=-1)[..., 0]
  hit_BL = (jnp.argmax(logits_BLV, axis=-1) == gt_BL).astype(jnp.float32) * 100
  w_B = jnp.ones(gt_BL.shape[:1], jnp.float32) if valid_B is None else valid_B.astype(jnp.float32)
  n = jnp.maximum(w_B.sum(), 1.0)

  def mean(x_Bl):
    return (x_Bl.mean(axis=1) * w_B).sum() / n

  out = {'L_mean': mean(nll_BL), 'L_tail': mean(nll_BL[:, -last_l:]),
         'acc_mean': mean(hit_BL), 'acc_tail': mean(hit_BL[:, -last_l:])}
  out['L_per_scale'] = jnp.stack([mean(nll_BL[:, b:e]) for b, e in begin_ends])
  out['acc_per_scale'] = jnp.stack([mean(hit_BL[:, b:e]) for b, e in begin_ends])
  return out


def make_tokenize(vae_model) -> Callable:
  """(vae_params, images uint8 or float) -> (gt_BL int32, x_BLCv float32), no gradient."""
  def tokenize(vae_params, images):
    img = to_pm1(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    variables = {'params': vae_params}
    idx_list = vae_model.apply(variables, img, method='img_to_idx')
    x_BLCv = vae_model.apply(variables, idx_list, method='idx_to_var_input')
    gt_BL = jnp.concatenate([i.astype(jnp.int32) for i in idx_list], axis=1)
    return jax.lax.stop_gradient(gt_BL), jax.lax.stop_gradient(x_BLCv.astype(jnp.float32))
  return tokenize


def make_train_step(var_model, vae_model, tx: optax.GradientTransformation, *,
                    label_smooth: float = 0.0, grad_accum: int = 1,
                    lr_fn: Callable | None = None) -> Callable:
  """train_step(state, vae_params, batch, lw_L) -> (state, metrics). batch: image, label."""
  cfg = var_model.config
  last_l = cfg.patch_nums[-1] ** 2
  tokenize = make_tokenize(vae_model)

  def micro(params, vae_params, images, labels, lw_L, rng):
    gt_BL, x_BLCv = tokenize(vae_params, images)

    def loss_fn(p):
      logits = var_model.apply({'params': p}, labels, x_BLCv, train=True, rngs={'dropout': rng})
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll_BL = -jnp.take_along_axis(logp, gt_BL[..., None], axis=-1)[..., 0]
      if label_smooth > 0:   # torch CrossEntropyLoss(label_smoothing): mix with uniform target
        nll_BL = (1 - label_smooth) * nll_BL - label_smooth * logp.mean(axis=-1)
      loss = (nll_BL * lw_L[None]).sum(axis=-1).mean()
      return loss, logits

    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    stats = token_stats(logits, gt_BL, last_l, cfg.begin_ends)
    stats['loss'] = loss
    return grads, stats

  def train_step(state: TrainState, vae_params, batch, lw_L):
    rng = state.step_rng()
    images, labels = batch['image'], batch['label']
    if grad_accum == 1:
      grads, stats = micro(state.params, vae_params, images, labels, lw_L, rng)
    else:
      B = images.shape[0]
      if B % grad_accum:
        raise ValueError(f'batch {B} not divisible by grad_accum={grad_accum}')

      def split(x):  # (B, ...) -> (ac, B/ac, ...): micro-batch k = examples k::ac (no resharding)
        return jnp.swapaxes(x.reshape((B // grad_accum, grad_accum) + x.shape[1:]), 0, 1)

      def body(acc, xs):
        k, imgs, labs = xs
        g, s = micro(state.params, vae_params, imgs, labs, lw_L, jax.random.fold_in(rng, k))
        return jax.tree_util.tree_map(jnp.add, acc, (g, s)), None

      zeros = jax.tree_util.tree_map(jnp.zeros_like, jax.eval_shape(
          lambda: micro(state.params, vae_params, split(images)[0], split(labels)[0], lw_L, rng)))
      (grads, stats), _ = jax.lax.scan(
          body, zeros, (jnp.arange(grad_accum), split(images), split(labels)))
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


def make_eval_step(var_model, vae_model) -> Callable:
  """eval_step(params, vae_params, batch) -> summed stats (weights = batch['mask'])."""
  cfg = var_model.config
  last_l = cfg.patch_nums[-1] ** 2
  tokenize = make_tokenize(vae_model)

  def eval_step(params, vae_params, batch):
    gt_BL, x_BLCv = tokenize(vae_params, batch['image'])
    logits = var_model.apply({'params': params}, batch['label'], x_BLCv, train=False)
    mask = batch.get('mask', jnp.ones(gt_BL.shape[:1], jnp.int32))
    stats = token_stats(logits, gt_BL, last_l, cfg.begin_ends, valid_B=mask)
    n = mask.astype(jnp.float32).sum()
    return {k: v * n for k, v in stats.items()} | {'count': n}

  return eval_step


def var_flops_per_image(cfg, vocab_size: int, Cvae: int) -> float:
  """Analytic training FLOPs of one image (3x forward; matmuls only; full L x L attention as
  the reference computes it)."""
  C, L, D = cfg.embed_dim, cfg.L, cfg.depth
  hidden = cfg.mlp_hidden
  per_token = D * (2 * (3 * C * C + C * C + 2 * C * hidden) + 4 * L * C) + 2 * C * vocab_size + 2 * Cvae * C
  per_image_cond = (D if not cfg.shared_aln else 1) * 2 * C * 6 * C + 2 * C * 2 * C
  return 3.0 * (L * per_token + per_image_cond)


PEAK_FLOPS = {  # dense bf16 per device
    'tpu v4': 275e12, 'tpu v5 lite': 197e12, 'tpu v5e': 197e12, 'tpu v5p': 459e12, 'tpu v5': 459e12,
    'tpu v6 lite': 918e12, 'tpu v6e': 918e12, 'h100': 989e12, 'h200': 989e12, 'a100': 312e12,
    'l4': 121e12, 'a10g': 70e12,
}


def peak_flops(device=None) -> float:
  """Peak bf16 FLOP/s of a device from its kind (0.0 when unknown, e.g. CPU)."""
  kind = (device or jax.devices()[0]).device_kind.lower()
  for k in sorted(PEAK_FLOPS, key=len, reverse=True):
    if k in kind:
      return PEAK_FLOPS[k]
  return 0.0
