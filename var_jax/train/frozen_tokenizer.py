"""The VAR trainer's frozen tokenizer: load it, build it, fingerprint it.

    vae_cfg, params = load(config.vae)        # a reference .pth, a native dir, or '' (random)
    model = make_model(vae_cfg, config.vae)    # compute dtype and conv precision of the section
    fp = fingerprint(vae_cfg, params)          # names tokens made with it (var-jax tokenize)

The tokenizer is read with the conversion functions (var_jax.convert) or the native
checkpoint reader (var_jax.checkpoint), not through the user-facing Pipeline.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
from typing import Any, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from flax import traverse_util

from var_jax.config import ModelConfig, VQVAEConfig

# Keys of the vae section that configure the run, not the network.
RUN_KEYS = ('checkpoint', 'dtype', 'precision')
PRECISIONS = {'highest': jax.lax.Precision.HIGHEST, 'default': jax.lax.Precision.DEFAULT}


def section_config(vae_section) -> VQVAEConfig:
  """The VQVAEConfig that config.vae describes."""
  return VQVAEConfig.from_section(vae_section, ignore=RUN_KEYS)


def load(vae_section) -> Tuple[VQVAEConfig, Any]:
  """(VQVAEConfig, params) of config.vae.checkpoint: a reference .pth, a native checkpoint
  directory (its structure must match the section), or '' for a random tokenizer."""
  want = section_config(vae_section)
  path = vae_section.checkpoint
  if not path:
    return want, random_params(want)
  if os.path.isdir(path):
    from var_jax import checkpoint
    config, vae_params, _, _ = checkpoint.restore(path)
    got = dataclasses.replace(config.vae, v_patch_nums=want.v_patch_nums)
    diff = [k for k in vae_section.keys()
            if k not in RUN_KEYS + ('patch_nums',) and getattr(got, k) != getattr(want, k)]
    if diff:
      raise ValueError(f'config.vae does not match the tokenizer in {path}: '
                       + ', '.join(f'{k}={getattr(want, k)} (checkpoint: {getattr(got, k)})'
                                   for k in diff))
    return got, vae_params
  if os.path.isfile(path):
    from var_jax.convert import load_reference
    config, params, _ = load_reference(path, config=ModelConfig(vae=want, var=None))
    return config.vae, params['vae']
  raise FileNotFoundError(f"config.vae.checkpoint {path!r} not found (a reference .pth file or a "
                          "native checkpoint directory; '' for a random tokenizer)")


def make_model(cfg: VQVAEConfig, vae_section):
  """The VQVAE module with the section's compute dtype and encoder/decoder precision."""
  from var_jax.tokenizer.vqvae import VQVAE
  precision = vae_section.get('precision', 'highest')
  if precision not in PRECISIONS:
    raise ValueError(f"config.vae.precision must be one of {sorted(PRECISIONS)}, got {precision!r}")
  return VQVAE(cfg, dtype=jnp.dtype(vae_section.dtype), precision=PRECISIONS[precision])


def random_params(cfg: VQVAEConfig, seed: int = 1234):
  """A random tokenizer without compiling its forward (eval_shape + numpy): conv/dense
  kernels ~ N(0, 1/fan_in), norms 1, biases 0, codebook ~ N(0, 1). Deterministic in seed."""
  from var_jax.tokenizer.vqvae import VQVAE
  size = cfg.image_size
  shapes = nn.meta.unbox(jax.eval_shape(
      VQVAE(cfg).init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3)))['params'])
  rng = np.random.default_rng(seed)
  out = {}
  for path, a in sorted(traverse_util.flatten_dict(shapes, sep='/').items()):
    leaf = path.rsplit('/', 1)[-1]
    if leaf == 'kernel':
      fan_in = int(np.prod(a.shape[:-1]))
      v = rng.standard_normal(a.shape) / np.sqrt(fan_in)
    elif leaf == 'scale':
      v = np.ones(a.shape)
    elif leaf == 'embedding':
      v = rng.standard_normal(a.shape)
    else:
      v = np.zeros(a.shape)
    out[path] = jnp.asarray(v, a.dtype)
  return traverse_util.unflatten_dict(out, sep='/')


def fingerprint(cfg: VQVAEConfig, params: Any) -> str:
  """sha256 over the tokenizer's structure, patch_nums and every parameter's bytes."""
  h = hashlib.sha256(ModelConfig(vae=cfg, var=None).to_json().encode())
  flat = traverse_util.flatten_dict(jax.device_get(params), sep='/')
  for path in sorted(flat):
    a = np.ascontiguousarray(np.asarray(flat[path]))
    h.update(f'{path}:{a.dtype.str}:{a.shape}'.encode())
    h.update(a.tobytes())
  return h.hexdigest()
