"""Attention implementations: selection, padding, and agreement with the xla path.

The fused kernels cannot run on a CPU, but their wrappers can: 'cudnn:xla' is the
cudnn branch (padding, mask, scale, layout) with jax.nn's XLA kernel swapped in, and
'splash:interpret' runs the real splash kernel in the Pallas interpreter. On a GPU,
tests/test_gpu.py checks the real cuDNN kernel at d16 shapes.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from var_jax.config import VARConfig
from var_jax.transformer import attention as attention_lib
from var_jax.transformer.model import VAR, KVCache, block_causal_mask, init_params, remat_policy

PATCH_NUMS = (1, 2, 3, 4)      # L = 30


def qkv(shape_q, shape_k, dtype=jnp.float32, seed=0):
  kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
  return (jax.random.normal(kq, shape_q, jnp.float32).astype(dtype),
          jax.random.normal(kk, shape_k, jnp.float32).astype(dtype),
          jax.random.normal(kv, shape_k, jnp.float32).astype(dtype))


def numpy_attention(q, k, v, scale, mask):
  q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
  logits = np.einsum('bqhc,bkhc->bhqk', q, k) * scale
  if mask is not None:
    logits = np.where(mask, logits, -np.inf)
  p = np.exp(logits - logits.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  return np.einsum('bhqk,bkhc->bqhc', p, v)


# --- selection ------------------------------------------------------------------------
@pytest.mark.parametrize('name,dtype,platform,want', [
    ('auto', jnp.bfloat16, 'gpu', 'cudnn'), ('auto', jnp.bfloat16, 'cuda', 'cudnn'),
    ('auto', jnp.float16, 'gpu', 'cudnn'), ('auto', jnp.float32, 'gpu', 'xla'),
    ('auto', jnp.bfloat16, 'tpu', 'splash'), ('auto', jnp.float32, 'tpu', 'xla'),
    ('auto', jnp.bfloat16, 'cpu', 'xla'), ('xla', jnp.bfloat16, 'gpu', 'xla'),
    ('cudnn', jnp.bfloat16, 'gpu', 'cudnn'), ('splash', jnp.bfloat16, 'tpu', 'splash'),
    ('splash', jnp.float32, 'tpu', 'splash')])
def test_resolve(name, dtype, platform, want):
  assert attention_lib.resolve(name, dtype, platform) == want


@pytest.mark.parametrize('name,dtype,platform,msg', [
    ('cudnn', jnp.bfloat16, 'cpu', "needs an NVIDIA GPU .*use 'xla'"),
    ('cudnn', jnp.float32, 'gpu', "bfloat16/float16 .*use 'xla'"),
    ('splash', jnp.bfloat16, 'gpu', "needs a TPU .*use 'xla'"),
    ('flash', jnp.bfloat16, 'gpu', 'must be one of')])
def test_resolve_refuses(name, dtype, platform, msg):
  with pytest.raises(ValueError, match=msg):
    attention_lib.resolve(name, dtype, platform)


def test_model_refuses_fused_attention_on_cpu():
  cfg = VARConfig(num_classes=3, depth=1, embed_dim=16, num_heads=2, patch_nums=(1, 2))
  model = VAR(cfg, 8, 4, dtype=jnp.bfloat16, attention='cudnn')
  with pytest.raises(ValueError, match='needs an NVIDIA GPU'):
    model.init(jax.random.key(0), jnp.zeros((1,), jnp.int32), jnp.zeros((1, 4, 4)))


# --- padding ----------------------------------------------------------------------------
def test_padded_mask():
  mask = block_causal_mask((1, 2))                        # 5 x 5
  out = attention_lib.padded_mask(mask, 5, 5, 8, 6)
  assert out.shape == (8, 6) and out.dtype == np.bool_
  np.testing.assert_array_equal(out[:5, :5], mask)
  assert not out[:, 5:].any()                             # padded keys never visible
  assert out[5:, :5].all()                                # padded queries see every real key
  none = attention_lib.padded_mask(None, 3, 7, 4, 8)      # cached step: no mask
  assert none[:, :7].all() and not none[:, 7:].any()
  assert attention_lib.round_up(680, 128) == 768 and attention_lib.round_up(256, 128) == 256


# --- agreement with the xla path ---------------------------------------------------------
def test_xla_path_matches_numpy():
  mask = block_causal_mask(PATCH_NUMS)
  q, k, v = qkv((2, 30, 2, 8), (2, 30, 2, 8))
  out = attention_lib.attention(q, k, v, scale=0.7, mask_qk=mask, implementation='xla',
                                precision=jax.lax.Precision.HIGHEST)
  np.testing.assert_allclose(out, numpy_attention(q, k, v, 0.7, mask), atol=1e-5)


def _value_and_grads(impl, q, k, v, scale, mask):
  def f(q, k, v):
    out = attention_lib.attention(q, k, v, scale=scale, mask_qk=mask, implementation=impl)
    return jnp.sum(jnp.sin(out.astype(jnp.float32))), out
  return jax.jit(jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True))(q, k, v)


@pytest.mark.parametrize('impl', ['cudnn:xla', 'splash:interpret'])
@pytest.mark.parametrize('patch_nums', [(1, 2), PATCH_NUMS], ids=['L5_odd', 'L30'])
@pytest.mark.slow
def test_fused_wrappers_match_xla_teacher_forcing(impl, patch_nums):
  """Block-causal mask, odd and even L (cuDNN pads odd L; splash pads to 128):
  outputs and q/k/v gradients equal the xla path (float32: to rounding)."""
  mask = block_causal_mask(patch_nums)
  L = mask.shape[0]
  q, k, v = qkv((2, L, 2, 8), (2, L, 2, 8))
  (_, want), want_g = _value_and_grads('xla', q, k, v, 0.4, mask)
  (_, got), got_g = _value_and_grads(impl, q, k, v, 0.4, mask)
  assert got.shape == want.shape and got.dtype == want.dtype
  np.testing.assert_allclose(got, want, atol=2e-5)
  for g, w in zip(got_g, want_g):
    np.testing.assert_allclose(g, w, atol=2e-5)


@pytest.mark.parametrize('impl', ['cudnn:xla', 'splash:interpret'])
@pytest.mark.parametrize('lq,lk', [(1, 1), (9, 14), (16, 30)])
@pytest.mark.slow
def test_fused_wrappers_match_xla_cached_step(impl, lq, lk):
  """KV-cached decoding: one scale's queries against the prefix, no mask."""
  q, k, v = qkv((2, lq, 2, 8), (2, lk, 2, 8), seed=lq)
  want = attention_lib.attention(q, k, v, scale=1.0, implementation='xla')
  got = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, scale=1.0, implementation=impl))(q, k, v)
  np.testing.assert_allclose(got, want, atol=2e-5)
  np.testing.assert_allclose(want, numpy_attention(q, k, v, 1.0, None), atol=1e-5)


