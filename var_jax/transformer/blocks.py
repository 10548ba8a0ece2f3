"""Building blocks of the VAR transformer (reference models/basic_var.py).

`AdaLNSelfAttn` is one transformer block whose LayerNorms are modulated by the
class condition (AdaLN); `AdaLNBeforeHead` is the same modulation before the
output head. Module and parameter names follow the reference state dict through
var_jax.convert.naming (e.g. `blocks_0/attn/mat_qkv/kernel`); raw parameters
(`q_bias`, `scale_mul_1H11`, `ada_gss`) keep the torch name and shape.

Initialisers reproduce the reference `VAR.init_weights`: truncated normal with
torch's absolute bounds [-2, 2], zero biases, multipliers passed in by the parent.
Numerics: statistics, softmax and the L2 norm run in float32 whatever the compute
dtype; the residual stream is kept in the compute dtype like the reference under
autocast. The inputs of the qkv, fc1 and fc2 matmuls carry checkpoint names
(MATMUL_INPUT_NAMES: identities outside jax.checkpoint) for the remat policy that keeps
them (model.remat_policy).
"""
from __future__ import annotations

from typing import Any, Callable, Optional, Sequence, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn
from jax.ad_checkpoint import checkpoint_name

from var_jax.transformer import attention as attention_lib

Dtype = Any
Initializer = Callable[..., jax.Array]
KV = Tuple[jax.Array, jax.Array]


MATMUL_INPUT_NAMES = ('attn_in', 'ffn_in', 'ffn_act')   # see AdaLNSelfAttn, FFN


# --- initialisers ---------------------------------------------------------------
def trunc_normal(std: float, mult: float = 1.0) -> Initializer:
  """torch.nn.init.trunc_normal_(std=std) (cut at absolute +-2), times `mult`."""
  def init(key, shape, dtype=jnp.float32):
    lim = 2.0 / std
    x = jax.random.truncated_normal(key, -lim, lim, shape, jnp.float32) * std
    return (x * mult).astype(dtype)
  return init


def column_scaled(base: Initializer, split: int, mult_lo: float, mult_hi: float) -> Initializer:
  """`base`, with output columns [:split] times mult_lo and the rest times mult_hi."""
  def init(key, shape, dtype=jnp.float32):
    w = base(key, shape, jnp.float32)
    mult = jnp.where(jnp.arange(shape[-1]) < split, mult_lo, mult_hi)
    return (w * mult).astype(dtype)
  return init


def constant(value: float) -> Initializer:
  def init(key, shape, dtype=jnp.float32):
    del key
    return jnp.full(shape, value, dtype)
  return init


def param_with_axes(module: nn.Module, name: str, init: Initializer, shape: Sequence[int],
                    axes: Sequence[Optional[str]], dtype: Dtype) -> jax.Array:
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


def dense(features: int, axes: Tuple[str, str], name: Optional[str] = None, *,
          kernel_init: Initializer,
          use_bias: bool = True, dtype: Dtype = jnp.float32, param_dtype: Dtype = jnp.float32,
          precision=None) -> nn.Dense:
  """nn.Dense with logical axis names on kernel (in, out) and bias (out,); zero bias."""
  return nn.Dense(
      features, use_bias=use_bias, dtype=dtype, param_dtype=param_dtype, precision=precision,
      kernel_init=nn.with_logical_partitioning(kernel_init, axes),
      bias_init=nn.with_logical_partitioning(nn.initializers.zeros_init(), (axes[1],)),
      name=name)


