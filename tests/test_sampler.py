"""Sampler against the reference fixtures: greedy tokens/logits/images, KV cache vs
teacher forcing, device-count independence, argument checks, filtering rules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import get_fixture
from test_var import params_from_state_dict
from var_jax import parallel, sampler
from var_jax.transformer.model import VAR
from var_jax.tokenizer.vqvae import VQVAE


@functools.lru_cache(maxsize=None)
def loaded(name):
  fx = get_fixture(name)
  cfg = fx.config
  var, vae = sampler._models(cfg, jnp.float32)
  img = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.vae.in_channels))
  vae_abs = jax.eval_shape(lambda: nn.meta.unbox(vae.init({'params': jax.random.key(0)}, img)['params']))
  var_abs = jax.eval_shape(lambda: nn.meta.unbox(var.init(
      {'params': jax.random.key(0)}, jnp.zeros((1,), jnp.int32),
      jnp.zeros((1, cfg.var.L - cfg.var.first_l, cfg.vae.Cvae)))['params']))
  return (fx, params_from_state_dict(fx.vae_sd, vae_abs), params_from_state_dict(fx.var_sd, var_abs))


@functools.lru_cache(maxsize=None)
def greedy(name, scan_blocks=True):
  fx, vae_p, var_p = loaded(name)
  s = fx.raw_config['sampling']
  assert (s['top_k'], s['top_p'], s['more_smooth']) == (1, 0.0, False)
  return sampler.sample(fx.config, vae_p, var_p, fx.io['label'], cfg=s['cfg'], top_k=s['top_k'],
                        top_p=s['top_p'], seed=s['g_seed'], return_logits=True,
                        scan_blocks=scan_blocks)


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
def test_greedy_sampling_matches_reference(fx, scan):
  images, tokens, logs = greedy(fx.name, scan)
  K = len(fx.config.patch_nums)
  assert len(tokens) == K
  for k in range(K):
    assert tokens[k].dtype == jnp.int32
    np.testing.assert_array_equal(np.asarray(tokens[k]), fx.io[f'sample_idx_{k}'], err_msg=f'scale {k}')
    np.testing.assert_allclose(np.asarray(logs['guided'][k]), fx.io[f'sample_logits_{k}'], atol=1e-4,
                               rtol=0, err_msg=f'scale {k}')
  assert images.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(images), fx.nhwc('sample_img'), atol=1e-4, rtol=0)


def test_kv_cached_logits_equal_teacher_forcing(fx):
  """Cond and uncond logits of every scale = VAR.__call__ on the sampled tokens."""
  _, tokens, logs = greedy(fx.name)
  _, vae_p, var_p = loaded(fx.name)
  cfg = fx.config
  var, vae = sampler._models(cfg, jnp.float32)

  @jax.jit
  def teacher(tokens, labels):
    x = vae.apply({'params': vae_p}, tokens, method=VQVAE.idx_to_var_input)
    return var.apply({'params': var_p}, labels, x)

  labels = jnp.asarray(fx.io['label'])
  cond = np.asarray(teacher(tokens, labels))
  uncond = np.asarray(teacher(tokens, jnp.full_like(labels, cfg.var.num_classes)))
  for k, (b, e) in enumerate(cfg.var.begin_ends):
    np.testing.assert_allclose(np.asarray(logs['cond'][k]), cond[:, b:e], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np.asarray(logs['uncond'][k]), uncond[:, b:e], atol=1e-4, rtol=0)


def test_scan_and_unrolled_blocks_sample_alike():
  """Scanned and unrolled blocks: same greedy tokens, same logits of every scale,
  same images (tiny4; stochastic sampling is covered through the same logits)."""
  a, b = greedy('tiny4', True), greedy('tiny4', False)
  for x, y in zip(a[1], b[1]):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for key in ('guided', 'cond', 'uncond'):
    for x, y in zip(a[2][key], b[2][key]):
      np.testing.assert_allclose(np.asarray(x), np.asarray(y), atol=1e-5, rtol=0)
  np.testing.assert_allclose(np.asarray(a[0]), np.asarray(b[0]), atol=1e-5, rtol=0)


def test_one_device_and_eight_devices_agree():
  """Stochastic top-k/top-p (+ more_smooth): same seed, same tokens and images."""
  fx, vae_p, var_p = loaded('tiny4')
  labels = np.arange(8) % fx.config.var.num_classes
  kw = dict(cfg=1.5, top_k=20, top_p=0.8, seed=7, more_smooth=True)
  one = sampler.sample(fx.config, vae_p, var_p, labels, **kw)
  mesh = parallel.make_mesh(data=8, devices=jax.devices()[:8])
  eight = sampler.sample(fx.config, vae_p, var_p, labels, mesh=mesh, **kw)
  assert eight[0].sharding.shard_shape(eight[0].shape)[0] == 1   # split over 8 devices
  for a, b in zip(one[1], eight[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_allclose(np.asarray(one[0]), np.asarray(eight[0]), atol=1e-4, rtol=0)
  img = np.asarray(one[0])
  assert img.shape == (8, 64, 64, 3) and np.isfinite(img).all() and 0 <= img.min() and img.max() <= 1
  # genuinely stochastic: not the greedy choice everywhere, and different across samples
  last = np.asarray(one[1][-1])
  assert len({tuple(r) for r in last}) == 8


@pytest.mark.parametrize('kw,msg', [
    (dict(cfg=-1.0), 'cfg'), (dict(top_k=-1), 'top_k'), (dict(top_k=65), 'top_k'),
    (dict(top_k=1.5), 'top_k'), (dict(top_p=1.0), 'top_p'), (dict(top_p=-0.1), 'top_p'),
    (dict(labels=[0, 10]), 'labels'), (dict(labels=[-1]), 'labels'), (dict(labels=[]), 'labels'),
])
def test_bad_arguments_raise(kw, msg):
  fx = get_fixture('tiny4')
  args = dict(labels=[1, 2], cfg=1.0, top_k=5, top_p=0.5)
  args.update(kw)
  labels = args.pop('labels')
  with pytest.raises(ValueError, match=msg):
    sampler.sample(fx.config, {}, {}, labels, **args)


def test_batch_must_split_over_mesh():
  with pytest.raises(ValueError, match='divisible'):
    sampler.check_args(get_fixture('tiny4').config, [1, 2, 3], 1.0, 0, 0.0, parallel.make_mesh(data=8))


def reference_filter(logits, top_k, top_p):
  """numpy transcription of the reference's sample_with_top_k_top_p_ masking."""
  out = logits.copy()
  if top_k > 0:
    kth = np.sort(out, -1)[..., -top_k][..., None]
    out[out < kth] = -np.inf
  if top_p > 0:
    order = np.argsort(out, -1, kind='stable')
    srt = np.take_along_axis(out, order, -1)
    e = np.exp(srt - srt.max(-1, keepdims=True))
    rm = np.cumsum(e / e.sum(-1, keepdims=True), -1) <= 1 - top_p
    rm[..., -1] = False
    mask = np.zeros_like(rm)
    np.put_along_axis(mask, order, rm, -1)
    out[mask] = -np.inf
  return out


