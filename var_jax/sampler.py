"""Class-conditional sampling with classifier-free guidance (reference
`VAR.autoregressive_infer_cfg`), as ONE jit-compiled program for all scales.

    images, tokens = sample(config, vae_params, var_params, labels, *, cfg=1.5,
                            top_k=900, top_p=0.96, seed=0, more_smooth=False,
                            dtype=jnp.float32, mesh=None, return_logits=False,
                            scan_blocks=True)

  config        ModelConfig (its .var must be set)
  vae_params    VQVAE params (unboxed); var_params: VAR params (unboxed)
  labels        (B,) ints in [0, num_classes)
  cfg           guidance scale >= 0; scale k uses t = cfg * k / (K - 1)
  top_k         keep logits >= the k-th largest (ties survive); 0 disables
  top_p         nucleus in [0, 1); 0 disables (reference sort/cumsum rule)
  seed          int (or a jax.random key); the draws depend only on it, never on
                the device count: scale k uses fold_in(key, k)
  more_smooth   reference visualisation mode: the VQVAE features are a Gumbel-
                softmax mix of the codebook (the returned tokens are still the
                multinomial draws)
  dtype         compute dtype of the transformer trunk and the VQVAE decoder
  mesh          optional jax Mesh (parallel.make_mesh): the batch is split over
                ('data', 'fsdp'); params follow parallel.LOGICAL_RULES
                (replicated on a data-only mesh). B must divide evenly.
  returns       images NHWC float32 in [0, 1], tokens: list of int32 (B, pn_k^2);
                with return_logits=True also {'guided', 'cond', 'uncond'}: per
                scale (B, pn_k^2, V) float32 logits (for tests/inspection).

Design: the loop over the K scales is unrolled at trace time (each scale has its
own static shape); within a scale the blocks run as one lax.scan over the block
parameters, stacked once per program (`VAR.scan_blocks`; scan_blocks=False
unrolls them, same numbers, much slower to compile). The KV cache
(`transformer.model.KVCache`, one (depth, 2B, L, H, c) buffer for k and one for v) is
allocated inside the program and written in place with dynamic_update_slice,
so nothing is reallocated or sent to the host between scales. cfg and top_p are traced scalars (changing them does not recompile);
top_k, whether top_p is used, more_smooth, dtype and the mesh are static. The
compiled program is cached per (config, static options, shapes).

The guidance batch interleaves each sample with its unconditional twin (rows 2b,
2b+1) instead of the reference's [labels, uncond] halves: every row is computed
independently, so the numbers are the same, and a batch shard then holds both
rows the guidance combines (no cross-device traffic).
"""
from __future__ import annotations

import functools
from typing import Any, Dict, List, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax import parallel
from var_jax.config import ModelConfig
from var_jax.transformer.model import VAR, KVCache, dummy_inputs, stack_blocks
from var_jax.tokenizer.vqvae import VQVAE

BATCH_AXES = ('data', 'fsdp')


# --- token selection --------------------------------------------------------------
def top_k_top_p_filter(logits_BlV: jax.Array, top_k: int, top_p: Optional[jax.Array]) -> jax.Array:
  """Logits with the filtered-out entries set to -inf (reference sample_with_top_k_top_p_).

  top_k (static): keep logits >= the k-th largest. top_p (traced, or None to
  skip): in ascending order, drop the prefix whose softmax cumsum is <= 1 - top_p,
  always keeping the largest; the kept set is every logit >= the smallest kept
  one (entries tied with it survive, as with top-k).
  """
  if top_k > 0:
    kth = jax.lax.top_k(logits_BlV, top_k)[0][..., -1:]
    logits_BlV = jnp.where(logits_BlV < kth, -jnp.inf, logits_BlV)
  if top_p is not None:
    sorted_BlV = jnp.sort(logits_BlV, axis=-1)
    cum = jnp.cumsum(jax.nn.softmax(sorted_BlV, axis=-1), axis=-1)
    removed = (cum <= 1 - top_p).at[..., -1].set(False)
    n_Bl1 = removed.sum(-1, keepdims=True)
    thresh = jnp.take_along_axis(sorted_BlV, n_Bl1, axis=-1)
    logits_BlV = jnp.where(logits_BlV < thresh, -jnp.inf, logits_BlV)
  return logits_BlV


