"""Sampler against the reference fixtures: greedy tokens/logits/images, KV cache vs
teacher forcing, device-count independence, argument checks, filtering rules, params
made ready once (no weight casts in the program), the editing hook."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import get_fixture, load_benchmark
from var_jax import convert, parallel, sampler
from var_jax.ops.top_k_top_p import top_k_top_p_filter
from var_jax.sampling_args import check_sampling_args
from var_jax.tokenizer.vqvae import VQVAE


@functools.lru_cache(maxsize=None)
def loaded(name):
  fx = get_fixture(name)
  ref = convert.load_reference(fx.dir / 'vae.pth', fx.dir / 'var.pth', fx.raw_config)
  assert ref.config == fx.config
  return fx, ref.params['vae'], ref.params['var']


@functools.lru_cache(maxsize=None)
def greedy(name, scan_blocks=True):
  fx, vae_p, var_p = loaded(name)
  s = fx.raw_config['sampling']
  assert (s['top_k'], s['top_p'], s['more_smooth']) == (1, 0.0, False)
  return sampler.sample(fx.config, vae_p, var_p, fx.io['label'], cfg=s['cfg'], top_k=s['top_k'],
                        top_p=s['top_p'], seed=s['g_seed'], return_logits=True,
                        scan_blocks=scan_blocks)


@pytest.mark.parametrize('name,scan', [
    pytest.param('tiny4', True, id='tiny4-scan'), pytest.param('tiny4', False, id='tiny4-unrolled'),
    pytest.param('tiny10', True, id='tiny10-scan', marks=pytest.mark.slow)])
def test_greedy_sampling_matches_reference(name, scan):
  """Both block loops on tiny4; tiny10 (the 10-scale schedule) through the default scan
  (test_scan_and_unrolled_blocks_sample_alike ties the two loops together)."""
  fx = get_fixture(name)
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
  var, vae = sampler.Sampler(cfg).models()

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


@pytest.mark.slow
def test_ready_params_give_the_same_program_results():
  """Params made ready once (float32: stacked) = params as stored: greedy parity
  holds through the ready path, bit for bit."""
  fx, vae_p, var_p = loaded('tiny4')
  s = sampler.Sampler(fx.config, top_k=1, use_top_p=False, return_logits=True)
  ready = s.prepare(var_p)
  assert isinstance(ready, sampler.ReadyVAR) and ready.stacked is not None
  assert not any(k.startswith('blocks_') and set(v) - set(sampler.ADALN)
                 for k, v in ready.params.items())
  got = s(vae_p, ready, jnp.asarray(fx.io['label']), 2.0, 0.0, jax.random.key(0))
  want = greedy('tiny4')
  for a, b in zip(got[1], want[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
  with pytest.raises(ValueError, match='prepared for float32'):
    sampler.Sampler(fx.config, dtype=jnp.bfloat16)(vae_p, ready, jnp.asarray([1]), 2.0, 0.0,
                                                   jax.random.key(0))


@pytest.mark.slow
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
    (dict(cfg=-1.0), 'cfg'), (dict(cfg=float('nan')), 'cfg'), (dict(top_k=-1), 'top_k'),
    (dict(top_k=1.5), 'top_k'), (dict(top_k=True), 'top_k'), (dict(top_p=1.0), 'top_p'),
    (dict(top_p=-0.1), 'top_p'), (dict(labels=[0, 10]), 'labels'), (dict(labels=[-1]), 'labels'),
    (dict(labels=[]), 'labels'), (dict(labels=[1.5]), 'labels'), (dict(labels=[[1, 2]]), 'labels'),
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
    check_sampling_args(1.0, 0, 0.0, labels=[1, 2, 3], config=get_fixture('tiny4').config,
                        mesh=parallel.make_mesh(data=8))


def test_top_k_beyond_the_vocabulary_means_no_cut(caplog):
  """top_k >= V is accepted: no top-k cut (said once at info level, with the caller's
  name for the argument), i.e. the same program as top_k=0."""
  cfg = get_fixture('tiny4').config
  V = cfg.vae.vocab_size
  with caplog.at_level('INFO', logger='var_jax'):
    args = check_sampling_args(1.0, V + 836, 0.5, config=cfg, names={'top_k': '--top-k'})
    check_sampling_args(1.0, V + 836, 0.5, config=cfg)
  assert args.top_k == 0
  said = [r.getMessage() for r in caplog.records if 'vocabulary' in r.getMessage()]
  assert len(said) == 1 and '--top-k' in said[0]
  assert check_sampling_args(1.0, V - 1, 0.0, config=cfg).top_k == V - 1
  assert check_sampling_args(1.0, V + 836, 0.5).top_k == V + 836   # no model: nothing to clip to
  assert sampler.Sampler(cfg, top_k=V + 836) == sampler.Sampler(cfg, top_k=0)


def test_sampler_is_a_hashable_value():
  cfg = get_fixture('tiny4').config
  a, b = sampler.Sampler(cfg, top_k=5), sampler.Sampler(cfg, top_k=5)
  assert a == b and hash(a) == hash(b)
  assert sampler.Sampler(cfg, top_k=64) == sampler.Sampler(cfg, top_k=0)   # V = 64: no cut
  assert a != sampler.Sampler(cfg, top_k=5, dtype=jnp.bfloat16)
  with pytest.raises(Exception):
    a.top_k = 3


@pytest.mark.slow
def test_keep_hook_replaces_tokens_before_the_next_scale():
  """Keep everything: the program returns the kept tokens and their features (f_hat);
  keep nothing: plain sampling."""
  fx, vae_p, var_p = loaded('tiny4')
  K = len(fx.config.patch_nums)
  s = sampler.Sampler(fx.config, top_k=5, use_top_p=False, decode=False)
  labels, key = jnp.asarray(fx.io['label']), jax.random.key(4)
  kept = tuple(jnp.asarray(fx.io[f'idx_{k}']) for k in range(K))
  every = sampler.Keep(kept, tuple(jnp.ones(t.shape, bool) for t in kept))
  none = sampler.Keep(kept, tuple(jnp.zeros(t.shape, bool) for t in kept))
  f_hat, tokens = s(vae_p, var_p, labels, 1.5, 0.0, key, every)
  for k in range(K):
    np.testing.assert_array_equal(np.asarray(tokens[k]), fx.io[f'idx_{k}'])
  want = np.transpose(fx.io[f'fhat_{K - 1}'], (0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(f_hat), want, atol=1e-5)
  plain = s(vae_p, var_p, labels, 1.5, 0.0, key)
  kept_none = s(vae_p, var_p, labels, 1.5, 0.0, key, none)
  np.testing.assert_array_equal(np.asarray(plain[0]), np.asarray(kept_none[0]))
  for a, b in zip(plain[1], kept_none[1]):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any((np.asarray(a) != np.asarray(b)).any() for a, b in zip(plain[1], tokens))


# --- the bfloat16 program: weights cast once, outside it ---------------------------
def test_weight_cast_counter_sees_a_cast():
  """The HLO check below can fail: a program that casts a weight-shaped f32 operand counts."""
  bench = load_benchmark('sample_bench')
  w = jnp.ones((64, 192), jnp.float32)
  x = jnp.ones((3, 64), jnp.bfloat16)
  text = jax.jit(lambda w, x: x @ w.astype(jnp.bfloat16)).lower(w, x).compile().as_text()
  assert bench.count_converts(text, 'bf16', {(64, 192)}) == 1
  text = jax.jit(lambda w, x: x @ w).lower(w.astype(jnp.bfloat16), x).compile().as_text()
  assert bench.count_converts(text, 'bf16', {(64, 192)}) == 0


@pytest.mark.slow
def test_bfloat16_program_has_no_weight_casts():
  """Ready bf16 params: the optimised program converts no block weight (per block or
  stacked) to bf16 and copies the KV cache at most once; with params as stored it
  converts (once per call), and both give the same bits. Batch 3 keeps the activation shapes (6 l, C) apart from the weight shapes."""
  bench = load_benchmark('sample_bench')
  fx, vae_p, var_p = loaded('tiny4')
  s = sampler.Sampler(fx.config, top_k=5, use_top_p=True, dtype=jnp.bfloat16, decode=False)
  shapes = bench.block_weight_shapes(var_p, fx.config.var.depth)
  args = (jnp.asarray([1, 2, 3]), 1.5, 0.5, jax.random.key(0))
  ready = s.prepare(var_p)
  assert ready.stacked['attn']['mat_qkv']['kernel'].dtype == jnp.bfloat16
  assert ready.stacked['attn']['scale_mul_1H11'].dtype == jnp.float32
  progs = {name: s.lower(vae_p, p, *args).compile() for name, p in (('ready', ready), ('raw', var_p))}
  assert bench.count_converts(progs['ready'].as_text(), 'bf16', shapes) == 0
  assert bench.count_converts(progs['raw'].as_text(), 'bf16', shapes) > 0
  # the KV cache is updated in place: at most the initial zero fill is a full copy
  assert bench.program_checks(progs['ready'].as_text(), fx.config, var_p, 3, jnp.bfloat16)['kv_copies'] <= 1
  run = (jnp.asarray([1, 2, 3]), jnp.float32(1.5), jnp.float32(0.5), jax.random.key(0), None)
  (f_ready, t_ready), (f_raw, t_raw) = progs['ready'](vae_p, ready, *run), progs['raw'](vae_p, var_p, *run)
  np.testing.assert_array_equal(np.asarray(f_ready), np.asarray(f_raw))
  for a, b in zip(t_ready, t_raw):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.slow
def test_bfloat16_sampling_keeps_head_and_draws_in_float32():
  """bf16 trunk: the program computes in bf16, the guided logits and images stay float32
  and close to the float32 run (tiny4, greedy)."""
  fx, vae_p, var_p = loaded('tiny4')
  s = fx.raw_config['sampling']
  kw = dict(cfg=s['cfg'], top_k=1, top_p=0.0, seed=0, return_logits=True)
  images, tokens, logs = sampler.sample(fx.config, vae_p, var_p, fx.io['label'],
                                        dtype=jnp.bfloat16, **kw)
  bf = sampler.Sampler(fx.config, top_k=1, use_top_p=False, dtype=jnp.bfloat16, return_logits=True)
  call = (jnp.asarray(fx.io['label']), 2.0, 0.0, jax.random.key(0))
  assert 'bf16' in bf.lower(vae_p, var_p, *call).as_text()
  assert images.dtype == jnp.float32 and all(l.dtype == jnp.float32 for l in logs['guided'])
  assert all(t.dtype == jnp.int32 for t in tokens)
  # the first scale's logits see only the class embedding: bf16 rounding moves them a little
  np.testing.assert_allclose(np.asarray(logs['guided'][0]), fx.io['sample_logits_0'], atol=0.05)   # measured 0.013
  assert np.isfinite(np.asarray(images)).all() and 0 <= float(images.min()) <= float(images.max()) <= 1


# --- token selection ---------------------------------------------------------------
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
  got = top_k_top_p_filter(jnp.asarray(logits), top_k, jnp.float32(top_p) if top_p else None)
  np.testing.assert_array_equal(np.isinf(np.asarray(got)), np.isinf(reference_filter(logits, top_k, top_p)))


def test_top_k_ties_survive():
  logits = jnp.array([[[1.0, 3.0, 3.0, 2.0]]])
  got = np.asarray(top_k_top_p_filter(logits, 1, None))
  np.testing.assert_array_equal(np.isfinite(got), [[[False, True, True, False]]])


def sorting_filter(logits_BlV, top_k, top_p):
  """The implementation before the no-second-sort version (lax.top_k for the k-th value,
  then a full sort for top-p), kept verbatim as the oracle; top_k in [0, V]."""
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


TOP_P = (0.0, 0.3, 0.9, 0.99)


@functools.partial(jax.jit, static_argnums=(1, 2))
def _filters_and_draws(key, shape, ties):
  """For one batch of logits: (new, old) filtered logits and draws for every top_k in
  {0, 1, 3, V-1, V+5} (the oracle gets min(k, V)) and every top_p in TOP_P."""
  V = shape[-1]
  k_logits, k_draw = jax.random.split(key)
  logits = jax.random.normal(k_logits, shape) * 3
  if ties:   # coarse values: many logits tie, at the k-th value too
    logits = jnp.round(logits * 2) / 2
  new, old = [], []
  for top_k in (0, 1, 3, V - 1, V + 5):
    for top_p in TOP_P:
      p = jnp.float32(top_p) if top_p else None
      new.append(top_k_top_p_filter(logits, top_k, p))
      old.append(sorting_filter(logits, min(top_k, V), p))
  new, old = jnp.stack(new), jnp.stack(old)
  draw = lambda f: jax.random.categorical(k_draw, f, axis=-1)
  return new, old, draw(new), draw(old)


@pytest.mark.parametrize('shape,ties', [((2, 3, 16), True), ((1, 9, 64), True),
                                        ((3, 4, 257), False)], ids=str)
@pytest.mark.slow
def test_filter_draws_equal_the_sorting_implementation(shape, ties):
  """Identical kept sets (bit for bit) and identical categorical draws for the same key,
  over 16 seeds x top_p in {0, 0.3, 0.9, 0.99} x top_k in {0, 1, 3, V-1, V+5}."""
  keys = jax.random.split(jax.random.key(sum(shape) + ties), 16)
  new, old, d_new, d_old = jax.device_get(jax.vmap(lambda k: _filters_and_draws(k, shape, ties))(keys))
  np.testing.assert_array_equal(new, old)
  np.testing.assert_array_equal(d_new, d_old)
  cut = ~np.isfinite(new)
  assert cut.any() and not cut.all(axis=-1).any()        # something cut, never everything

