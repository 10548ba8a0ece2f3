"""VQVAE tokenizer: parameter names/shapes, parity with the reference fixtures, training path."""
import functools
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn
from flax.linen import meta

from conftest import FIXTURES, get_fixture
from var_jax.config import ModelConfig, VQVAEConfig
from var_jax.convert import naming
from var_jax.tokenizer import VQVAE

TOL = 1e-4
BUFFERS = ('quantize.ema_vocab_hit_SV',)


def abstract_params(model: VQVAE, boxed: bool = False):
  """Param tree of `model` as ShapeDtypeStructs (nothing allocated)."""
  S, C = model.config.image_size, model.config.in_channels
  tree = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, S, S, C))))
  return tree['params'] if boxed else meta.unbox(tree['params'])


def random_params(model: VQVAE, seed: int = 0) -> dict:
  """Random float32 params of the right tree (numpy: avoids compiling a PRNG-heavy init)."""
  rng = np.random.default_rng(seed)
  return jax.tree_util.tree_map(
      lambda s: jnp.asarray(rng.normal(0, 0.3, s.shape), s.dtype), abstract_params(model))


def params_from_state_dict(model: VQVAE, sd) -> dict:
  """Test-only converter: reference state dict -> Flax params via the naming rule."""
  flat = naming.flatten(abstract_params(model))
  out = {}
  for key, value in sd.items():
    path = naming.resolve_path(key, flat)
    if path is None:
      assert key in BUFFERS, f'unmapped torch key {key}'
      continue
    arr = naming.torch_to_flax_array(path[-1], value)
    assert arr.shape == flat[path].shape, (key, arr.shape, flat[path].shape)
    out[path] = jnp.asarray(arr)
  assert set(out) == set(flat), set(flat) - set(out)
  return naming.unflatten(out)


def check_names(model: VQVAE, keys_shapes):
  """Every torch key (bar buffers) resolves to a Flax param of the same shape, and back."""
  flat = naming.flatten(abstract_params(model))
  mapped = set()
  for key, shape in keys_shapes.items():
    path = naming.resolve_path(key, flat)
    if key in BUFFERS:
      assert path is None
      continue
    assert path is not None, f'torch key {key} has no Flax param'
    assert naming.path_to_torch_key(path) == key
    want = naming.torch_to_flax_array(path[-1], np.zeros(shape, np.float32)).shape
    assert flat[path].shape == want, (key, flat[path].shape, want)
    mapped.add(path)
  assert set(flat) == mapped, f'Flax params without torch key: {set(flat) - mapped}'
  return flat


def _apply(model, method):
  return jax.jit(lambda p, *a: model.apply({'params': p}, *a, method=method))


@functools.lru_cache(maxsize=None)
def run(name: str):
  """The fixture's VQVAE methods on the fixture inputs, all in one jitted program."""
  fx = get_fixture(name)
  model = VQVAE(fx.config.vae)
  p = params_from_state_dict(model, fx.vae_sd)
  S = len(fx.config.patch_nums)
  idx_ref = [jnp.asarray(fx.io[f'idx_{k}']) for k in range(S)]

  @jax.jit
  def everything(p, img, enc_f_ref, fhat_ref, idx_ref):
    call = lambda method, *a: model.apply({'params': p}, *a, method=method)
    out = {'f': call('encode_f', img)}
    out['idx'], out['fhats'] = call('f_to_idx_and_fhats', out['f'])
    out['fhats_from_ref_f'] = call('f_to_fhats', enc_f_ref)
    out['img_idx'] = call('img_to_idx', img)
    out['recon'] = call('decode_fhat', out['fhats'][-1])
    out['fhat_to_img'] = call('decode_fhat', fhat_ref)
    out['idx_to_img'] = call('idx_to_img', idx_ref)
    out['idx_to_fhat'] = call('idx_to_fhat', idx_ref)
    out['var_input'] = call('idx_to_var_input', idx_ref)
    return out

  out = everything(p, jnp.asarray(fx.nhwc('img')), jnp.asarray(fx.nhwc('enc_f')),
                   jnp.asarray(fx.nhwc(f'fhat_{S - 1}')), idx_ref)
  return dict(out, model=model, params=p, idx_ref=idx_ref, S=S)


