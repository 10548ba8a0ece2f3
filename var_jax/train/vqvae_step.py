"""The VQVAE train, eval and dead-code-restart steps as pure functions (jitted by vqvae_task).

Generator loss = l1 |x - x'| + l2 (x - x')^2 + lpips LPIPS(x, x') + vq * vq_loss
               + [step >= disc_start] disc * w_adapt * hinge_g(D(x'))
with vq_loss the quantizer's multi-scale commitment/codebook loss and straight-through
gradients (VQVAE.forward_train -> quantize_train). w_adapt is VQGAN's ratio of the
gradient norms of the reconstruction and GAN terms at the decoder's last conv: both
gradients come from ONE forward pass (jax.vjp, pulled back with two cotangents). The
discriminator (PatchGAN, hinge loss) updates in the same step. A non-finite loss or
gradient leaves the state unchanged (counted in gen.skipped).
"""
from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax
from flax import traverse_util

from var_jax.data.augment import to_pm1
from var_jax.eval import metrics as eval_lib
from var_jax.train import losses
from var_jax.train.state import TrainState

LAST_LAYER = ('decoder', 'conv_out', 'kernel')
CODEBOOK = ('quantize', 'embedding', 'embedding')


@flax.struct.dataclass
class VQState:
  gen: TrainState            # the VQVAE: params, optimizer, step, rng, skipped
  disc: Any                  # TrainState of the discriminator, or None
  ema: Any                   # EMA of the VQVAE params, or None
  hits_SV: jax.Array         # EMA of code hits per scale (the reference's ema_vocab_hit_SV)

  @property
  def skipped(self) -> jax.Array:
    """Non-finite updates dropped so far (the training loop reports it)."""
    return self.gen.skipped


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def _set(tree, path, value):
  flat = traverse_util.flatten_dict(tree)
  flat[path] = value
  return traverse_util.unflatten_dict(flat)


def init_codebook(params, rng, eini: float, vocab: int):
  """The reference's eini: > 0 truncated normal (std eini), < 0 uniform +-|eini|/V, 0 unchanged."""
  if eini == 0:
    return params
  e = _get(params, CODEBOOK)
  if eini > 0:
    new = eini * jax.random.truncated_normal(rng, -2.0, 2.0, e.shape, e.dtype)
  else:
    new = jax.random.uniform(rng, e.shape, e.dtype, -abs(eini) / vocab, abs(eini) / vocab)
  return _set(params, CODEBOOK, new)


def hit_decay(step):
  """EMA factor of code hits: copy at step 0, 0.9 for 100 steps, then 0.99 (reference)."""
  return jnp.where(step == 0, 0.0, jnp.where(step < 100, 0.9, 0.99))


