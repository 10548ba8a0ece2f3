"""Loss functions of the VQVAE trainer: reconstruction, hinge GAN, adaptive weight.

- `recon_loss`: l1 * |x - y| + l2 * (x - y)^2, means over everything.
- `hinge_d_loss` / `hinge_g_loss` and `adaptive_weight` (VQGAN's ratio of the gradient
  norms of the reconstruction and GAN losses at the decoder's last layer).
The networks behind the perceptual and GAN terms (LPIPS, the patch discriminator)
are in var_jax.train.loss_networks.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


# --- reconstruction ------------------------------------------------------------------

def recon_loss(x_BHWC: jax.Array, y_BHWC: jax.Array, l1: float = 1.0, l2: float = 0.0) -> jax.Array:
  """l1 * mean|x - y| + l2 * mean (x - y)^2 (float32 scalar)."""
  d = jnp.asarray(x_BHWC, jnp.float32) - jnp.asarray(y_BHWC, jnp.float32)
  out = jnp.zeros([], jnp.float32)
  if l1:
    out = out + l1 * jnp.mean(jnp.abs(d))
  if l2:
    out = out + l2 * jnp.mean(d * d)
  return out


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean relu(1 - D(x)) + mean relu(1 + D(G(z))))."""
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real)) + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def hinge_g_loss(logits_fake: jax.Array) -> jax.Array:
  """The generator's side of the hinge GAN: -mean D(G(z))."""
  return -jnp.mean(logits_fake)


def adaptive_weight(nll_grad: jax.Array, g_grad: jax.Array, max_weight: float = 1e4) -> jax.Array:
  """VQGAN's ||d nll / d last|| / (||d g / d last|| + 1e-4), clipped to [0, max], no gradient."""
  w = jnp.linalg.norm(nll_grad.reshape(-1)) / (jnp.linalg.norm(g_grad.reshape(-1)) + 1e-4)
  return jax.lax.stop_gradient(jnp.clip(w, 0.0, max_weight))