def gumbel_soft_codes(key, logits_BlV, ratio: float, codebook_VC: jax.Array) -> jax.Array:
  """more_smooth: softmax((logits * (1 + ratio) + gumbel) / tau) @ codebook, tau
  = max(0.27 * (1 - 0.95 ratio), 0.005) (reference gumbel_softmax_with_rng, soft)."""
  tau = max(0.27 * (1 - ratio * 0.95), 0.005)
  g = jax.random.gumbel(key, logits_BlV.shape, jnp.float32)
  soft = jax.nn.softmax((logits_BlV * (1 + ratio) + g) / tau, axis=-1)
  return jnp.einsum('blv,vc->blc', soft, codebook_VC.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


# --- the program ------------------------------------------------------------------
def _batch_spec(mesh: Optional[Mesh], ndim: int):
  return None if mesh is None else NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _constrain(x, mesh):
  return x if mesh is None else jax.lax.with_sharding_constraint(x, _batch_spec(mesh, x.ndim))


def _constrain_cache(cache: KVCache, mesh):
  """(depth, 2B, L, H, c) buffers: split over the batch (axis 1)."""
  if mesh is None:
    return cache
  spec = NamedSharding(mesh, P(None, BATCH_AXES, None, None, None))
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), cache)


def _models(config: ModelConfig, dtype, scan_blocks: bool = True):
  hi = jax.lax.Precision.HIGHEST if jnp.dtype(dtype) == jnp.float32 else None
  var = VAR(config.var, config.vae.vocab_size, config.vae.Cvae, dtype=dtype, scan_blocks=scan_blocks)
  vae = VQVAE(config.vae, dtype=dtype, precision=hi)
  return var, vae


def _sample_program(config: ModelConfig, top_k: int, use_top_p: bool, more_smooth: bool, dtype,
                    mesh: Optional[Mesh], return_logits: bool, decode: bool, scan_blocks: bool,
                    vae_params, var_params, labels_B, cfg, top_p, key):
  var, vae = _models(config, dtype, scan_blocks)
  vcfg = config.var
  K, V, N = len(vcfg.patch_nums), config.vae.vocab_size, vcfg.num_classes
  B = labels_B.shape[0]
  pv = {'params': var_params}
  qv = {'params': vae_params}
  codebook = vae_params['quantize']['embedding']['embedding']

  labels_2B = jnp.stack([labels_B, jnp.full_like(labels_B, N)], axis=1).reshape(2 * B)
  cond_2BD, ada = var.apply(pv, labels_2B, method=VAR.condition)
  stacked = None
  if scan_blocks:   # once for all scales (not per decode_scale call)
    stacked, ada = stack_blocks(var_params, vcfg.depth), jnp.stack(ada)
  cache = _constrain_cache(KVCache.zeros(vcfg, 2 * B, dtype), mesh)
  x_2BlC = var.apply(pv, cond_2BD, method=VAR.first_token_map)
  hw = vcfg.patch_nums[-1]
  f_hat = _constrain(jnp.zeros((B, hw, hw, config.vae.Cvae), jnp.float32), mesh)
  tokens, logs = [], {'guided': [], 'cond': [], 'uncond': []}
  for si, pn in enumerate(vcfg.patch_nums):
    ratio = si / (K - 1) if K > 1 else 0.0
    logits_2BlV, cache = var.apply(pv, si, x_2BlC, cond_2BD, ada, cache, stacked,
                                   method=VAR.decode_scale)
    pair = logits_2BlV.reshape(B, 2, pn * pn, V)
    t = cfg * ratio
    logits_BlV = (1 + t) * pair[:, 0] - t * pair[:, 1]
    k_draw, k_gumbel = jax.random.split(jax.random.fold_in(key, si))
    filtered = top_k_top_p_filter(logits_BlV, top_k, top_p if use_top_p else None)
    idx_Bl = jax.random.categorical(k_draw, filtered, axis=-1).astype(jnp.int32)
    tokens.append(_constrain(idx_Bl, mesh))
    if return_logits:
      logs['guided'].append(logits_BlV)
      logs['cond'].append(pair[:, 0])
      logs['uncond'].append(pair[:, 1])
    if more_smooth:
      h_BlCv = gumbel_soft_codes(k_gumbel, filtered, ratio, codebook)
    else:
      h_BlCv = vae.apply(qv, idx_Bl, method=VQVAE.embed_tokens)
    f_hat, nxt_BlCv = vae.apply(qv, si, f_hat, h_BlCv, method=VQVAE.next_ar_input)
    if nxt_BlCv is not None:
      x_BlC = var.apply(pv, si + 1, nxt_BlCv, method=VAR.next_token_map)
      x_2BlC = _constrain(jnp.repeat(x_BlC, 2, axis=0), mesh)
  if decode:
    img = vae.apply(qv, f_hat, method=VQVAE.decode_fhat)
    images = _constrain((img + 1) * 0.5, mesh)
  else:
    images = f_hat
  return (images, tokens, logs) if return_logits else (images, tokens)


@functools.lru_cache(maxsize=8)
def param_shardings(config: ModelConfig, mesh: Mesh, dtype=jnp.float32):
  """(vae, var) NamedSharding trees from the logical axis names of every parameter."""
  var, vae = _models(config, dtype)
  img = jnp.zeros((1, config.image_size, config.image_size, config.vae.in_channels))
  vae_abs = jax.eval_shape(lambda: vae.init({'params': jax.random.key(0)}, img)['params'])
  var_abs = jax.eval_shape(lambda: var.init({'params': jax.random.key(0)},
                                            *dummy_inputs(config.var, config.vae.Cvae))['params'])
  return (parallel.logical_shardings(vae_abs, mesh), parallel.logical_shardings(var_abs, mesh))