def make_train_step(vae, disc, lpips, tx, dtx, lc, *, use_disc: bool, use_lpips: bool,
                    ema_decay: float, vocab: int):
  """(VQState, uint8 images, lpips params) -> (VQState, metrics). use_disc/use_lpips are static."""

  def step(state: VQState, images, lpips_params):
    g = state.gen
    img = to_pm1(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    rng = g.step_rng()

    def forward(params):
      rec, vq_loss, idx_list = vae.apply({'params': params}, img, True, method='forward_train',
                                         rngs={'dropout': rng})
      nll = losses.recon_loss(img, rec, lc.l1, lc.l2)
      aux = {'l1': jnp.mean(jnp.abs(rec - img)), 'mse': jnp.mean((rec - img) ** 2), 'vq': vq_loss}
      if use_lpips:
        p = jnp.mean(lpips.apply({'params': lpips_params}, img, rec))
        nll, aux['lpips'] = nll + lc.lpips * p, p
      main = nll + lc.vq * vq_loss
      g_loss = losses.hinge_g_loss(disc.apply({'params': state.disc.params}, rec)) if use_disc else 0.0
      return (main, g_loss), (rec, idx_list, aux)

    (main, g_loss), vjp, (rec, idx_list, aux) = jax.vjp(forward, g.params, has_aux=True)
    grads = vjp((jnp.ones_like(main), jnp.zeros_like(g_loss)))[0]
    loss = main
    if use_disc:
      g_grads = vjp((jnp.zeros_like(main), jnp.ones_like(g_loss)))[0]
      w = (losses.adaptive_weight(_get(grads, LAST_LAYER), _get(g_grads, LAST_LAYER), lc.disc_max_weight)
           if lc.disc_adaptive else jnp.asarray(1.0))
      w = lc.disc * w
      grads = jax.tree_util.tree_map(lambda a, b: a + w * b, grads, g_grads)
      loss = main + w * g_loss
      aux.update(g_loss=g_loss, d_weight=w)
    gnorm = optax.tree.norm(grads)
    finite = jnp.isfinite(loss) & jnp.isfinite(gnorm)
    updates, opt_state = tx.update(grads, g.opt_state, g.params)
    params = jax.tree_util.tree_map(lambda p, u: p + u, g.params, updates)
    gen = g.replace(step=g.step + 1, params=keep_if(finite, params, g.params),
                    opt_state=keep_if(finite, opt_state, g.opt_state),
                    skipped=g.skipped + (1 - finite.astype(jnp.int32)))

    new_disc = state.disc
    if use_disc:
      d = state.disc
      fake = jax.lax.stop_gradient(rec)

      def d_loss_fn(dp):
        lr_, lf_ = disc.apply({'params': dp}, img), disc.apply({'params': dp}, fake)
        return losses.hinge_d_loss(lr_, lf_), (jnp.mean(lr_), jnp.mean(lf_))

      (d_loss, (lr_mean, lf_mean)), d_grads = jax.value_and_grad(d_loss_fn, has_aux=True)(d.params)
      d_upd, d_opt = dtx.update(d_grads, d.opt_state, d.params)
      d_ok = finite & jnp.isfinite(d_loss)
      new_disc = d.replace(step=d.step + 1,
                           params=keep_if(d_ok, jax.tree_util.tree_map(lambda p, u: p + u, d.params, d_upd), d.params),
                           opt_state=keep_if(d_ok, d_opt, d.opt_state))
      aux.update(d_loss=d_loss, logits_real=lr_mean, logits_fake=lf_mean)

    ema = state.ema
    if ema is not None:
      ema = jax.tree_util.tree_map(lambda e, p: jnp.where(finite, ema_decay * e + (1 - ema_decay) * p, e),
                                   ema, gen.params)
    hits = eval_lib.code_hits(idx_list, vocab)
    decay = hit_decay(g.step)
    hits_SV = decay * state.hits_SV + (1 - decay) * hits
    margin = img.shape[0] * vae.config.v_patch_nums[-1] ** 2 / vocab * 0.08
    metrics = {'loss': loss, 'grad_norm': gnorm, 'finite': finite, **aux,
               'usage_per_scale': 100.0 * jnp.mean(hits_SV >= margin, axis=-1)}
    return VQState(gen=gen, disc=new_disc, ema=ema, hits_SV=hits_SV), metrics

  return step


def keep_if(ok, new, old):
  return jax.tree_util.tree_map(lambda a, b: jnp.where(ok, a, b), new, old)


def make_restart_fn(vae, *, threshold: float, noise: float):
  """(VQState, uint8 images, rng) -> (VQState, number restarted): codes whose hit EMA is below
  `threshold` at every scale become random encoder latents of the batch (+ noise); their
  Adam moments are zeroed and their hit EMA set to the threshold."""

  def restart(state: VQState, images, rng):
    img = to_pm1(images) if images.dtype == jnp.uint8 else images.astype(jnp.float32)
    params = state.gen.params
    f = vae.apply({'params': params}, img, method='encode_f')
    f_NC = f.reshape(-1, f.shape[-1])
    cb = _get(params, CODEBOOK)
    dead_V = jnp.max(state.hits_SV, axis=0) < threshold
    k1, k2 = jax.random.split(rng)
    pick = jax.random.randint(k1, (cb.shape[0],), 0, f_NC.shape[0])
    cand = f_NC[pick] + noise * jnp.std(f_NC) * jax.random.normal(k2, cb.shape, cb.dtype)
    new_cb = jnp.where(dead_V[:, None], cand.astype(cb.dtype), cb)
    new_params = _set(params, CODEBOOK, new_cb)

    def zero_rows(path, x):
      names = tuple(str(getattr(k, 'key', getattr(k, 'name', k))) for k in path)
      if names[-3:] == CODEBOOK and getattr(x, 'shape', None) == cb.shape:
        return jnp.where(dead_V[:, None], jnp.zeros_like(x), x)
      return x

    opt_state = jax.tree_util.tree_map_with_path(zero_rows, state.gen.opt_state)
    hits = jnp.where(dead_V[None, :], jnp.maximum(state.hits_SV, threshold), state.hits_SV)
    ema = state.ema
    if ema is not None:
      ema = _set(ema, CODEBOOK, jnp.where(dead_V[:, None], new_cb, _get(ema, CODEBOOK)))
    gen = state.gen.replace(params=new_params, opt_state=opt_state)
    return state.replace(gen=gen, ema=ema, hits_SV=hits), jnp.sum(dead_V.astype(jnp.int32))

  return restart


def make_eval_step(vae, lpips, *, use_lpips: bool, vocab: int):
  """(params, batch {'image','mask'}, lpips params) -> sums of PSNR, SSIM, l1, LPIPS, count, hits."""

  def step(params, batch, lpips_params):
    img = to_pm1(batch['image']) if batch['image'].dtype == jnp.uint8 else batch['image']
    mask = batch['mask'].astype(jnp.float32)
    variables = {'params': params}
    f = vae.apply(variables, img, method='encode_f')
    idx_list, fhats = vae.apply(variables, f, method='f_to_idx_and_fhats')
    rec = vae.apply(variables, fhats[-1], method='decode_fhat')
    out = {'psnr': jnp.sum(eval_lib.psnr(rec, img) * mask),
           'l1': jnp.sum(jnp.mean(jnp.abs(rec - img), axis=(1, 2, 3)) * mask),
           'count': jnp.sum(mask), 'hits': eval_lib.code_hits(idx_list, vocab, mask)}
    if min(img.shape[1:3]) >= 11:
      out['ssim'] = jnp.sum(eval_lib.ssim(rec, img) * mask)
    if use_lpips:
      out['lpips'] = jnp.sum(lpips.apply({'params': lpips_params}, img, rec) * mask)
    return out

  return step