def maxerr(a, b):
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


# --- names and shapes ----------------------------------------------------------------------
def test_param_names_match_fixture_state_dict(fx):
  check_names(VQVAE(fx.config.vae), {k: v.shape for k, v in fx.vae_sd.items()})


def test_param_tree_matches_release_checkpoint():
  entry = json.loads((FIXTURES / 'release_shapes.json').read_text())['models']['vae_ch160v4096z32.pth']
  cfg = ModelConfig.from_dict({'vae': entry['constructor'], 'vae_ddconfig': entry['ddconfig']}).vae
  assert cfg == VQVAEConfig()   # the defaults are the release
  flat = check_names(VQVAE(cfg), {k: tuple(v['shape']) for k, v in entry['state_dict'].items()})
  assert sum(int(np.prod(v.shape)) for v in flat.values()) == entry['num_parameters']


def test_every_param_has_logical_axes():
  boxed = abstract_params(VQVAE(get_fixture('tiny4').config.vae), boxed=True)
  leaves = jax.tree_util.tree_leaves_with_path(
      boxed, is_leaf=lambda x: isinstance(x, nn.Partitioned))
  allowed = {'conv_h', 'conv_w', 'conv_in', 'conv_out', 'norm', 'codebook', 'cvae'}
  for path, leaf in leaves:
    assert isinstance(leaf, nn.Partitioned), path
    assert len(leaf.names) == leaf.value.ndim and set(leaf.names) <= allowed, (path, leaf.names)


@pytest.mark.parametrize('share, quant_resi, want', [
    (0, 0.5, ['quantize.quant_resi.0.weight', 'quantize.quant_resi.2.bias']),
    (1, 0.5, ['quantize.quant_resi.qresi.weight', 'quantize.quant_resi.qresi.bias']),
    (2, -0.5, ['quantize.quant_resi.qresi_ls.0.weight', 'quantize.quant_resi.qresi_ls.1.bias']),
    (4, 1e-7, []),
])
def test_phi_layouts(share, quant_resi, want):
  cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
                    using_sa=False, using_mid_sa=False, v_patch_nums=(1, 2, 3),
                    share_quant_resi=share, quant_resi=quant_resi)
  model = VQVAE(cfg)
  keys = {naming.path_to_torch_key(p) for p in naming.flatten(abstract_params(model))}
  phi_keys = {k for k in keys if k.startswith('quantize.quant_resi')}
  assert set(want) <= phi_keys
  assert len(phi_keys) == 2 * (cfg.num_phi if cfg.phi_enabled else 0)
  # every layout runs end to end, and idx -> f_hat agrees with the encoder's f_hat

  @jax.jit
  def go(p, img):
    f = model.apply({'params': p}, img, method='encode_f')
    idx, fhats = model.apply({'params': p}, f, method='f_to_idx_and_fhats')
    return idx, fhats[-1], model.apply({'params': p}, idx, method='idx_to_fhat')

  img = np.random.default_rng(2).uniform(-1, 1, (2, 3, 3, 3)).astype(np.float32)
  idx, fhat, fhat_from_idx = go(random_params(model), img)
  assert [i.shape for i in idx] == [(2, 1), (2, 4), (2, 9)]
  np.testing.assert_allclose(fhat_from_idx, fhat, atol=1e-5)


def test_unused_phi_convs_are_still_created():
  """2 scales with 4 phi convs: scales use convs 0 and 3, but all four are parameters."""
  cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
                    using_sa=False, using_mid_sa=False, v_patch_nums=(1, 2), share_quant_resi=4)
  assert cfg.phi_index_per_scale == (0, 3)
  assert sorted(abstract_params(VQVAE(cfg))['quantize']['quant_resi']) == [
      f'qresi_ls_{i}' for i in range(4)]


