"""The user-facing bundle of a VQVAE and (optionally) a VAR: encode, decode, score, sample, edit.

    pipe = var_jax.from_torch('vae_ch160v4096z32.pth', 'var_d16.pth')   # config inferred
    pipe = var_jax.load('ckpt/d16', dtype=jnp.bfloat16)                 # or a native checkpoint
    images, tokens = pipe.sample([207, 360], cfg=1.5, seed=0)           # NHWC in [0, 1]
    images, tokens = pipe.edit(photos, keep_mask, 1000)                 # in-paint (zero-shot)
    pipe.save('ckpt/d16'); pipe.to_torch('vae.pth', 'var.pth')

A thin facade: conversion is var_jax.convert (`load_reference`/`save_reference`),
native checkpoints var_jax.checkpoint, sampling var_jax.sampler, editing var_jax.edit. Images are NHWC
float32 in [-1, 1] (sample returns [0, 1] like the reference); tokens are a list
of int32 (B, pn*pn) arrays, one per scale, raster order. Inputs are validated
eagerly (ValueError naming what is wrong); the jitted functions are built once
per Pipeline and reused. The VAR's block weights are made ready for sampling
(cast to `dtype`, stacked) once, when the Pipeline is built; the parameters as
stored stay beside them for `logits`, `save` and `to_torch`.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np

from var_jax import convert
from var_jax.config import ModelConfig
from var_jax.convert import as_config  # noqa: F401  (re-exported: pipeline.as_config)

from var_jax.sampling_args import RANGE_TOL, compute_dtype  # noqa: F401  (RANGE_TOL re-exported)


class Pipeline:
  """A VQVAE (+ VAR) with its config and parameters."""

  def __init__(self, config: ModelConfig, vae_params: Any, var_params: Any = None, *,
               buffers: Optional[Mapping[str, Mapping[str, np.ndarray]]] = None,
               dtype: Any = jnp.float32, scan_blocks: bool = True, attention: str = 'auto'):
    """dtype: compute dtype of the networks (bfloat16 for GPUs/TPUs; the quantizer,
    the head, the logits and the draws stay float32). scan_blocks, attention: see
    var_jax.sampler.Sampler."""
    if not isinstance(config, ModelConfig):
      raise TypeError(f'config must be a ModelConfig, got {type(config).__name__}')
    if var_params is not None and config.var is None:
      raise ValueError('VAR params were given but the config has no VAR section')
    self.config = config
    self.vae_params = jax.device_put(vae_params)
    self.var_params = jax.device_put(var_params) if var_params is not None else None
    if self.var_params is None and config.var is not None:
      self.config = ModelConfig(vae=config.vae, var=None)
    self.buffers = {k: dict(v) for k, v in (buffers or {}).items()}
    self.dtype = jnp.dtype(compute_dtype(dtype))
    self.scan_blocks, self.attention = bool(scan_blocks), attention
    self._fns: Dict[Any, Callable] = {}
    self._ready = None                  # the VAR params ready for sampling in self.dtype
    if self.var_params is not None:
      self._ready = self._sampler(top_k=0, use_top_p=False).prepare(self.var_params)

  def __repr__(self):
    var = self.config.var
    what = f'VAR depth {var.depth}, width {var.embed_dim}' if var else 'no VAR'
    return (f'Pipeline({self.config.image_size}px, vocab {self.config.vae.vocab_size}, '
            f'patch_nums {self.config.patch_nums}, {what})')

  # --- modules and jitted functions ---------------------------------------------
  @property
  def vqvae(self):
    from var_jax.tokenizer.vqvae import VQVAE
    return VQVAE(self.config.vae, dtype=self.dtype)

  @property
  def var(self):
    from var_jax.transformer.model import VAR
    self._require_var()
    return VAR(self.config.var, vocab_size=self.config.vae.vocab_size,
               Cvae=self.config.vae.Cvae, dtype=self.dtype)

  def _require_var(self):
    if self.config.var is None:
      raise ValueError('this pipeline has no VAR transformer (convert with a VAR checkpoint)')

  def _jit(self, name: str) -> Callable:
    if name not in self._fns:
      vqvae = self.vqvae
      if name == 'encode':
        fn = lambda p, img: vqvae.apply({'params': p}, img, method='img_to_idx')
      elif name == 'decode':
        fn = lambda p, idx: vqvae.apply({'params': p}, idx, method='idx_to_img')
      elif name == 'logits':
        var = self.var
        def fn(vae_p, var_p, labels, idx):
          x_BLCv = vqvae.apply({'params': vae_p}, idx, method='idx_to_var_input')
          return var.apply({'params': var_p}, labels, x_BLCv)
      else:
        raise KeyError(name)
      self._fns[name] = jax.jit(fn)
    return self._fns[name]

  # --- validation ------------------------------------------------------------------
  def check_images(self, images: Any) -> jax.Array:
    """NHWC float images of the model's size in [-1, 1] (small tolerance)."""
    from var_jax.sampling_args import check_images
    return jnp.asarray(check_images(images, self.config), jnp.float32)

  def check_tokens(self, tokens: Sequence[Any]) -> List[jax.Array]:
    """One int (B, pn*pn) (or (B, pn, pn)) map per scale, codes in [0, vocab)."""
    pns, vocab = self.config.patch_nums, self.config.vae.vocab_size
    if isinstance(tokens, (np.ndarray, jax.Array)) or not isinstance(tokens, Sequence):
      raise ValueError(f'tokens must be a list of {len(pns)} token maps (one per scale), '
                       f'got {type(tokens).__name__}')
    if len(tokens) != len(pns):
      raise ValueError(f'expected {len(pns)} token maps for patch_nums {pns}, got {len(tokens)}')
    out, batch = [], None
    for si, (t, pn) in enumerate(zip(tokens, pns)):
      t = np.asarray(t)
      if t.ndim == 3 and t.shape[1:] == (pn, pn):
        t = t.reshape(t.shape[0], pn * pn)
      if t.ndim != 2 or t.shape[1] != pn * pn:
        raise ValueError(f'token map {si} (scale {pn}x{pn}) must have shape (B, {pn * pn}), got '
                         f'{tuple(t.shape)}')
      if not np.issubdtype(t.dtype, np.integer):
        raise ValueError(f'token map {si} must hold integers, got dtype {t.dtype}')
      if batch is None:
        batch = t.shape[0]
      elif t.shape[0] != batch:
        raise ValueError(f'token map {si} has batch {t.shape[0]}, token map 0 has {batch}')
      if t.size and (t.min() < 0 or t.max() >= vocab):
        raise ValueError(f'token map {si} has codes in [{t.min()}, {t.max()}], outside [0, {vocab})')
      out.append(jnp.asarray(t, jnp.int32))
    return out

  def check_labels(self, labels: Any, batch: Optional[int] = None) -> jax.Array:
    """Class labels, integers in [0, num_classes) (var_jax.sampler.check_labels)."""
    from var_jax.sampler import check_labels
    self._require_var()
    y = check_labels(labels, self.config.var.num_classes)
    if batch is not None and y.shape[0] != batch:
      raise ValueError(f'{y.shape[0]} labels for a batch of {batch} token maps')
    return jnp.asarray(y)

  # --- model functions ---------------------------------------------------------------
  def encode(self, images: Any) -> List[jax.Array]:
    """Token maps (int32 (B, pn*pn) per scale) of NHWC images in [-1, 1]."""
    return self._jit('encode')(self.vae_params, self.check_images(images))

  def decode(self, tokens: Sequence[Any]) -> jax.Array:
    """Images NHWC in [-1, 1] from token maps."""
    return self._jit('decode')(self.vae_params, self.check_tokens(tokens))

  def reconstruct(self, images: Any) -> jax.Array:
    return self.decode(self.encode(images))

  def logits(self, labels: Any, tokens: Sequence[Any]) -> jax.Array:
    """Teacher-forced VAR logits (B, L, vocab) float32 (eval mode, no class dropout)."""
    self._require_var()
    idx = self.check_tokens(tokens)
    y = self.check_labels(labels, batch=idx[0].shape[0])
    return self._jit('logits')(self.vae_params, self.var_params, y, idx)

  def sample(self, labels: Any, *, cfg: float = 1.5, top_k: int = 900, top_p: float = 0.96,
             seed: Any = 0, more_smooth: bool = False, dtype: Any = None,
             mesh: Any = None) -> Tuple[jax.Array, List[jax.Array]]:
    """Class-conditional samples: (images NHWC in [0, 1], token maps).

    Arguments as var_jax.sampler.sample (checked by check_sampling_args; a top_k
    at or above the vocabulary means no top-k cut). dtype defaults to the
    Pipeline's; another dtype casts the blocks inside the program."""
    from var_jax.sampler import check_sampling_args, seed_key
    self._require_var()
    args = check_sampling_args(cfg, top_k, top_p, labels=labels, config=self.config, mesh=mesh)
    dtype = self.dtype if dtype is None else jnp.dtype(compute_dtype(dtype))
    s = self._sampler(top_k=args.top_k, use_top_p=args.top_p > 0, more_smooth=more_smooth,
                      dtype=dtype, mesh=mesh)
    params = self._ready if dtype == self.dtype else self.var_params
    return s(self.vae_params, params, args.labels, args.cfg, args.top_p, seed_key(seed))

  def edit(self, images: Any, keep_mask: Any, labels: Any, *, cfg: float = 1.5, top_k: int = 900,
           top_p: float = 0.96, seed: Any = 0, more_smooth: bool = False, dtype: Any = None,
           mesh: Any = None) -> Tuple[jax.Array, List[jax.Array]]:
    """Zero-shot in-painting, out-painting or class-conditional editing (var_jax.edit):
    (images NHWC in [0, 1], per scale the token map it contributed).

    images: NHWC float32 in [-1, 1] (as `encode` takes); their token maps are what is
      kept, encoded from the WHOLE unmasked image as the reference does, so kept tokens
      near the mask's edge carry some information about the regenerated region.
    keep_mask: 1 = keep, 0 = generate; (h, w) / (B, h, w) at the last scale's token
      resolution, or (H, W) / (B, H, W) pixels (each token's patch averaged; a token is
      kept at the last scale when more than half its pixels are).
    labels: class ids, or num_classes (the unconditional class) for plain in-/out-painting.
    Scale k keeps where bilinear(keep_mask, pn_k) > 0.5; scales of <= 3 tokens keep all.
    Sampling options as `sample`."""
    from var_jax import edit
    from var_jax.sampler import seed_key
    self._require_var()
    x, mask, y, args = edit.edit_args(self.config, images, keep_mask, labels, cfg, top_k, top_p,
                                      mesh)
    dtype = self.dtype if dtype is None else jnp.dtype(compute_dtype(dtype))
    s = self._sampler(top_k=args.top_k, use_top_p=args.top_p > 0, more_smooth=more_smooth,
                      dtype=dtype, mesh=mesh)
    params = self._ready if dtype == self.dtype else self.var_params
    return s.edit(self.vae_params, params, x, mask, y, args.cfg, args.top_p, seed_key(seed))

  def _sampler(self, **kw):
    from var_jax.sampler import Sampler
    kw.setdefault('dtype', self.dtype)
    return Sampler(self.config, scan_blocks=self.scan_blocks, attention=self.attention, **kw)

  # --- persistence -------------------------------------------------------------------
  def save(self, directory: str | os.PathLike, *, force: bool = False):
    """A native checkpoint (orbax params + config.json); see var_jax.checkpoint."""
    from var_jax import checkpoint
    return checkpoint.save(directory, self.config, self.vae_params, self.var_params,
                           buffers=self.buffers, force=force)

  def state_dicts(self) -> Tuple[Dict[str, np.ndarray], Optional[Dict[str, np.ndarray]]]:
    """The reference state dicts (numpy, torch layout and key order)."""
    return convert.state_dicts(self.config, self._params(), self.buffers)

  def to_torch(self, vae_path: str | os.PathLike, var_path: str | os.PathLike | None = None):
    """Writes reference-format .pth files (torch.load(..., weights_only=True) reads them)."""
    convert.save_reference(vae_path, var_path, self.config, self._params(), self.buffers)

  def _params(self) -> Dict[str, Any]:
    return {'vae': self.vae_params, 'var': self.var_params}


# --- construction -------------------------------------------------------------------
def from_torch(vae_path: str | os.PathLike, var_path: str | os.PathLike | None = None,
               config: Any = None, *, dtype: Any = jnp.float32, **kw) -> Pipeline:
  """A Pipeline from reference .pth files (var_jax.convert.load_reference); the config
  is inferred when not given. kw: Pipeline options (scan_blocks, attention)."""
  config, params, buffers = convert.load_reference(vae_path, var_path, config)
  return Pipeline(config, params['vae'], params['var'], buffers=buffers, dtype=dtype, **kw)


def load(directory: str | os.PathLike, *, dtype: Any = jnp.float32, **kw) -> Pipeline:
  """A Pipeline from a native checkpoint directory (see var_jax.checkpoint); with
  dtype=jnp.bfloat16 the VAR blocks are cast and stacked once, here."""
  from var_jax import checkpoint
  config, vae_params, var_params, buffers = checkpoint.restore(directory)
  return Pipeline(config, vae_params, var_params, buffers=buffers, dtype=dtype, **kw)
