"""VAR transformer against the reference fixtures: logits, loss, gradients, shapes."""
import functools
import json

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from conftest import FIXTURES, get_fixture
from var_jax.config import VARConfig
from var_jax.convert import naming
from var_jax.transformer.model import VAR, KVCache, block_causal_mask, dummy_inputs, init_params

BUFFERS = ('lvl_1L', 'attn_bias_for_masking', 'zero_k_bias', 'ema_vocab_hit_SV')


def is_buffer(key):
  return key.split('.')[-1] in BUFFERS


def abstract_params(model, config, Cvae):
  return jax.eval_shape(lambda: nn.meta.unbox(
      model.init({'params': jax.random.key(0)}, *dummy_inputs(config, Cvae))['params']))


def params_from_state_dict(sd, abstract):
  """Every non-buffer torch key placed at its Flax path (test-side converter)."""
  flat = naming.flatten(abstract)
  out = {}
  for key, value in sd.items():
    if is_buffer(key):
      continue
    path = naming.resolve_path(key, flat)
    assert path is not None, f'{key} has no Flax parameter'
    arr = naming.torch_to_flax_array(path[-1], np.asarray(value))
    assert arr.shape == flat[path].shape, (key, arr.shape, flat[path].shape)
    out[path] = jnp.asarray(arr)
  assert set(out) == set(flat), f'parameters without a torch key: {set(flat) - set(out)}'
  return naming.unflatten(out)


@functools.lru_cache(maxsize=None)
def loaded(name):
  fx = get_fixture(name)
  cfg = fx.config
  model = VAR(cfg.var, cfg.vae.vocab_size, cfg.vae.Cvae)
  params = params_from_state_dict(fx.var_sd, abstract_params(model, cfg.var, cfg.vae.Cvae))
  return fx, model, params


def targets(fx):
  S = len(fx.config.patch_nums)
  return np.concatenate([fx.io[f'idx_{k}'] for k in range(S)], axis=1)


def ce_loss(model, params, labels, x, tgt):
  logits = model.apply({'params': params}, labels, x)
  logp = jax.nn.log_softmax(logits, -1)
  return -jnp.take_along_axis(logp, tgt[..., None], -1).mean(), logits


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
def test_logits_loss_and_grads(fx, scan):
  fx, model, params = loaded(fx.name)
  model = model.clone(scan_blocks=scan)
  tgt = jnp.asarray(targets(fx))
  fn = jax.jit(jax.value_and_grad(lambda p: ce_loss(model, p, fx.io['label'], fx.io['var_input'], tgt),
                                  has_aux=True))
  (loss, logits), grads = fn(params)
  np.testing.assert_allclose(np.asarray(logits), fx.io['logits'], atol=1e-4, rtol=0)
  np.testing.assert_allclose(float(loss), float(fx.io['loss']), rtol=1e-5)
  flat = naming.flatten(grads)
  names = [k[len('grad_'):] for k in fx.io if k.startswith('grad_')]
  assert 'word_embed.weight' in names and 'head.weight' in names
  for name in names:
    path = naming.resolve_path(name, flat)
    got = naming.flax_to_torch_array(path[-1], np.asarray(flat[path]))
    np.testing.assert_allclose(got, fx.io[f'grad_{name}'], atol=1e-4, rtol=0, err_msg=name)