def test_identity_phi_and_znorm():
  """quant_resi ~ 0: f_hat is the sum of the upsampled code vectors; znorm picks max cosine."""
  cfg = VQVAEConfig(vocab_size=16, z_channels=4, ch=32, ch_mult=(1,), num_res_blocks=1,
                    using_sa=False, using_mid_sa=False, v_patch_nums=(1, 2), quant_resi=0.0,
                    using_znorm=True)
  model = VQVAE(cfg)
  p = random_params(model)
  f = np.random.default_rng(3).normal(size=(2, 2, 2, 4)).astype(np.float32)
  idx = _apply(model, 'f_to_idx_and_fhats')(p, f)[0]
  e = np.asarray(p['quantize']['embedding']['embedding'])
  z0 = np.asarray(f).mean((1, 2))
  cos = (z0 / np.linalg.norm(z0, axis=-1, keepdims=True)) @ (e / np.linalg.norm(e, axis=-1, keepdims=True)).T
  np.testing.assert_array_equal(np.asarray(idx[0])[:, 0], cos.argmax(-1))
  want = e[np.asarray(idx[0])[:, 0]][:, None, None, :] + e[np.asarray(idx[1])].reshape(2, 2, 2, 4)
  np.testing.assert_allclose(_apply(model, 'idx_to_fhat')(p, idx), want, atol=1e-6)


# --- parity with the reference ------------------------------------------------------------
def test_encode_f(fx):
  assert run(fx.name)['f'].dtype == jnp.float32
  assert maxerr(run(fx.name)['f'], fx.nhwc('enc_f')) < TOL


def test_tokens_exact(fx):
  r = run(fx.name)
  for k in range(r['S']):
    np.testing.assert_array_equal(np.asarray(r['idx'][k]), fx.io[f'idx_{k}'], err_msg=f'scale {k}')
    np.testing.assert_array_equal(np.asarray(r['img_idx'][k]), fx.io[f'idx_{k}'])
    assert r['idx'][k].dtype == jnp.int32


def test_fhats(fx):
  r = run(fx.name)
  for k in range(r['S']):
    assert maxerr(r['fhats'][k], fx.nhwc(f'fhat_{k}')) < TOL, k
    assert maxerr(r['fhats_from_ref_f'][k], fx.nhwc(f'fhat_{k}')) < TOL, k
  assert maxerr(r['idx_to_fhat'], fx.nhwc(f'fhat_{r["S"] - 1}')) < TOL


def test_reconstruction(fx):
  r = run(fx.name)
  assert maxerr(r['recon'], fx.nhwc('recon')) < TOL
  assert maxerr(r['fhat_to_img'], fx.nhwc('fhat_to_img')) < TOL
  assert maxerr(r['idx_to_img'], fx.nhwc('recon')) < TOL
  assert maxerr(r['idx_to_img'], r['recon']) < 1e-5
  assert float(jnp.max(jnp.abs(r['recon']))) <= 1.0


def test_var_input(fx):
  r = run(fx.name)
  assert r['var_input'].shape == fx.io['var_input'].shape
  assert maxerr(r['var_input'], fx.io['var_input']) < TOL


def test_autoregressive_steps_rebuild_fhats_and_var_input(fx):
  """embed_tokens + next_ar_input, scale by scale (the sampler's loop), on the fixture tokens."""
  r = run(fx.name)
  model, p, S = r['model'], r['params'], r['S']

  @jax.jit
  def loop(p, idx_list):
    f_hat, nexts, fhats = jnp.zeros(fx.nhwc('fhat_0').shape), [], []
    for si in range(S):
      h = model.apply({'params': p}, idx_list[si], method='embed_tokens')
      f_hat, nxt = model.apply({'params': p}, si, f_hat, h, method='next_ar_input')
      fhats.append(f_hat)
      if si < S - 1:
        nexts.append(nxt)
      else:
        assert nxt is None
    return fhats, jnp.concatenate(nexts, axis=1)

  fhats, var_input = loop(p, r['idx_ref'])
  for k in range(S):
    assert maxerr(fhats[k], fx.nhwc(f'fhat_{k}')) < TOL, k
  assert maxerr(var_input, fx.io['var_input']) < TOL


