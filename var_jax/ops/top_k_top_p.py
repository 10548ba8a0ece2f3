"""Top-k / top-p (nucleus) filtering of logits without sorting the vocabulary twice.

    filtered_BlV = top_k_top_p_filter(logits_BlV, top_k=900, top_p=jnp.float32(0.96))
    idx_Bl = jax.random.categorical(key, filtered_BlV)

The rule is the reference's `sample_with_top_k_top_p_`:
  top-k  keep every logit >= the k-th largest (entries tied with it survive);
         k = 0 or k >= V: no cut.
  top-p  on what top-k kept, in ascending order: drop the prefix whose softmax
         cumsum is <= 1 - top_p, never the largest; then keep every logit >= the
         smallest kept one (ties survive, as with top-k). With k = 0 the cut is
         over the full vocabulary.

How: one `lax.top_k` gives the n = k (or V) largest values, sorted. The
ascending sort of the top-k-filtered logits is then known without sorting
again: V - n - t entries of -inf, t copies of the k-th value (the ties that
`lax.top_k` left out; t is counted, not sorted), then the n values reversed.
The top-p threshold is computed on that rebuilt array with the same float32
operations as a sort-based implementation, so the kept set, and hence every draw
of `jax.random.categorical` for a given key, is bit-identical to it
(tests/test_sampler.py keeps the sort-based version as the oracle). Cost: one
`lax.top_k` instead of `lax.top_k` + a full sort; the softmax/cumsum over V
that remain are memory-bound elementwise passes.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp


def effective_top_k(top_k: int, vocab: int) -> int:
  """0 (no cut) when top_k is 0 or reaches the vocabulary, else top_k."""
  return int(top_k) if 0 < int(top_k) < vocab else 0


def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int, top_p: Optional[jax.Array]) -> jax.Array:
  """Logits with the filtered-out entries set to -inf (see the module docstring).

  top_k: static int (0 disables; >= V means no cut). top_p: traced float32 scalar
  in [0, 1), or None to skip the nucleus cut (top_p = 0 must be passed as None:
  the caller decides statically, as the sampler does).
  """
  V = logits_BlV.shape[-1]
  k = effective_top_k(top_k, V)
  if top_p is None:
    if not k:
      return logits_BlV
    kth_Bl1 = jax.lax.top_k(logits_BlV, k)[0][..., -1:]
    return jnp.where(logits_BlV < kth_Bl1, -jnp.inf, logits_BlV)

  n = k or V
  top_Bln = jax.lax.top_k(logits_BlV, n)[0]                  # descending
  lead_BlX = jnp.full(logits_BlV.shape[:-1] + (V - n,), -jnp.inf, logits_BlV.dtype)
  if k:
    kth_Bl1 = top_Bln[..., -1:]
    logits_BlV = jnp.where(logits_BlV < kth_Bl1, -jnp.inf, logits_BlV)
    # ties of the k-th value that lax.top_k did not list: they sort just below the n listed
    ties_Bl1 = (jnp.sum(logits_BlV == kth_Bl1, -1, keepdims=True)
                - jnp.sum(top_Bln == kth_Bl1, -1, keepdims=True))
    pos_X = jnp.arange(V - n)
    lead_BlX = jnp.where(pos_X >= (V - n) - ties_Bl1, kth_Bl1, lead_BlX)
  sorted_BlV = jnp.concatenate([lead_BlX, top_Bln[..., ::-1]], axis=-1)   # ascending
  cum_BlV = jnp.cumsum(jax.nn.softmax(sorted_BlV, axis=-1), axis=-1)
  removed_BlV = (cum_BlV <= 1 - top_p).at[..., -1].set(False)
  n_removed_Bl1 = removed_BlV.sum(-1, keepdims=True)
  thresh_Bl1 = jnp.take_along_axis(sorted_BlV, n_removed_Bl1, axis=-1)
  return jnp.where(logits_BlV < thresh_Bl1, -jnp.inf, logits_BlV)