@pytest.mark.parametrize('impl', ['cudnn:xla', 'splash:interpret'])
def test_fused_wrappers_bf16_within_tolerance(impl):
  """bfloat16 q/k/v (what the fused kernels run on): within bf16 rounding of the
  float64 result, like the xla path."""
  mask = block_causal_mask(PATCH_NUMS)
  q, k, v = qkv((2, 30, 2, 16), (2, 30, 2, 16), jnp.bfloat16, seed=3)
  exact = numpy_attention(q, k, v, 0.25, mask)
  for name in ('xla', impl):
    out = jax.jit(lambda q, k, v: attention_lib.attention(
        q, k, v, scale=0.25, mask_qk=mask, implementation=name))(q, k, v)
    assert out.dtype == jnp.bfloat16
    err = np.abs(np.asarray(out, np.float64) - exact).max()
    assert err < 2e-2, (name, err)


def test_splash_splits_the_batch_over_the_mesh():
  """Under jax.set_mesh the splash call runs inside shard_map over (data, fsdp)
  and still equals the xla path."""
  mask = block_causal_mask(PATCH_NUMS)
  q, k, v = qkv((8, 30, 2, 8), (8, 30, 2, 8), seed=5)
  want = attention_lib.attention(q, k, v, scale=1.0, mask_qk=mask, implementation='xla')
  mesh = jax.make_mesh((4, 2, 1), ('data', 'fsdp', 'tensor'))
  sh = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(('data', 'fsdp')))
  f = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, scale=1.0, mask_qk=mask,
                                                      implementation='splash:interpret'))
  with jax.set_mesh(mesh):
    args = [jax.device_put(x, sh) for x in (q, k, v)]
    assert 'manual_computation' in f.lower(*args).as_text()
    got = f(*args)
  np.testing.assert_allclose(got, want, atol=2e-5)