# --- training path -------------------------------------------------------------------------
def test_quantize_train(fx):
  r = run(fx.name)
  model, p, S = r['model'], r['params'], r['S']
  f = jnp.asarray(fx.nhwc('enc_f'))
  w = np.random.default_rng(0).normal(size=f.shape).astype(np.float32)
  qt = lambda p, f: model.apply({'params': p}, f, method='quantize_train')

  def loss(p, f):
    f_hat_st, vq, _ = qt(p, f)
    return vq + jnp.mean(f_hat_st * w)

  @jax.jit
  def step(p, f):
    g_st = jax.grad(lambda f: qt(p, f)[0].sum())(f)
    g_vq = jax.grad(lambda f: qt(p, f)[1])(f)
    return qt(p, f), jax.grad(loss)(p, f), g_st, g_vq

  (f_hat_st, vq_loss, idx), g, g_st, g_vq = step(p, f)
  assert maxerr(f_hat_st, fx.nhwc(f'fhat_{S - 1}')) < TOL
  for k in range(S):
    np.testing.assert_array_equal(np.asarray(idx[k]), fx.io[f'idx_{k}'])
  # forward value: mean over scales of (1 + beta) * mse(f_hat_k, f)
  f_ref = fx.nhwc('enc_f')
  per_scale = [np.mean((fx.nhwc(f'fhat_{k}') - f_ref) ** 2) for k in range(S)]
  want = (1 + model.config.beta) * np.mean(per_scale)
  assert np.isfinite(float(vq_loss)) and abs(float(vq_loss) - want) < 1e-5 * max(1.0, want)
  # straight-through: f_hat_st passes the gradient to f unchanged
  np.testing.assert_allclose(g_st, np.ones(f.shape), atol=1e-6)
  # commitment: d vq / df = mean_k 2 beta (f - f_hat_k) / numel
  want_g = np.mean([2 * model.config.beta * (f_ref - fx.nhwc(f'fhat_{k}')) / f.size
                    for k in range(S)], axis=0)
  np.testing.assert_allclose(g_vq, want_g, atol=1e-6 * float(np.max(np.abs(want_g))) + 1e-9)
  # the codebook and every phi conv that some scale uses get gradients; unused ones none
  nonzero = lambda t: float(jnp.max(jnp.abs(t))) > 0
  assert nonzero(g['quantize']['embedding']['embedding'])
  used = set(model.config.phi_index_per_scale)
  for i in range(model.config.num_phi):
    assert nonzero(g['quantize']['quant_resi'][f'qresi_ls_{i}']['kernel']) == (i in used), i


@pytest.mark.slow
def test_forward_train_and_call():
  """forward_train (recon, vq_loss, tokens) and __call__; gradients reach every part."""
  r = run('tiny4')
  model, p = r['model'], r['params']
  fx = get_fixture('tiny4')
  img = jnp.asarray(fx.nhwc('img'))

  def loss(p, img):
    rec, vq, _ = model.apply({'params': p}, img, method='forward_train')
    return jnp.mean((rec - img) ** 2) + vq

  @jax.jit
  def both(p, img):
    return (model.apply({'params': p}, img, method='forward_train'),
            model.apply({'params': p}, img), jax.grad(loss)(p, img[:1]))

  (rec, vq, idx), call_rec, g = both(p, img)
  assert rec.shape == img.shape and np.isfinite(float(vq))
  for k in range(r['S']):
    np.testing.assert_array_equal(np.asarray(idx[k]), fx.io[f'idx_{k}'])
  assert maxerr(jnp.clip(rec, -1, 1), fx.nhwc('recon')) < TOL
  assert maxerr(call_rec, fx.nhwc('recon')) < TOL
  nonzero = lambda t: float(jnp.max(jnp.abs(t))) > 0
  for path in [('encoder', 'conv_in', 'kernel'), ('encoder', 'down_0', 'block_0', 'norm1', 'scale'),
               ('quant_conv', 'kernel'), ('quantize', 'embedding', 'embedding'),
               ('quantize', 'quant_resi', 'qresi_ls_0', 'kernel'), ('post_quant_conv', 'kernel'),
               ('decoder', 'conv_out', 'kernel')]:
    assert nonzero(functools.reduce(lambda t, k: t[k], path, g)), path


