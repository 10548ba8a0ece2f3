"""The VAR transformer: next-scale prediction over a multi-scale token pyramid.

Reference: models/var.py (VAR) with the blocks of models/basic_var.py (see
blocks.py). Two entry points share one set of parameters:

  * `VAR.__call__(labels_B, x_BLCv_wo_first_l, train=False)`: teacher forcing
    over all L tokens with the block-causal mask (a token sees its own scale and
    every earlier one) -> logits (B, L, V) float32. train=True applies class
    dropout, drop path and dropout with the 'dropout' rng stream.
  * `VAR.decode_scale(si, x_BlC, cond_BD, ada, cache)`: the tokens of scale `si`
    through every block against a preallocated `KVCache` (written in place at
    the scale's static offset) -> (logits_BlV float32, cache). Used by
    var_jax.sampler together with `condition`, `first_token_map` and
    `next_token_map`.

Blocks: with `scan_blocks=True` (default) both entry points run the depth loop
as one `jax.lax.scan` over the block parameters stacked along a leading depth
axis (`stack_blocks`, done inside the traced function: the stored layout stays
blocks_0..blocks_{depth-1}, so converters and checkpoints do not change). Each
step applies one `AdaLNSelfAttn` with its own parameters; the drop-path rate is
scanned as data and each block gets its own dropout key. This compiles the block
once instead of `depth` times (per scale when sampling). `scan_blocks=False`
unrolls the loop with the same block step (same numbers, dropout masks included),
so training writes no stacked (depth, ...) activation or gradient buffers.
`remat='block'` (or a checkpoint policy such as 'dots_saveable') recomputes each
block's activations in the backward pass (jax.checkpoint) to save memory, in both
block loops.

Inputs and the head run in float32 (the reference disables autocast there and
casts to float before the head); the blocks run in `dtype`. With float32
compute, matmuls default to HIGHEST precision (no TF32 on GPUs) for parity.
Initialisation reproduces the reference `VAR.init_weights` (multipliers are
module fields); `init_params` is the plain-function form the trainer uses.
"""
from __future__ import annotations

import math
from typing import Any, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax.config import VARConfig
from var_jax.transformer import attention as attention_lib
from var_jax.transformer.blocks import (MATMUL_INPUT_NAMES, AdaLNBeforeHead, AdaLNSelfAttn, dense,
                                        param_with_axes, trunc_normal)

Dtype = Any


@flax.struct.dataclass
class KVCache:
  """Keys and values of every block for all L positions of the doubled batch.

  k, v: (depth, B2, L, H, head_dim) in the compute dtype (block i at [i]); scale
  si writes positions begin_ends[si] (all but the last scale, whose keys nothing
  reads) and reads [0, end). Shapes never change
  while decoding, so the cache lives in one buffer per array for the whole
  sample (updated in place by dynamic_update_slice, also inside the block scan).
  """
  k: jax.Array
  v: jax.Array

  @classmethod
  def zeros(cls, config: VARConfig, batch: int, dtype: Dtype = jnp.float32) -> 'KVCache':
    shape = (config.depth, batch, config.L, config.num_heads, config.head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype))

  @staticmethod
  def nbytes(config: VARConfig, batch: int, dtype: Dtype = jnp.float32) -> int:
    return 2 * config.depth * batch * config.L * config.embed_dim * jnp.dtype(dtype).itemsize


def level_index(patch_nums: Sequence[int]) -> np.ndarray:
  """(L,) scale index of every position (the reference's lvl_1L buffer)."""
  return np.concatenate([np.full(pn * pn, i, np.int32) for i, pn in enumerate(patch_nums)])


def block_causal_mask(patch_nums: Sequence[int]) -> np.ndarray:
  """(L, L) bool: query q may attend key k iff scale(k) <= scale(q)."""
  lvl = level_index(patch_nums)
  return lvl[:, None] >= lvl[None, :]


def drop_path_rates(config: VARConfig) -> Tuple[float, ...]:
  """Stochastic depth per block, linearly 0 .. drop_path_rate (torch.linspace in float32)."""
  return tuple(float(r) for r in np.linspace(0, config.drop_path_rate, config.depth, dtype=np.float32))