def test_logits_with_bf16_compute_are_close(fx):
  fx, _, params = loaded(fx.name)
  cfg = fx.config
  model = VAR(cfg.var, cfg.vae.vocab_size, cfg.vae.Cvae, dtype=jnp.bfloat16)
  logits = jax.jit(model.apply)({'params': params}, fx.io['label'], fx.io['var_input'])
  assert logits.dtype == jnp.float32
  ref = fx.io['logits']
  err = np.abs(np.asarray(logits) - ref).max() / np.abs(ref).max()
  assert err < 0.1, err


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.slow
def test_kv_cached_decoding_matches_teacher_forcing(scan):
  """decode_scale, scale after scale, gives the teacher-forced logits (tiny4)."""
  fx, model, params = loaded('tiny4')
  model = model.clone(scan_blocks=scan)
  cfg = fx.config.var
  labels, x = fx.io['label'], fx.io['var_input']

  def run(p):
    cond, ada = model.apply({'params': p}, labels, method=VAR.condition)
    cache = KVCache.zeros(cfg, labels.shape[0])
    outs = []
    for si, (b, e) in enumerate(cfg.begin_ends):
      if si == 0:
        tok = model.apply({'params': p}, cond, method=VAR.first_token_map)
      else:
        tok = model.apply({'params': p}, si, x[:, b - cfg.first_l:e - cfg.first_l],
                          method=VAR.next_token_map)
      logits, cache = model.apply({'params': p}, si, tok, cond, ada, cache, method=VAR.decode_scale)
      outs.append(logits)
    return jnp.concatenate(outs, 1)

  np.testing.assert_allclose(np.asarray(jax.jit(run)(params)), fx.io['logits'], atol=1e-4, rtol=0)


def test_block_causal_mask():
  m = block_causal_mask((1, 2))
  np.testing.assert_array_equal(m, [[1, 0, 0, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 1],
                                    [1, 1, 1, 1, 1], [1, 1, 1, 1, 1]])


RELEASE = ('var_d16.pth', 'var_d20.pth', 'var_d24.pth', 'var_d30.pth', 'var_d36.pth')


@pytest.mark.parametrize('name', RELEASE)
def test_release_shapes(name):
  info = json.loads((FIXTURES / 'release_shapes.json').read_text())['models'][name]
  ctor = info['constructor']
  fields = {f for f in VARConfig.__dataclass_fields__}
  cfg = VARConfig(**{k: v for k, v in ctor.items() if k in fields})
  model = VAR(cfg, 4096, 32)
  abstract = abstract_params(model, cfg, 32)
  flat = naming.flatten(abstract)
  seen = set()
  for key, meta in info['state_dict'].items():
    if meta['kind'] == 'buffer':
      assert is_buffer(key), key
      continue
    path = naming.resolve_path(key, flat)
    assert path is not None, key
    want = naming.torch_to_flax_array(path[-1], np.empty(meta['shape'], np.bool_)).shape
    assert flat[path].shape == want, (key, flat[path].shape, want)
    seen.add(path)
  assert seen == set(flat)
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == info['num_parameters']
  assert cfg.L == info['L']


@pytest.mark.parametrize('shared_aln,l2', [(True, True), (False, False), (True, False)])
@pytest.mark.slow
def test_variants_run_and_train_mode(shared_aln, l2):
  cfg = VARConfig(num_classes=5, depth=3, embed_dim=32, num_heads=4, shared_aln=shared_aln,
                  attn_l2_norm=l2, patch_nums=(1, 2, 3), drop_rate=0.1, attn_drop_rate=0.1,
                  drop_path_rate=0.2, cond_drop_rate=0.5)
  params = jax.jit(lambda k: init_params(k, cfg, vocab_size=16, Cvae=4))(jax.random.key(1))
  flat = {'/'.join(k) for k in naming.flatten(params)}
  assert ('shared_ada_lin_1/kernel' in flat) == shared_aln
  assert ('blocks_0/ada_gss' in flat) == shared_aln
  assert ('blocks_0/ada_lin_1/kernel' in flat) != shared_aln
  assert ('blocks_0/attn/scale_mul_1H11' in flat) == l2
  model = VAR(cfg, 16, 4)
  labels = jnp.array([0, 4])
  x = jax.random.normal(jax.random.key(2), (2, cfg.L - 1, 4))
  ev = jax.jit(model.apply)({'params': params}, labels, x)
  chex.assert_shape(ev, (2, cfg.L, 16))
  chex.assert_tree_all_finite(ev)
  train = jax.jit(lambda p, k: model.apply({'params': p}, labels, x, train=True, rngs={'dropout': k}))
  tr = [train(params, jax.random.key(s)) for s in (0, 1)]
  chex.assert_tree_all_finite(tr)
  assert not np.allclose(tr[0], tr[1]) and not np.allclose(tr[0], ev)