# --- bfloat16 -------------------------------------------------------------------------------
@pytest.mark.slow
def test_bf16_compute_keeps_quantizer_float32():
  fx = get_fixture('tiny4')
  r = run('tiny4')
  model = VQVAE(fx.config.vae, dtype=jnp.bfloat16)
  S = len(fx.config.patch_nums)
  call = lambda p, method, *a: model.apply({'params': p}, *a, method=method)
  fn = jax.jit(lambda p, img, f, fhat, idx: (
      call(p, 'f_to_idx_and_fhats', f), call(p, 'idx_to_var_input', idx),
      call(p, 'encode_f', img), call(p, 'decode_fhat', fhat)))
  args = (r['params'], jnp.asarray(fx.nhwc('img')), jnp.asarray(fx.nhwc('enc_f')),
          jnp.asarray(fx.nhwc(f'fhat_{S - 1}')), r['idx_ref'])
  lowered = fn.lower(*args)
  assert 'bf16' in lowered.as_text()
  (idx, fhats), var_input, f, rec = lowered.compile()(*args)
  # quantizer unaffected by the compute dtype: exact tokens, float32-accurate f_hat
  for k in range(S):
    np.testing.assert_array_equal(np.asarray(idx[k]), fx.io[f'idx_{k}'])
    assert fhats[k].dtype == jnp.float32 and maxerr(fhats[k], fx.nhwc(f'fhat_{k}')) < TOL
  assert var_input.dtype == jnp.float32 and maxerr(var_input, fx.io['var_input']) < TOL
  # encoder / decoder in bfloat16: float32 outputs, close to (but not exactly) the reference
  assert f.dtype == rec.dtype == jnp.float32
  assert 0 < maxerr(f, fx.nhwc('enc_f')) < 0.1
  assert 0 < float(np.mean(np.abs(np.asarray(rec) - fx.nhwc('recon')))) < 0.03


# --- errors ---------------------------------------------------------------------------------
def test_wrong_image_size_raises():
  r = run('tiny4')
  with pytest.raises(ValueError, match=r'\(B, 64, 64, 3\)'):
    r['model'].apply({'params': r['params']}, jnp.zeros((1, 32, 32, 3)), method='encode_f')
  with pytest.raises(ValueError, match=r'\(B, 64, 64, 3\)'):
    r['model'].apply({'params': r['params']}, jnp.zeros((1, 3, 64, 64)), method='img_to_idx')


def test_wrong_token_maps_raise():
  r = run('tiny4')
  apply = functools.partial(r['model'].apply, {'params': r['params']})
  with pytest.raises(ValueError, match='expected 4 token maps'):
    apply(r['idx_ref'][:3], method='idx_to_img')
  with pytest.raises(ValueError, match=r'token map 2 must have shape \(B, 9\)'):
    apply(r['idx_ref'][:2] + [r['idx_ref'][3], r['idx_ref'][3]], method='idx_to_fhat')
  with pytest.raises(ValueError, match=r'\(B, 4, 4, 8\)'):
    apply(jnp.zeros((1, 8, 8, 8)), method='f_to_fhats')


# --- fast compute paths -----------------------------------------------------------------------
def _randn(shape, seed, scale=1.0):
  return jnp.asarray(np.random.default_rng(seed).normal(0, scale, shape), jnp.float32)


@pytest.mark.parametrize('act', [False, True])
def test_group_norm_is_flax_group_norm_in_float32(act):
  """Float32: bit-identical to nn.GroupNorm(32, two-pass) (+ nn.silu); bfloat16
  (one-pass variance, one cast): within bf16 rounding of it."""
  from var_jax.tokenizer.autoencoder import GroupNorm
  x = _randn((2, 5, 3, 64), 0, 3.0) + 1.5
  p = {'scale': _randn((64,), 1) + 1, 'bias': _randn((64,), 2)}
  flax_gn = nn.GroupNorm(num_groups=32, epsilon=1e-6, use_fast_variance=False)
  ref = jax.jit(lambda p, x: (nn.silu if act else (lambda y: y))(flax_gn.apply({'params': p}, x)))(p, x)
  got = jax.jit(lambda p, x: GroupNorm().apply({'params': p}, x, act))(p, x)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(ref))
  bf = jax.jit(lambda p, x: GroupNorm(dtype=jnp.bfloat16).apply({'params': p}, x, act))(
      p, x.astype(jnp.bfloat16))
  assert bf.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(bf, np.float32), ref, atol=0.05, rtol=0.02)