# --- the model with each implementation ----------------------------------------------------
TINY = VARConfig(num_classes=5, depth=2, embed_dim=32, num_heads=4, patch_nums=PATCH_NUMS)


@pytest.fixture(scope='module')
def tiny():
  params = jax.jit(lambda k: init_params(k, TINY, vocab_size=16, Cvae=4, init_adaln_gamma=0.5,
                                         init_head=1.0))(jax.random.key(1))
  labels = jnp.array([0, 3])
  x = jax.random.normal(jax.random.key(2), (2, TINY.L - 1, 4))
  return params, labels, x


def _decode_all(model, params, labels, x):
  cfg = model.config
  cond, ada = model.apply({'params': params}, labels, method=VAR.condition)
  cache = KVCache.zeros(cfg, labels.shape[0], model.dtype)
  outs = []
  for si, (b, e) in enumerate(cfg.begin_ends):
    if si == 0:
      tok = model.apply({'params': params}, cond, method=VAR.first_token_map)
    else:
      tok = model.apply({'params': params}, si, x[:, b - 1:e - 1], method=VAR.next_token_map)
    logits, cache = model.apply({'params': params}, si, tok, cond, ada, cache,
                                method=VAR.decode_scale)
    outs.append(logits)
  return jnp.concatenate(outs, 1), cache


@pytest.mark.parametrize('impl,scan', [('cudnn:xla', True), ('splash:interpret', False)])
@pytest.mark.slow
def test_model_uses_the_chosen_implementation(monkeypatch, tiny, impl, scan):
  """VAR routes teacher forcing and the KV-cached steps through the resolved
  implementation; both equal the xla model (float32)."""
  params, labels, x = tiny
  run = jax.jit(lambda m, p: (m.apply({'params': p}, labels, x), _decode_all(m, p, labels, x)[0]),
                static_argnums=0)
  want_tf, want_dec = run(VAR(TINY, 16, 4, attention='xla', scan_blocks=scan), params)
  np.testing.assert_allclose(want_dec, want_tf, atol=1e-4)
  monkeypatch.setattr(attention_lib, 'resolve', lambda name, dtype, platform=None: impl)
  calls = []
  real = attention_lib.attention
  monkeypatch.setattr(attention_lib, 'attention',
                      lambda *a, **kw: calls.append(kw['implementation']) or real(*a, **kw))
  got_tf, got_dec = run(VAR(TINY, 16, 4, attention='auto', scan_blocks=scan), params)
  assert set(calls) == {impl}
  np.testing.assert_allclose(got_tf, want_tf, atol=1e-4)
  np.testing.assert_allclose(got_dec, want_dec, atol=1e-4)


@pytest.mark.slow
def test_last_scale_keys_are_not_written(tiny):
  """decode_scale writes every scale's keys/values except the last one's."""
  params, labels, x = tiny
  for scan in (True, False):
    _, cache = jax.jit(lambda p: _decode_all(VAR(TINY, 16, 4, scan_blocks=scan), p, labels, x))(params)
    b, _ = TINY.begin_ends[-1]
    for buf in (cache.k, cache.v):
      assert np.all(np.abs(np.asarray(buf[:, :, :b])).max(axis=(0, 1, 3, 4)) > 0)
      assert not np.any(np.asarray(buf[:, :, b:]))


# --- remat ------------------------------------------------------------------------------
@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
@pytest.mark.slow
def test_remat_options_give_the_same_gradients(tiny, scan):
  """'block' and a checkpoint policy put the blocks under jax.checkpoint (a remat in
  the jaxpr; none without) and leave the gradients unchanged, in both block loops."""
  params, labels, x = tiny

  def grad_fn(remat):
    model = VAR(TINY, 16, 4, scan_blocks=scan, remat=remat)
    return jax.grad(lambda p: jnp.mean(jnp.square(model.apply({'params': p}, labels, x))))

  options = ('none', 'block', 'dots_saveable', 'dots_attention_saveable',
             'dots_inputs_attention_saveable')
  for remat in options:
    assert ('remat' in str(jax.make_jaxpr(grad_fn(remat))(params))) == (remat != 'none'), remat
  base, *others = jax.jit(lambda p: [grad_fn(r)(p) for r in options])(params)
  for other in others:
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5), other, base)