def test_reference_init_statistics():
  cfg = VARConfig(num_classes=10, depth=4, embed_dim=128, num_heads=4, patch_nums=(1, 2))
  p = jax.jit(lambda k: init_params(k, cfg, vocab_size=256, Cvae=8, init_head=0.02,
                                    init_adaln=0.5, init_adaln_gamma=1e-5))(jax.random.key(0))
  std = np.sqrt(1 / 128 / 3)
  np.testing.assert_allclose(np.std(p['blocks_0']['attn']['mat_qkv']['kernel']), std, rtol=0.05)
  np.testing.assert_allclose(np.std(p['blocks_0']['attn']['proj']['kernel']), std / np.sqrt(8), rtol=0.05)
  np.testing.assert_allclose(np.std(p['head']['kernel']), std * 0.02, rtol=0.05)
  ada = np.asarray(p['blocks_0']['ada_lin_1']['kernel'])
  np.testing.assert_allclose(np.std(ada[:, :256]), std * 1e-5, rtol=0.05)
  np.testing.assert_allclose(np.std(ada[:, 256:]), std * 0.5, rtol=0.05)
  np.testing.assert_allclose(p['blocks_0']['attn']['scale_mul_1H11'], np.log(4.0), rtol=1e-6)
  assert not np.any(p['head']['bias']) and not np.any(p['blocks_0']['attn']['q_bias'])
  boxed = jax.eval_shape(lambda: init_params(jax.random.key(0), cfg, 256, 8, boxed=True))
  specs = nn.get_partition_spec(boxed)
  assert specs['blocks_0']['ffn']['fc1']['kernel'] == jax.sharding.PartitionSpec('embed', 'mlp')


@pytest.mark.slow
def test_scan_and_unrolled_blocks_agree():
  """lax.scan over stacked blocks == unrolled blocks: logits, gradients (also with
  remat) and the KV cache of a decoded scale (tiny4, depth 2)."""
  fx, model, params = loaded('tiny4')
  tgt = jnp.asarray(targets(fx))
  labels, x = fx.io['label'], fx.io['var_input']

  def run(m):
    def f(p):
      return ce_loss(m, p, labels, x, tgt)
    (loss, logits), grads = jax.value_and_grad(f, has_aux=True)(params)
    cond, ada = m.apply({'params': params}, labels, method=VAR.condition)
    tok = m.apply({'params': params}, cond, method=VAR.first_token_map)
    _, cache = m.apply({'params': params}, 0, tok, cond, ada, KVCache.zeros(m.config, labels.shape[0]),
                       method=VAR.decode_scale)
    return logits, grads, cache

  outs = jax.jit(lambda: [run(model.clone(scan_blocks=s, remat=r))
                          for s, r in ((False, False), (True, False), (True, True))])()
  base = outs[0]
  for other in outs[1:]:
    chex.assert_trees_all_close(other, base, atol=1e-5, rtol=1e-5)
  assert np.abs(np.asarray(base[2].k[:, :, :1])).max() > 0     # scale 0 written ...
  assert not np.any(np.asarray(base[2].k[:, :, 1:]))           # ... and nothing else


@pytest.mark.slow
def test_scanned_drop_path_uses_per_block_rate():
  """depth 2, drop_path_rate 1: rates (0, 1), so in training block 0 is always kept
  and block 1 always dropped; the train output then equals the eval output with
  block 1's residual gammas set to 0 (both block loops)."""
  cfg = VARConfig(num_classes=5, depth=2, embed_dim=32, num_heads=4, patch_nums=(1, 2, 3),
                  drop_path_rate=1.0, cond_drop_rate=0.0)
  params = jax.jit(lambda k: init_params(k, cfg, vocab_size=16, Cvae=4, init_adaln_gamma=0.5,
                                         init_head=1.0))(jax.random.key(3))
  ada = params['blocks_1']['ada_lin_1']
  C = cfg.embed_dim
  no_block1 = dict(params, blocks_1=dict(params['blocks_1'], ada_lin_1=dict(
      kernel=ada['kernel'].at[:, :2 * C].set(0), bias=ada['bias'].at[:2 * C].set(0))))
  labels = jnp.array([0, 3, 4])
  x = jax.random.normal(jax.random.key(2), (3, cfg.L - 1, 4))

  @jax.jit
  def outs(key):
    res = []
    for scan in (True, False):
      m = VAR(cfg, 16, 4, scan_blocks=scan)
      res.append(m.apply({'params': params}, labels, x, train=True, rngs={'dropout': key}))
      res.append(m.apply({'params': no_block1}, labels, x))
    full = VAR(cfg, 16, 4).apply({'params': params}, labels, x)
    return res, full

  (tr_scan, ref_scan, tr_unr, ref_unr), full = outs(jax.random.key(0))
  np.testing.assert_allclose(tr_scan, ref_scan, atol=1e-5, rtol=0)
  np.testing.assert_allclose(tr_unr, ref_unr, atol=1e-5, rtol=0)
  assert not np.allclose(ref_scan, full, atol=1e-3)       # block 1 does matter in eval