def test_subpixel_upsample_equals_repeat_then_conv():
  """The 2x2 low-resolution conv computes conv3x3(nearest x2) with the same params."""
  from var_jax.tokenizer.autoencoder import Upsample
  hi = jax.lax.Precision.HIGHEST
  x = _randn((2, 5, 4, 8), 3)
  p = {'conv': {'kernel': _randn((3, 3, 8, 8), 4, 0.3), 'bias': _randn((8,), 5)}}
  ref = Upsample(subpixel=False, precision=hi).apply({'params': p}, x)
  got = Upsample(subpixel=True, precision=hi).apply({'params': p}, x)
  assert got.shape == ref.shape == (2, 10, 8, 8)
  np.testing.assert_allclose(got, ref, atol=1e-5, rtol=0)
  created = meta.unbox(Upsample().init(jax.random.key(0), x)['params'])
  assert jax.tree.map(jnp.shape, created) == jax.tree.map(jnp.shape, p)


def _program_flops(fn, *args) -> int:
  """2 * multiply-adds of every conv and matmul in fn's jaxpr (from the shapes)."""
  total = 0

  def walk(jaxpr):
    nonlocal total
    for eqn in jaxpr.eqns:
      for sub in jax.extend.core.jaxprs_in_params(eqn.params):
        walk(sub)
      if eqn.primitive.name == 'conv_general_dilated':
        lhs, rhs = (v.aval.shape for v in eqn.invars)
        out = eqn.outvars[0].aval.shape
        dn = eqn.params['dimension_numbers']
        kh, kw = (rhs[d] for d in dn.rhs_spec[2:])
        c_in = rhs[dn.rhs_spec[1]]
        total += 2 * kh * kw * c_in * int(np.prod(out))
      elif eqn.primitive.name == 'dot_general':
        (contract, _), _ = eqn.params['dimension_numbers']
        lhs = eqn.invars[0].aval.shape
        total += 2 * int(np.prod([lhs[d] for d in contract])) * int(np.prod(eqn.outvars[0].aval.shape))
  walk(jax.make_jaxpr(fn)(*args).jaxpr)
  return total


@pytest.mark.parametrize('cfg', [VQVAEConfig(ch=32, ch_mult=(1, 2, 2), vocab_size=64, z_channels=8,
                                             v_patch_nums=(1, 2, 4)), VQVAEConfig()],
                         ids=['small', 'release'])
@pytest.mark.slow
def test_vqvae_flops_count_every_conv_and_matmul(cfg):
  """The analytic count equals the convs and matmuls of the traced encoder/decoder
  (quantizer excluded: encode_f and decode_fhat only)."""
  from var_jax.tokenizer import vqvae_flops
  S, h = cfg.image_size, cfg.v_patch_nums[-1]
  for subpixel in (True, False):
    model = VQVAE(cfg, subpixel_upsample=subpixel)
    p = abstract_params(model)
    call = lambda method: (lambda p, x: model.apply({'params': p}, x, method=method))
    enc = _program_flops(call('encode_f'), p, jax.ShapeDtypeStruct((3, S, S, 3), jnp.float32))
    dec = _program_flops(call('decode_fhat'), p, jax.ShapeDtypeStruct((3, h, h, cfg.Cvae), jnp.float32))
    assert vqvae_flops(cfg, 3, 'encode', subpixel=subpixel) == enc
    assert vqvae_flops(cfg, 3, 'decode', subpixel=subpixel) == dec
    assert vqvae_flops(cfg, 3, 'both', subpixel=subpixel) == enc + dec
  assert vqvae_flops(cfg, 1, 'decode', subpixel=True) < vqvae_flops(cfg, 1, 'decode', subpixel=False)
  with pytest.raises(ValueError, match='what must be one of'):
    vqvae_flops(cfg, 1, 'train')
