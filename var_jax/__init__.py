"""var_jax: VAR (next-scale prediction) in JAX/Flax.

    import var_jax
    pipe = var_jax.from_torch('vae_ch160v4096z32.pth', 'var_d16.pth')
    images, tokens = pipe.sample([207, 360])
    edited, tokens = pipe.edit(photos, var_jax.box_mask(16, .1, .1, .8, .8), 1000)   # in-paint
    config, params, buffers = var_jax.load_reference('vae_ch160v4096z32.pth', 'var_d16.pth')

The names below are imported lazily, so `import var_jax` does not import jax.
"""
import importlib

_EXPORTS = {
    'from_torch': 'var_jax.pipeline',
    'load': 'var_jax.pipeline',
    'Pipeline': 'var_jax.pipeline',
    'Sampler': 'var_jax.sampler',
    'box_mask': 'var_jax.edit',
    'load_reference': 'var_jax.convert',
    'save_reference': 'var_jax.convert',
    'ModelConfig': 'var_jax.config',
    'VQVAEConfig': 'var_jax.config',
    'VARConfig': 'var_jax.config',
}
__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
  raise AttributeError(f'module {__name__!r} has no attribute {name!r}')


def __dir__():
  return sorted(list(globals()) + __all__)