@pytest.mark.parametrize('top_k,top_p', [(0, 0.0), (5, 0.0), (0, 0.7), (7, 0.5), (1, 0.3)])
def test_filter_matches_reference_rule(top_k, top_p):
  logits = np.asarray(jax.random.normal(jax.random.key(0), (3, 4, 32)) * 2)
  got = sampler.top_k_top_p_filter(jnp.asarray(logits), top_k, jnp.float32(top_p) if top_p else None)
  np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(reference_filter(logits, top_k, top_p)))


def test_top_k_ties_survive():
  logits = jnp.array([[[1.0, 3.0, 3.0, 2.0]]])
  got = np.asarray(sampler.top_k_top_p_filter(logits, 1, None))
  np.testing.assert_array_equal(np.isfinite(got), [[[False, True, True, False]]])


def test_bfloat16_sampling_keeps_head_and_draws_in_float32():
  """bf16 trunk: the program computes in bf16, the guided logits and images stay float32
  and close to the float32 run (tiny4, greedy)."""
  fx, vae_p, var_p = loaded('tiny4')
  s = fx.raw_config['sampling']
  kw = dict(cfg=s['cfg'], top_k=1, top_p=0.0, seed=0, return_logits=True)
  images, tokens, logs = sampler.sample(fx.config, vae_p, var_p, fx.io['label'],
                                        dtype=jnp.bfloat16, **kw)
  hlo = sampler.make_sample_fn(fx.config, top_k=1, use_top_p=False, dtype=jnp.bfloat16,
                               return_logits=True).lower(
      vae_p, var_p, jnp.asarray(fx.io['label']), 2.0, 0.0, jax.random.key(0)).as_text()
  assert 'bf16' in hlo
  assert images.dtype == jnp.float32 and all(l.dtype == jnp.float32 for l in logs['guided'])
  assert all(t.dtype == jnp.int32 for t in tokens)
  # the first scale's logits see only the class embedding: bf16 rounding moves them a little
  np.testing.assert_allclose(np.asarray(logs['guided'][0]), fx.io['sample_logits_0'], atol=0.05)   # measured 0.013
  assert np.isfinite(np.asarray(images)).all() and 0 <= float(images.min()) <= float(images.max()) <= 1