# --- functional pieces ----------------------------------------------------------
def layer_norm(x: jax.Array, eps: float) -> jax.Array:
  """LayerNorm without affine parameters; statistics in float32, result in x.dtype."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
  """torch F.normalize(x, dim=-1): x / max(|x|, eps), in float32."""
  x32 = x.astype(jnp.float32)
  norm = jnp.sqrt(jnp.sum(jnp.square(x32), -1, keepdims=True))
  return x32 / jnp.maximum(norm, eps)


def drop_path(module: nn.Module, x_BLC: jax.Array, rate, deterministic: bool) -> jax.Array:
  """Stochastic depth per sample (timm's drop_path with scale_by_keep).

  `rate` is a Python float (0 skips the op) or a traced scalar (the scanned
  blocks get their per-block rate as data; rate 0 then keeps every sample).
  """
  if deterministic or (isinstance(rate, (int, float)) and rate == 0.0):
    return x_BLC
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng('dropout'), keep, (x_BLC.shape[0],) + (1,) * (x_BLC.ndim - 1))
  return jnp.where(mask, x_BLC / keep, 0).astype(x_BLC.dtype)


def _cache_write_read(kv: KV, k_BlHc: jax.Array, v_BlHc: jax.Array, begin: int, layer=None):
  """Write this scale's keys/values at position `begin` of the cache; return the
  keys/values of [0, begin + l) (the cached [0, begin) joined with the new ones).
  layer=None: per-block (B, L, H, c) cache; else a (depth, B, L, H, c) cache indexed
  at `layer` (static or traced). The write is a dynamic_update_slice on the whole
  buffer, so XLA updates it in place. Keys/values that end the cache (the last
  scale) are not written: nothing reads them again.
  """
  B, l, H, c = k_BlHc.shape
  write = begin + l < kv[0].shape[-3]
  zero = jnp.zeros((), jnp.int32)
  out = []
  for cache, new in zip(kv, (k_BlHc, v_BlHc)):
    new = new.astype(cache.dtype)
    # Write first, then read the prefix back from the updated buffer: reading the old
    # prefix before an in-place write of the same buffer makes XLA copy the whole cache.
    if layer is None:
      if write:
        cache = jax.lax.dynamic_update_slice(cache, new, (0, begin, 0, 0))
        out.append((cache, cache[:, :begin + l]))
      else:
        out.append((cache, jnp.concatenate([cache[:, :begin], new], axis=1)))
    else:
      idx = jnp.asarray(layer, jnp.int32)
      if write:
        cache = jax.lax.dynamic_update_slice(cache, new[None], (idx, zero, jnp.int32(begin), zero, zero))
        prefix = jax.lax.dynamic_slice(cache, (idx, zero, zero, zero, zero), (1, B, begin + l, H, c))[0]
      else:
        old = jax.lax.dynamic_slice(cache, (idx, zero, zero, zero, zero), (1, B, begin, H, c))[0]
        prefix = jnp.concatenate([old, new], axis=1)
      out.append((cache, prefix))
  (k_cache, k), (v_cache, v) = out
  return (k_cache, v_cache), k, v


# --- modules --------------------------------------------------------------------
class SelfAttention(nn.Module):
  """Multi-head self-attention with a bias-free qkv Linear plus q/v biases (k bias 0).

  With l2_norm, q and k are L2-normalised and q is multiplied per head by
  exp(min(scale_mul_1H11, max_scale_mul)); the softmax scale is `scale` (1 then,
  0.25/sqrt(head_dim) otherwise). With `kv` (a (k, v) cache of shape
  (B, L, H, c)) the new keys/values are written at [begin, begin+l) (unless they
  end the cache) and the queries attend to positions [0, begin+l) (no mask), as in
  KV-cached decoding, through the same attention implementation as training.
  With `layer` (int or traced index) the cache holds every block, (depth, B, L,
  H, c), and only this block's slice is written/read, in place.
  """
  embed_dim: int
  num_heads: int
  l2_norm: bool
  scale: float
  max_scale_mul: float
  attn_drop: float = 0.0
  proj_drop: float = 0.0
  proj_std: float = 0.02
  init_std: float = 0.02
  attention: str = 'xla'            # a resolved name, see var_jax.transformer.attention
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x_BLC, *, mask_LL=None, kv: Optional[KV] = None, begin: int = 0,
               layer=None, deterministic: bool = True):
    B, L, C = x_BLC.shape
    H, c = self.num_heads, C // self.num_heads
    qkv = dense(3 * C, ('embed', 'qkv'), 'mat_qkv', kernel_init=trunc_normal(self.init_std),
                use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype,
                precision=self.precision)(x_BLC)
    zeros = nn.initializers.zeros_init()
    q_bias = param_with_axes(self, 'q_bias', zeros, (C,), ('qkv',), self.param_dtype)
    v_bias = param_with_axes(self, 'v_bias', zeros, (C,), ('qkv',), self.param_dtype)
    bias = jnp.concatenate([q_bias, jnp.zeros_like(q_bias), v_bias]).astype(qkv.dtype)
    q, k, v = jnp.split((qkv + bias).reshape(B, L, 3, H, c), 3, axis=2)
    q, k, v = q[:, :, 0], k[:, :, 0], v[:, :, 0]        # BLHc
    if self.l2_norm:
      scale_mul_1H11 = param_with_axes(self, 'scale_mul_1H11', constant(float(np.log(4.0))),
                                       (1, H, 1, 1), (None, 'heads', None, None), self.param_dtype)
      mul_H1 = jnp.exp(jnp.minimum(scale_mul_1H11.astype(jnp.float32).reshape(H, 1),
                                   jnp.float32(self.max_scale_mul)))
      q = (l2_normalize(q) * mul_H1).astype(self.dtype)
      k = l2_normalize(k).astype(self.dtype)
    if kv is not None:
      kv, k, v = _cache_write_read(kv, k, v, begin, layer)
      k, v = k.astype(self.dtype), v.astype(self.dtype)
    drop = None
    if self.attn_drop > 0 and not deterministic:
      drop = nn.Dropout(self.attn_drop, deterministic=False)
    out = attention_lib.attention(q, k, v, scale=self.scale, mask_qk=mask_LL,
                                  precision=self.precision, dropout=drop,
                                  implementation=self.attention).reshape(B, L, C)
    out = dense(C, ('heads', 'embed'), 'proj', kernel_init=trunc_normal(self.proj_std),
                dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)(out)
    if self.proj_drop > 0:
      out = nn.Dropout(self.proj_drop)(out, deterministic=deterministic)
    return out, kv


class FFN(nn.Module):
  """fc1 -> tanh-approximated GELU -> fc2 (-> dropout)."""
  hidden: int
  drop: float = 0.0
  init_std: float = 0.02
  fc2_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x_BLC, deterministic: bool = True):
    C = x_BLC.shape[-1]
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    h = dense(self.hidden, ('embed', 'mlp'), 'fc1', kernel_init=trunc_normal(self.init_std), **kw)(x_BLC)
    h = checkpoint_name(jax.nn.gelu(h, approximate=True), 'ffn_act')   # fc2's input
    out = dense(C, ('mlp', 'embed'), 'fc2', kernel_init=trunc_normal(self.fc2_std), **kw)(h)
    if self.drop > 0:
      out = nn.Dropout(self.drop)(out, deterministic=deterministic)
    return out


class AdaLNSelfAttn(nn.Module):
  """One VAR block: x += g1 * attn(LN(x)(1+s1)+b1); x += g2 * ffn(LN(x)(1+s2)+b2).

  The six modulation vectors (gamma1, gamma2, scale1, scale2, shift1, shift2) come
  from this block's `ada_lin_1` on SiLU(cond), or, with shared_aln, from the
  shared projection (given as (B,1,6,C)) plus this block's `ada_gss`.
  """
  embed_dim: int
  num_heads: int
  mlp_hidden: int
  norm_eps: float
  shared_aln: bool
  l2_norm: bool
  attn_scale: float
  max_scale_mul: float
  drop: float = 0.0
  attn_drop: float = 0.0
  drop_path: float = 0.0
  depth: int = 1
  init_std: float = 0.02
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  attention: str = 'xla'
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  def setup(self):
    C = self.embed_dim
    out_std = self.init_std / np.sqrt(2 * self.depth)
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype, precision=self.precision)
    self.attn = SelfAttention(C, self.num_heads, self.l2_norm, self.attn_scale, self.max_scale_mul,
                              attn_drop=self.attn_drop, proj_drop=self.drop, proj_std=out_std,
                              init_std=self.init_std, attention=self.attention, **kw)
    self.ffn = FFN(self.mlp_hidden, drop=self.drop, init_std=self.init_std, fc2_std=out_std, **kw)
    if self.shared_aln:
      def gss_init(key, shape, dtype=jnp.float32):
        w = jax.random.normal(key, shape, jnp.float32) / np.sqrt(C)
        mult = jnp.where(jnp.arange(6) < 2, self.init_adaln_gamma, self.init_adaln)[:, None]
        return (w * mult).astype(dtype)
      self.ada_gss = param_with_axes(self, 'ada_gss', gss_init, (1, 1, 6, C),
                                     (None, None, None, 'embed'), self.param_dtype)
    else:
      self.ada_lin_1 = dense(   # named by the attribute (setup)
          6 * C, ('cond', 'adaln'),
          kernel_init=column_scaled(trunc_normal(self.init_std), 2 * C, self.init_adaln_gamma,
                                    self.init_adaln), **kw)

  def ada(self, cond_BD: jax.Array) -> jax.Array:
    """(B,1,6,C) modulation; cond_BD is the class embedding, or with shared_aln the
    shared projection already viewed as (B,1,6,C)."""
    if self.shared_aln:
      return self.ada_gss.astype(self.dtype) + cond_BD.astype(self.dtype)
    out = self.ada_lin_1(nn.silu(cond_BD.astype(self.dtype)))
    return out.reshape(cond_BD.shape[0], 1, 6, self.embed_dim)

  def __call__(self, x_BLC, ada_B16C, *, mask_LL=None, kv: Optional[KV] = None, begin: int = 0,
               layer=None, deterministic: bool = True, drop_path_rate=None):
    """-> (x_BLC, kv). `layer` indexes a stacked (depth, ...) cache (see
    SelfAttention); `drop_path_rate` (float or traced scalar) overrides the
    `drop_path` field (the scanned blocks pass their rate as data)."""
    rate = self.drop_path if drop_path_rate is None else drop_path_rate
    g1, g2, s1, s2, b1, b2 = [ada_B16C[:, :, i] for i in range(6)]     # each B1C
    h = checkpoint_name(layer_norm(x_BLC, self.norm_eps) * (1 + s1) + b1, 'attn_in')
    h, kv = self.attn(h, mask_LL=mask_LL, kv=kv, begin=begin, layer=layer,
                      deterministic=deterministic)
    x_BLC = x_BLC + drop_path(self, h * g1, rate, deterministic)
    h = checkpoint_name(layer_norm(x_BLC, self.norm_eps) * (1 + s2) + b2, 'ffn_in')
    h = self.ffn(h, deterministic=deterministic)
    x_BLC = x_BLC + drop_path(self, h * g2, rate, deterministic)
    # Keep activations split over the batch under FSDP (a no-op without logical rules):
    # without it XLA gathers them with the weights (d16 b64 fsdp=8: 158 -> 25 GiB/device).
    return nn.with_logical_constraint(x_BLC, ('batch', None, None)), kv


class AdaLNBeforeHead(nn.Module):
  """LN(x) * (1 + scale) + shift with (scale, shift) from ada_lin_1(SiLU(cond))."""
  embed_dim: int
  norm_eps: float
  init_std: float = 0.02
  init_adaln: float = 0.5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None

  @nn.compact
  def __call__(self, x_BLC, cond_BD):
    C = self.embed_dim
    ss = dense(2 * C, ('cond', 'adaln'), 'ada_lin_1',
               kernel_init=trunc_normal(self.init_std, self.init_adaln), dtype=self.dtype,
               param_dtype=self.param_dtype, precision=self.precision)(nn.silu(cond_BD))
    ss = ss.reshape(-1, 1, 2, C)
    return layer_norm(x_BLC, self.norm_eps) * (1 + ss[:, :, 0]) + ss[:, :, 1]