REMAT_NAMES = ('none', 'block', 'dots_saveable', 'dots_attention_saveable',
               'dots_inputs_attention_saveable', 'attention_saveable',
               'dots_with_no_batch_dims_saveable', 'checkpoint_dots',
               'checkpoint_dots_with_no_batch_dims', 'nothing_saveable', 'everything_saveable')


_both = jax.checkpoint_policies.save_from_both_policies
_dots_attention = _both(jax.checkpoint_policies.dots_saveable, attention_lib.attention_saveable)
_OWN_POLICIES = {    # made once: the policy object is part of the traced program
    'block': None,
    'attention_saveable': attention_lib.attention_saveable,
    'dots_attention_saveable': _dots_attention,
    'dots_inputs_attention_saveable': _both(
        _dots_attention, jax.checkpoint_policies.save_only_these_names(*MATMUL_INPUT_NAMES)),
}


def remat_policy(name: Any):
  """(use_remat, policy) for `VAR.remat`: 'none'; 'block' (keep only each block's input,
  recompute the rest in the backward pass); a jax.checkpoint_policies name such as
  'dots_saveable' (keep matmul outputs, recompute the elementwise work); or
  'dots_attention_saveable' / 'attention_saveable': dots_saveable / block that also keep
  the fused attention kernel's output and softmax statistics (attention.attention_saveable),
  so its forward kernel is not rerun in the backward pass (with the xla attention,
  dots_saveable already keeps its einsum outputs); 'dots_inputs_attention_saveable' also
  keeps the bf16 inputs of the qkv, fc1 and fc2 matmuls (the modulated LayerNorms and
  the GELU output), so only LayerNorm statistics and the q/k L2-norm are recomputed.
  True/False are accepted for 'block'/'none'.

  Compiled temporary memory of a d16 training gradient at batch 64, bfloat16, cuDNN
  attention, one H100 (benchmarks/remat_memory.py): none 70.1 GiB, dots_saveable 18.4
  GiB (as dots_with_no_batch_dims_saveable: the fused attention is no dot), block
  5.3 GiB; keeping the attention adds B*L*C*2 + B*H*L*4 bytes per block (d16 B64:
  1.4 GiB), the matmul inputs B*L*6C*2 bytes more (d16 B64: 8.3 GiB). What the
  forward keeps: benchmarks/remat_memory.py --residuals. With the xla attention the
  (B, H, L, L) probabilities dominate instead, and dots_saveable keeps them (they are
  dot outputs).
  """
  name = {True: 'block', False: 'none', None: 'none'}.get(name, name)
  if name not in REMAT_NAMES:
    raise ValueError(f'remat must be one of {REMAT_NAMES}, got {name!r}')
  if name == 'none':
    return False, None
  if name in _OWN_POLICIES:
    return True, _OWN_POLICIES[name]
  return True, getattr(jax.checkpoint_policies, name)


def stack_blocks(params, depth: int):
  """The per-block subtrees params['blocks_0'..] stacked along a new leading
  depth axis (the scanned layout; a copy made inside the traced function)."""
  return jax.tree.map(lambda *x: jnp.stack(x), *[params[f'blocks_{i}'] for i in range(depth)])