def _equations(jaxpr):
  """Every equation of a jaxpr and of the jaxprs in its equations' parameters."""
  for eqn in jaxpr.eqns:
    yield eqn
    for value in eqn.params.values():
      for sub in value if isinstance(value, (tuple, list)) else (value,):
        sub = getattr(sub, 'jaxpr', sub)           # ClosedJaxpr -> Jaxpr
        if hasattr(sub, 'eqns'):
          yield from _equations(sub)


def _count_in_grad_jaxpr(loss, params, primitive: str) -> int:
  """How many `primitive` equations the gradient of `loss` runs."""
  jaxpr = jax.make_jaxpr(jax.grad(loss))(params).jaxpr
  return sum(eqn.primitive.name == primitive for eqn in _equations(jaxpr))


@pytest.mark.parametrize('scan', [True, False], ids=['scan', 'unrolled'])
def test_dots_attention_saveable_keeps_the_splash_forward(monkeypatch, tiny, scan):
  """With 'dots_attention_saveable' the splash forward kernel (interpreted: the same
  pallas_call in the jaxpr) runs once per block in the gradient; with dots_saveable the
  backward pass reruns it. Per block: forward, dq and dkv kernels, + the rerun."""
  params, labels, x = tiny
  monkeypatch.setattr(attention_lib, 'resolve', lambda name, dtype, platform=None: 'splash:interpret')

  def count(remat):
    model = VAR(TINY, 16, 4, attention='auto', scan_blocks=scan, remat=remat)
    loss = lambda p: jnp.mean(jnp.square(model.apply({'params': p}, labels, x)))
    return _count_in_grad_jaxpr(loss, params, 'pallas_call')

  blocks = 1 if scan else TINY.depth       # the scanned body appears once in the jaxpr
  assert count('dots_saveable') == 4 * blocks
  assert count('block') == 4 * blocks
  assert count('dots_attention_saveable') == 3 * blocks
  assert count('attention_saveable') == 3 * blocks
  assert count('dots_inputs_attention_saveable') == 3 * blocks


def test_dots_attention_saveable_keeps_the_cudnn_forward(monkeypatch):
  """The policy recognises jax's cuDNN forward primitive by name: traced (not run) with
  the CPU's missing cuDNN faked, the gradient of a checkpointed block holds one cuDNN
  forward instead of two."""
  fused = pytest.importorskip('jax._src.cudnn.fused_attention_stablehlo')
  if not all(hasattr(fused, f) for f in ('check_cudnn_version', 'check_is_flash_attention')):
    pytest.skip("jax's cuDNN attention module changed its checks")
  monkeypatch.setattr(fused, 'check_cudnn_version', lambda: 91000)
  monkeypatch.setattr(fused, 'check_is_flash_attention', lambda *a, **k: None)
  B, L, H, c = 2, 30, 2, 64
  w_CC = jnp.zeros((H * c, H * c), jnp.bfloat16)
  x_BLC = jnp.zeros((B, L, H * c), jnp.bfloat16)
  mask = block_causal_mask(PATCH_NUMS)

  def count(remat):
    _, policy = remat_policy(remat)

    def block(w_CC):
      q = (x_BLC @ w_CC).reshape(B, L, H, c)
      out = attention_lib.attention(q, q, q, scale=1.0, mask_qk=mask, implementation='cudnn')
      return out.reshape(B, L, H * c) @ w_CC

    loss = lambda w: jax.checkpoint(block, policy=policy)(w).astype(jnp.float32).sum()
    return _count_in_grad_jaxpr(loss, w_CC, 'dot_product_attention_fwd_wrapper')

  assert count('dots_saveable') == 2
  assert count('dots_attention_saveable') == 1


def test_bad_remat_name_raises(tiny):
  params, labels, x = tiny
  with pytest.raises(ValueError, match='remat must be one of'):
    VAR(TINY, 16, 4, remat='everything').apply({'params': params}, labels, x)