@pytest.mark.slow
def test_scanned_dropout_differs_per_block():
  """Each scanned block gets its own dropout key: the FFN dropout masks of two
  blocks (recorded at run time through a method interceptor) differ, and a
  different seed gives different masks."""
  cfg = VARConfig(num_classes=5, depth=2, embed_dim=32, num_heads=4, patch_nums=(1, 2, 3),
                  drop_rate=0.5, cond_drop_rate=0.0)
  params = jax.jit(lambda k: init_params(k, cfg, vocab_size=16, Cvae=4))(jax.random.key(4))
  labels = jnp.array([1, 2])
  x = jax.random.normal(jax.random.key(2), (2, cfg.L - 1, 4))
  masks = []

  def spy(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if isinstance(context.module, nn.Dropout) and context.module.path[-2:] == ('ffn', 'Dropout_0'):
      jax.debug.callback(lambda m: masks.append(np.asarray(m)), out != 0, ordered=True)
    return out

  model = VAR(cfg, 16, 4)
  for seed in (0, 1):
    with nn.intercept_methods(spy):
      out = jax.jit(lambda k: model.apply({'params': params}, labels, x, train=True,
                                          rngs={'dropout': k}))(jax.random.key(seed))
    jax.block_until_ready(out)
  assert len(masks) == 4                    # 2 seeds x 2 blocks
  for m in masks:
    assert 0.3 < m.mean() < 0.7             # really dropping about half
  assert not np.array_equal(masks[0], masks[1])     # block 0 vs block 1
  assert not np.array_equal(masks[0], masks[2])     # seed 0 vs seed 1


def test_training_blocks_scanned_and_unrolled_give_the_same_step():
  """train=True with every random part on (class dropout, drop path, attention and FFN
  dropout): the unrolled blocks draw the scanned loop's masks, so loss and gradients
  agree, with and without remat (model.scan_blocks only changes how XLA sees the loop)."""
  cfg = VARConfig(num_classes=5, depth=3, embed_dim=32, num_heads=4, patch_nums=(1, 2, 3),
                  drop_rate=0.3, attn_drop_rate=0.2, drop_path_rate=0.5, cond_drop_rate=0.5)
  params = jax.jit(lambda k: init_params(k, cfg, vocab_size=16, Cvae=4, init_adaln_gamma=0.5,
                                         init_head=1.0))(jax.random.key(5))
  labels = jnp.array([0, 1, 2, 3, 4, 1])
  x = jax.random.normal(jax.random.key(6), (6, cfg.L - 1, 4))

  def loss_and_grads(scan, remat, key):
    m = VAR(cfg, 16, 4, scan_blocks=scan, remat=remat)
    f = lambda p: jnp.mean(m.apply({'params': p}, labels, x, train=True, rngs={'dropout': key}) ** 2)
    return jax.value_and_grad(f)(params)

  @jax.jit
  def run(key):
    return [loss_and_grads(s, r, key) for s in (True, False) for r in ('none', 'dots_saveable')]

  outs = run(jax.random.key(0))
  for other in outs[1:]:
    chex.assert_trees_all_close(other, outs[0], atol=1e-6, rtol=1e-6)
  other_key = run(jax.random.key(1))[1]
  assert abs(float(other_key[0]) - float(outs[0][0])) > 1e-4     # the masks do depend on the key