@functools.lru_cache(maxsize=32)
def make_sample_fn(config: ModelConfig, *, top_k: int, use_top_p: bool, more_smooth: bool = False,
                   dtype: Any = jnp.float32, mesh: Optional[Mesh] = None,
                   return_logits: bool = False, decode: bool = True, scan_blocks: bool = True):
  """The jitted program f(vae_params, var_params, labels_B, cfg, top_p, key).

  Cached per static options; jax caches the compiled executable per shapes.
  Use `.lower(...).compile()` on it to time compilation. decode=False returns
  the final f_hat (B, h, w, Cvae) in place of the images (the VQVAE decoder is
  skipped; benchmarks time the two parts apart this way). scan_blocks=False
  unrolls the transformer blocks (VAR.scan_blocks; same results).
  """
  fn = functools.partial(_sample_program, config, int(top_k), bool(use_top_p), bool(more_smooth),
                         jnp.dtype(dtype), mesh, bool(return_logits), bool(decode),
                         bool(scan_blocks))
  if mesh is None:
    return jax.jit(fn)
  vae_sh, var_sh = param_shardings(config, mesh, dtype)
  rep = NamedSharding(mesh, P())
  return jax.jit(fn, in_shardings=(vae_sh, var_sh, _batch_spec(mesh, 1), rep, rep, rep))


# --- argument checks --------------------------------------------------------------
def check_args(config: ModelConfig, labels, cfg, top_k, top_p, mesh=None) -> np.ndarray:
  """ValueError naming the problem; returns the labels as int32 numpy (B,)."""
  if config.var is None:
    raise ValueError('config has no VAR section: sampling needs a transformer')
  vocab, n_cls = config.vae.vocab_size, config.var.num_classes
  if not np.isfinite(cfg) or cfg < 0:
    raise ValueError(f'cfg (guidance scale) must be a finite number >= 0, got {cfg}')
  if isinstance(top_k, bool) or int(top_k) != top_k or not 0 <= top_k <= vocab:
    raise ValueError(f'top_k must be an integer in [0, {vocab}] (0 disables it), got {top_k}')
  if not np.isfinite(top_p) or not 0 <= top_p < 1:
    raise ValueError(f'top_p must be in [0, 1) (0 disables it), got {top_p}')
  arr = np.asarray(jax.device_get(labels))
  if arr.ndim != 1 or arr.shape[0] == 0:
    raise ValueError(f'labels must be a non-empty 1-D sequence of class ids, got shape {arr.shape}')
  if not np.issubdtype(arr.dtype, np.integer):
    if not np.all(np.equal(np.mod(arr, 1), 0)):
      raise ValueError(f'labels must be integers, got {arr}')
  if arr.min() < 0 or arr.max() >= n_cls:
    raise ValueError(f'labels must be in [0, {n_cls}) (num_classes={n_cls}), got {arr.tolist()}')
  if mesh is not None:
    shards = int(np.prod([mesh.shape[a] for a in BATCH_AXES if a in mesh.shape]))
    if arr.shape[0] % shards:
      raise ValueError(f'batch {arr.shape[0]} is not divisible by the {shards} batch shards of the mesh')
  return arr.astype(np.int32)


def sample(config: ModelConfig, vae_params, var_params, labels: Sequence[int], *, cfg: float = 1.5,
           top_k: int = 900, top_p: float = 0.96, seed: Any = 0, more_smooth: bool = False,
           dtype: Any = jnp.float32, mesh: Optional[Mesh] = None, return_logits: bool = False,
           scan_blocks: bool = True):
  """See the module docstring."""
  labels_np = check_args(config, labels, cfg, top_k, top_p, mesh)
  fn = make_sample_fn(config, top_k=int(top_k), use_top_p=top_p > 0, more_smooth=bool(more_smooth),
                      dtype=jnp.dtype(dtype), mesh=mesh, return_logits=bool(return_logits),
                      scan_blocks=bool(scan_blocks))
  key = seed if isinstance(seed, jax.Array) else jax.random.key(int(seed))
  labels_B = jnp.asarray(labels_np)
  cfg_ = jnp.float32(cfg)
  top_p_ = jnp.float32(top_p)
  if mesh is not None:
    vae_sh, var_sh = param_shardings(config, mesh, dtype)
    vae_params = jax.device_put(vae_params, vae_sh)
    var_params = jax.device_put(var_params, var_sh)
    labels_B = jax.device_put(labels_B, _batch_spec(mesh, 1))
    rep = NamedSharding(mesh, P())
    key, cfg_, top_p_ = jax.device_put((key, cfg_, top_p_), rep)
  return fn(vae_params, var_params, labels_B, cfg_, top_p_, key)