class VAR(nn.Module):
  config: VARConfig
  vocab_size: int
  Cvae: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  precision: Any = None               # None: HIGHEST for float32 compute, default otherwise
  attention: str = 'auto'            # auto | xla | cudnn | splash (var_jax.transformer.attention)
  init_std: float = -1.0              # < 0: sqrt(1 / C / 3) like the reference
  init_adaln: float = 0.5
  init_adaln_gamma: float = 1e-5
  init_head: float = 0.02
  scan_blocks: bool = True            # lax.scan over stacked blocks (False: unrolled loop)
  remat: Any = 'none'                 # none | block | a checkpoint policy name (see remat_policy)

  @property
  def _precision(self):
    if self.precision is not None:
      return self.precision
    return jax.lax.Precision.HIGHEST if jnp.dtype(self.dtype) == jnp.float32 else None

  @property
  def _attention(self) -> str:
    return attention_lib.resolve(self.attention, self.dtype)

  def setup(self):
    cfg, C = self.config, self.config.embed_dim
    emb_std = math.sqrt(1 / C / 3)
    std = self.init_std if self.init_std >= 0 else emb_std
    f32 = dict(dtype=jnp.float32, param_dtype=self.param_dtype, precision=self._precision)
    self.word_embed = dense(C, ('cvae', 'embed'), kernel_init=trunc_normal(std), **f32)
    self.class_emb = nn.Embed(
        cfg.num_classes + 1, C, dtype=jnp.float32, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(trunc_normal(std), ('classes', 'embed')))
    self.pos_start = param_with_axes(self, 'pos_start', trunc_normal(emb_std), (1, cfg.first_l, C),
                                     (None, 'seq', 'embed'), self.param_dtype)
    self.pos_1LC = param_with_axes(self, 'pos_1LC', trunc_normal(emb_std), (1, cfg.L, C),
                                   (None, 'seq', 'embed'), self.param_dtype)
    self.lvl_embed = nn.Embed(
        len(cfg.patch_nums), C, dtype=jnp.float32, param_dtype=self.param_dtype,
        embedding_init=nn.with_logical_partitioning(trunc_normal(std), ('levels', 'embed')))
    if cfg.shared_aln:
      self.shared_ada_lin_1 = dense(6 * C, ('cond', 'adaln'), kernel_init=trunc_normal(std), **f32)
    dpr = drop_path_rates(cfg)
    self.blocks = [AdaLNSelfAttn(**self._block_fields(), drop_path=dpr[i]) for i in range(cfg.depth)]
    self.head_nm = AdaLNBeforeHead(C, cfg.norm_eps, init_std=std, init_adaln=self.init_adaln, **f32)
    self.head = dense(self.vocab_size, ('embed', 'vocab'),
                      kernel_init=trunc_normal(std, self.init_head), **f32)

  def _block_fields(self):
    cfg, C = self.config, self.config.embed_dim
    std = self.init_std if self.init_std >= 0 else math.sqrt(1 / C / 3)
    return dict(
        embed_dim=C, num_heads=cfg.num_heads, mlp_hidden=cfg.mlp_hidden, norm_eps=cfg.norm_eps,
        shared_aln=cfg.shared_aln, l2_norm=cfg.attn_l2_norm, attn_scale=cfg.attn_scale,
        max_scale_mul=cfg.max_scale_mul, drop=cfg.drop_rate, attn_drop=cfg.attn_drop_rate,
        depth=cfg.depth, init_std=std, init_adaln=self.init_adaln,
        init_adaln_gamma=self.init_adaln_gamma, attention=self._attention,
        dtype=self.dtype, param_dtype=self.param_dtype, precision=self._precision)

  def _use_scan(self) -> bool:
    # init must run the unrolled blocks to create blocks_0.. params
    return self.scan_blocks and not self.is_initializing()

  def _block_step(self, *, mask_LL=None, begin=0, train=False, remat='none', prevent_cse=False):
    """step(x, kv, (params, ada, index, drop-path rate, dropout key)) -> (x, kv): one block
    applied with explicit parameters (a detached AdaLNSelfAttn), under jax.checkpoint when
    `remat` asks for it. The scanned and the unrolled block loops share it, so both give
    the same numbers, dropout and drop-path masks included."""
    block = AdaLNSelfAttn(**self._block_fields(), drop_path=0.0, parent=None)

    def step(x, kv, xs):
      p, ada_i, i, rate, key = xs
      return block.apply({'params': p}, x, ada_i, mask_LL=mask_LL, kv=kv, begin=begin,
                         layer=None if kv is None else i, deterministic=not train,
                         drop_path_rate=rate, rngs=None if key is None else {'dropout': key})

    use_remat, policy = remat_policy(remat)
    if use_remat:
      step = jax.checkpoint(step, prevent_cse=prevent_cse, policy=policy)
    return step

  def _per_block_data(self, train: bool):
    """(drop-path rates (depth,) f32 or None, dropout keys (depth,) or None)."""
    if not train:
      return None, None
    keys = jax.random.split(self.make_rng('dropout'), self.config.depth)
    rates = None
    if self.config.drop_path_rate > 0:
      rates = jnp.asarray(drop_path_rates(self.config), jnp.float32)
    return rates, keys

  def _scan_blocks(self, x_BLC, ada, *, stacked=None, mask_LL=None, cache=None, begin=0,
                   train=False, remat='none'):
    """All blocks as one lax.scan over stacked parameters -> (x_BLC, cache or None).

    The carry is (x, cache k, cache v): the (depth, ...) cache buffers are
    updated in place at [i, :, begin] by each step. xs: block params, AdaLN
    modulation, block index, drop-path rate and dropout key of each block.
    """
    depth = self.config.depth
    if stacked is None:
      stacked = stack_blocks(self.variables['params'], depth)
    ada = jnp.stack(ada) if isinstance(ada, (tuple, list)) else ada
    rates, keys = self._per_block_data(train)
    step = self._block_step(mask_LL=mask_LL, begin=begin, train=train, remat=remat)

    def body(carry, xs):
      x, kv = carry
      x, kv = step(x, kv, xs)
      return (x, kv), None

    kv0 = None if cache is None else (cache.k, cache.v)
    xs = (stacked, ada, jnp.arange(depth, dtype=jnp.int32), rates, keys)
    (x_BLC, kv), _ = jax.lax.scan(body, (x_BLC, kv0), xs)
    return x_BLC, (None if kv is None else KVCache(k=kv[0], v=kv[1]))

  def _unrolled_blocks(self, x_BLC, ada, *, mask_LL, train: bool):
    """Teacher forcing through blocks_0.. one after another: the scanned loop's step on
    each block's own parameters (no stacked copies of parameters, activations or
    gradients; same numbers as the scan). At init, the bound blocks create the params."""
    if self.is_initializing():
      for block, ada_B16C in zip(self.blocks, ada):
        x_BLC = block(x_BLC, ada_B16C, mask_LL=mask_LL, deterministic=not train)[0]
      return x_BLC
    rates, keys = self._per_block_data(train)
    step = self._block_step(mask_LL=mask_LL, train=train, remat=self.remat, prevent_cse=True)
    params = self.variables['params']
    for i in range(self.config.depth):
      xs = (params[f'blocks_{i}'], ada[i], i, None if rates is None else rates[i],
            None if keys is None else keys[i])
      x_BLC, _ = step(x_BLC, None, xs)
    return x_BLC

  # --- pieces shared by teacher forcing and decoding ------------------------------
  def condition(self, labels_B: jax.Array):
    """Class embedding (B, C) f32 and the per-block AdaLN modulations ((B,1,6,C) each)."""
    cond_BD = self.class_emb(labels_B)
    gss = cond_BD
    if self.config.shared_aln:
      gss = self.shared_ada_lin_1(nn.silu(cond_BD)).reshape(-1, 1, 6, self.config.embed_dim)
    return cond_BD, tuple(b.ada(gss) for b in self.blocks)

  def lvl_pos(self, begin: int, end: int) -> jax.Array:
    """(1, end-begin, C) level + absolute position embedding of positions [begin, end)."""
    lvl = jnp.asarray(level_index(self.config.patch_nums)[begin:end])
    return self.lvl_embed(lvl)[None] + self.pos_1LC[:, begin:end].astype(jnp.float32)

  def first_token_map(self, cond_BD: jax.Array) -> jax.Array:
    """Scale 0 input: class embedding + pos_start + lvl/pos, (B, first_l, C) f32."""
    first_l = self.config.first_l
    return (cond_BD[:, None] + self.pos_start.astype(jnp.float32)) + self.lvl_pos(0, first_l)

  def next_token_map(self, si: int, x_BlCv: jax.Array) -> jax.Array:
    """Scale si >= 1 input: word_embed(VQVAE features) + lvl/pos, (B, pn_si^2, C) f32."""
    begin, end = self.config.begin_ends[si]
    return self.word_embed(x_BlCv.astype(jnp.float32)) + self.lvl_pos(begin, end)

  def get_logits(self, x_BLC: jax.Array, cond_BD: jax.Array) -> jax.Array:
    """Head AdaLN on the raw class embedding, then the Linear head, all float32."""
    return self.head(self.head_nm(x_BLC.astype(jnp.float32), cond_BD)).astype(jnp.float32)

  # --- entry points ---------------------------------------------------------------
  def __call__(self, labels_B: jax.Array, x_BLCv_wo_first_l: jax.Array, train: bool = False):
    cfg = self.config
    B = x_BLCv_wo_first_l.shape[0]
    if x_BLCv_wo_first_l.shape[1:] != (cfg.L - cfg.first_l, self.Cvae):
      raise ValueError(f'x_BLCv_wo_first_l must be (B, {cfg.L - cfg.first_l}, {self.Cvae}), '
                       f'got {x_BLCv_wo_first_l.shape}')
    labels_B = jnp.asarray(labels_B, jnp.int32)
    if train and cfg.cond_drop_rate > 0:
      drop = jax.random.uniform(self.make_rng('dropout'), (B,)) < cfg.cond_drop_rate
      labels_B = jnp.where(drop, cfg.num_classes, labels_B)
    cond_BD, ada = self.condition(labels_B)
    sos = cond_BD[:, None] + self.pos_start.astype(jnp.float32)
    words = self.word_embed(x_BLCv_wo_first_l.astype(jnp.float32))
    x_BLC = jnp.concatenate([jnp.broadcast_to(sos, (B,) + sos.shape[1:]), words], axis=1)
    x_BLC = (x_BLC + self.lvl_pos(0, cfg.L)).astype(self.dtype)
    mask_LL = block_causal_mask(cfg.patch_nums)
    if self._use_scan():
      x_BLC, _ = self._scan_blocks(x_BLC, ada, mask_LL=mask_LL, train=train, remat=self.remat)
    else:
      x_BLC = self._unrolled_blocks(x_BLC, ada, mask_LL=mask_LL, train=train)
    return self.get_logits(x_BLC, cond_BD)

  def decode_scale(self, si: int, x_BlC: jax.Array, cond_BD: jax.Array, ada, cache: KVCache,
                   stacked=None):
    """Scale si's tokens through every block with the KV cache (no mask needed:
    they see all earlier scales and each other) -> (logits_BlV f32, new cache).

    ada: the per-block modulations from `condition` (a tuple, or stacked
    (depth, B, 1, 6, C)). stacked: optionally `stack_blocks(params, depth)`
    computed once by the caller (the sampler) instead of at every scale.
    """
    begin, end = self.config.begin_ends[si]
    if x_BlC.shape[1] != end - begin:
      raise ValueError(f'scale {si} has {end - begin} tokens, got {x_BlC.shape[1]}')
    x = x_BlC.astype(self.dtype)
    if self._use_scan():
      x, cache = self._scan_blocks(x, ada, stacked=stacked, cache=cache, begin=begin)
    else:
      kv = (cache.k, cache.v)
      for i, block in enumerate(self.blocks):
        x, kv = block(x, ada[i], kv=kv, begin=begin, layer=i)
      cache = KVCache(k=kv[0], v=kv[1])
    return self.get_logits(x, cond_BD), cache


# --- plain-function helpers -----------------------------------------------------
def dummy_inputs(config: VARConfig, Cvae: int, batch: int = 1):
  return (jnp.zeros((batch,), jnp.int32), jnp.zeros((batch, config.L - config.first_l, Cvae), jnp.float32))


def init_params(rng: jax.Array, config: VARConfig, vocab_size: int, Cvae: int, *,
                init_std: float = -1.0, init_adaln: float = 0.5, init_adaln_gamma: float = 1e-5,
                init_head: float = 0.02, param_dtype: Dtype = jnp.float32, boxed: bool = False):
  """Reference-initialised parameters (`VAR.init_weights` with these multipliers).

  boxed=True keeps the nn.LogicallyPartitioned boxes (for sharding rules); wrap in
  jax.eval_shape for abstract shapes or in jax.jit(out_shardings=...) to create
  them sharded.
  """
  model = VAR(config, vocab_size, Cvae, param_dtype=param_dtype, init_std=init_std,
              init_adaln=init_adaln, init_adaln_gamma=init_adaln_gamma, init_head=init_head)
  params = model.init({'params': rng}, *dummy_inputs(config, Cvae))['params']
  return params if boxed else nn.meta.unbox(params)
