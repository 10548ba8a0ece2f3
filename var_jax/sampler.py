"""Class-conditional sampling with classifier-free guidance (reference
`VAR.autoregressive_infer_cfg`), as ONE jit-compiled program for all scales.

    s = Sampler(config, top_k=900, use_top_p=True, dtype=jnp.bfloat16)
    var_ready = s.prepare(var_params)             # once: blocks cast and stacked
    images, tokens = s(vae_params, var_ready, labels_B, cfg, top_p, key)

    images, tokens = sample(config, vae_params, var_params, labels, cfg=1.5, top_k=900,
                            top_p=0.96, seed=0)   # the same, validated, in one call

`Sampler` is a frozen, hashable dataclass of the static options; its call is
`jax.jit` with the sampler itself static, so one compiled program exists per
(options, shapes) and nothing else is cached. The traced arguments:
  vae_params    VQVAE params (unboxed)
  var_params    VAR params: as stored (cast/stacked inside the program, once per
                call), or `Sampler.prepare`d (ready: no cast or stack in the program)
  labels_B      (B,) int32 in [0, num_classes)
  cfg           guidance scale; scale k uses t = cfg * k / (K - 1)
  top_p         nucleus in [0, 1) (used when use_top_p)
  key           a jax.random key; scale k draws with fold_in(key, k), so the
                draws never depend on the device count
  keep          None (sampling), or `Keep` (the hook for zero-shot editing, see there)
`Sampler.edit(vae_params, var_params, images, mask_Bhw, labels_B, cfg, top_p, key)` is
the same program with the Keep built inside it from images and a token-resolution mask
(var_jax.edit has the validated one-call form).
Returns images NHWC float32 in [0, 1] (f_hat (B, h, w, Cvae) with decode=False)
and tokens (a list of int32 (B, pn_k^2)); with return_logits also {'guided',
'cond', 'uncond'}: per scale (B, pn_k^2, V) float32 logits.

Static options: top_k (0 or >= V: no cut; ties at the k-th value survive),
use_top_p, more_smooth (the reference's Gumbel-softmax mix of the codebook for
the features; the tokens are still the draws), dtype (compute dtype of the
transformer blocks and the VQVAE decoder; the head, the logits and the draws
stay float32), mesh (the batch is split over ('data', 'fsdp'), params follow
parallel.LOGICAL_RULES; B must divide evenly), return_logits, decode, scan_blocks
(the blocks as one lax.scan over stacked params, or unrolled: same numbers,
unrolled compiles slower) and attention (var_jax.transformer.attention).

Design: the loop over the K scales is unrolled at trace time (each scale has its
own static shape); what changes from one scale to the next travels in a
`LoopState` (next input, f_hat, KV cache). The KV cache (one (depth, 2B, L, H, c)
buffer for k and one for v) is allocated inside the program and written in place,
so nothing goes to the host between scales. The guidance batch interleaves each
sample with its unconditional twin (rows 2b, 2b+1) instead of the reference's
[labels, uncond] halves: rows are independent, so the numbers are the same, and
a batch shard holds both rows the guidance combines.
"""
from __future__ import annotations

import dataclasses
import functools
import numbers
from typing import Any, Optional, Sequence, Tuple

import flax
import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from var_jax import parallel
from var_jax.config import ModelConfig
from var_jax.ops.resize import bilinear_resize
from var_jax.ops.top_k_top_p import effective_top_k, top_k_top_p_filter
from var_jax.sampling_args import BATCH_AXES, check_sampling_args, compute_dtype
from var_jax.sampling_args import SamplingArgs, check_labels  # noqa: F401  (re-exported)
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.transformer.model import VAR, KVCache, dummy_inputs

ADALN = ('ada_lin_1', 'ada_gss')        # what VAR.condition reads of each block
KEEP_FLOAT32 = ('scale_mul_1H11',)      # block params the blocks read in float32 whatever the dtype


# --- loop state and the editing hook -----------------------------------------------
@flax.struct.dataclass
class LoopState:
  """What changes from one scale to the next."""
  x_2BlC: jax.Array     # this scale's input on the guidance batch, float32
  f_hat: jax.Array      # (B, h, w, Cvae) float32: the features accumulated so far
  cache: KVCache


@flax.struct.dataclass
class Keep:
  """Tokens to keep, per scale (zero-shot editing; sampling is 'keep nothing').

  tokens[k], mask[k]: (B, pn_k^2) int32 / bool. After the draw at scale k the
  positions where mask[k] holds take tokens[k] (with more_smooth their features
  are the kept codes' embeddings), before f_hat and scale k+1's input are built.
  """
  tokens: Tuple[jax.Array, ...]
  mask: Tuple[jax.Array, ...]

  @classmethod
  def from_mask(cls, tokens: Sequence[jax.Array], mask_Bhw: jax.Array,
                patch_nums: Sequence[int]) -> 'Keep':
    """Keep `tokens` where `keep_masks(mask_Bhw, patch_nums)` holds (the reference's rule)."""
    return cls(tuple(tokens), keep_masks(mask_Bhw, patch_nums))


def keep_masks(mask_Bhw: jax.Array, patch_nums: Sequence[int]) -> Tuple[jax.Array, ...]:
  """Per-scale keep masks, bool (B, pn_k^2), from a (B, h, w) mask at the last scale's
  resolution (1 = keep): the mask resized to pn_k x pn_k by bilinear interpolation
  (align_corners=False, no antialiasing: ops.resize.bilinear_matrix), then `> 0.5`
  (exactly 0.5 is not kept); a scale of at most 3 tokens keeps every position (the
  reference's demo_zero_shot_edit.ipynb)."""
  B = mask_Bhw.shape[0]
  m_BhwC = mask_Bhw.astype(jnp.float32)[..., None]
  out = []
  for pn in patch_nums:
    if pn * pn <= 3:
      out.append(jnp.ones((B, pn * pn), bool))
    else:
      out.append((bilinear_resize(m_BhwC, (pn, pn)) > 0.5).reshape(B, pn * pn))
  return tuple(out)


# --- parameters ready for the program ----------------------------------------------
@flax.struct.dataclass
class ReadyVAR:
  """VAR params ready for a Sampler (`Sampler.prepare`): every block weight already
  in the compute dtype, and with scan_blocks the block trunks (attention, FFN)
  stacked on a leading depth axis; `params` then keeps of each block only its AdaLN
  projection (read once per call by VAR.condition). The rest is as stored."""
  params: Any
  stacked: Any = None
  dtype: str = flax.struct.field(pytree_node=False, default='float32')


def _cast(tree, dtype):
  def leaf(path, x):
    if jnp.issubdtype(x.dtype, jnp.floating) and str(path[-1].key) not in KEEP_FLOAT32:
      return x.astype(dtype)
    return x
  return jax.tree_util.tree_map_with_path(leaf, tree)


def _split_blocks(var_params, depth: int, scan_blocks: bool, stack):
  """(params with blocks_i reduced to what VAR.condition reads, stacked trunks) when
  scan_blocks, else (var_params, None). Works on param and sharding trees alike."""
  if not scan_blocks:
    return dict(var_params), None
  out = {k: v for k, v in var_params.items() if not k.startswith('blocks_')}
  blocks = [var_params[f'blocks_{i}'] for i in range(depth)]
  out.update({f'blocks_{i}': {k: v for k, v in b.items() if k in ADALN} for i, b in enumerate(blocks)})
  trunks = [{k: v for k, v in b.items() if k not in ADALN or k == 'ada_gss'} for b in blocks]
  return out, stack(trunks)


# --- the sampler ------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Sampler:
  """The static options of one sampling program (see the module docstring)."""
  config: ModelConfig
  top_k: int = 900
  use_top_p: bool = True
  more_smooth: bool = False
  dtype: Any = jnp.float32
  mesh: Optional[Mesh] = None
  return_logits: bool = False
  decode: bool = True
  scan_blocks: bool = True
  attention: str = 'auto'

  def __post_init__(self):
    if self.config.var is None:
      raise ValueError('config has no VAR section: sampling needs a transformer')
    if isinstance(self.top_k, bool) or int(self.top_k) != self.top_k or self.top_k < 0:
      raise ValueError(f'top_k must be an integer >= 0, got {self.top_k!r}')
    set_ = functools.partial(object.__setattr__, self)
    set_('top_k', effective_top_k(self.top_k, self.config.vae.vocab_size))
    set_('dtype', jnp.dtype(compute_dtype(self.dtype)))
    for f in ('use_top_p', 'more_smooth', 'return_logits', 'decode', 'scan_blocks'):
      set_(f, bool(getattr(self, f)))

  # --- modules and parameters -----------------------------------------------------
  def models(self) -> Tuple[VAR, VQVAE]:
    hi = jax.lax.Precision.HIGHEST if self.dtype == jnp.float32 else None
    var = VAR(self.config.var, self.config.vae.vocab_size, self.config.vae.Cvae, dtype=self.dtype,
              scan_blocks=self.scan_blocks, attention=self.attention)
    return var, VQVAE(self.config.vae, dtype=self.dtype, precision=hi)

  def prepare(self, var_params) -> ReadyVAR:
    """VAR params (as stored) made ready for this sampler, once: see ReadyVAR. The
    compiled program then holds no cast or stack of block weights."""
    if isinstance(var_params, ReadyVAR):
      return self._ready(var_params)
    out_sh = None if self.mesh is None else self.param_shardings(ready=True)[1]
    return jax.jit(self._prepare, out_shardings=out_sh)(var_params)

  def _prepare(self, var_params) -> ReadyVAR:
    blocks = {k: _cast(v, self.dtype) for k, v in var_params.items() if k.startswith('blocks_')}
    params, stacked = _split_blocks({**var_params, **blocks}, self.config.var.depth,
                                    self.scan_blocks, lambda t: jax.tree.map(_stack, *t))
    return ReadyVAR(params, stacked, self.dtype.name)

  def _ready(self, var_params) -> ReadyVAR:
    if not isinstance(var_params, ReadyVAR):
      return self._prepare(var_params)          # inside the program: once per call
    layout = var_params.stacked is not None
    if var_params.dtype != self.dtype.name or layout != self.scan_blocks:
      raise ValueError(f'var_params were prepared for {var_params.dtype} with scan_blocks={layout}; '
                       f'this sampler runs {self.dtype.name} with scan_blocks={self.scan_blocks}')
    return var_params

  def param_shardings(self, ready: bool = False):
    """(vae, var) NamedSharding trees on the mesh; var as stored, or as a ReadyVAR."""
    vae_sh, var_sh = _param_shardings(self.config, self.mesh)
    if not ready:
      return vae_sh, var_sh
    mesh = self.mesh
    stack = lambda t: jax.tree.map(lambda s: NamedSharding(mesh, P(None, *s.spec)), t[0])
    params, stacked = _split_blocks(var_sh, self.config.var.depth, self.scan_blocks, stack)
    return vae_sh, ReadyVAR(params, stacked, self.dtype.name)

  # --- calling ----------------------------------------------------------------------
  def __call__(self, vae_params, var_params, labels_B, cfg, top_p, key, keep: Optional[Keep] = None):
    return self._run(*self._place(vae_params, var_params, labels_B, cfg, top_p, key, keep))

  def lower(self, vae_params, var_params, labels_B, cfg, top_p, key, keep: Optional[Keep] = None):
    """The jitted program lowered for these arguments (`.compile()`, `.as_text()`)."""
    return Sampler._run.lower(self, *self._place(vae_params, var_params, labels_B, cfg, top_p, key, keep))

  def _place(self, vae_params, var_params, labels_B, cfg, top_p, key, keep):
    labels_B, cfg, top_p = jnp.asarray(labels_B, jnp.int32), jnp.float32(cfg), jnp.float32(top_p)
    if self.mesh is None:
      return vae_params, var_params, labels_B, cfg, top_p, key, keep
    vae_sh, var_sh = self.param_shardings(ready=isinstance(var_params, ReadyVAR))
    rep = NamedSharding(self.mesh, P())
    vae_params, var_params = jax.device_put((vae_params, var_params), (vae_sh, var_sh))
    labels_B = jax.device_put(labels_B, _batch_spec(self.mesh, 1))
    cfg, top_p, key = jax.device_put((cfg, top_p, key), rep)
    if keep is not None:
      keep = jax.tree.map(lambda a: jax.device_put(a, _batch_spec(self.mesh, a.ndim)), keep)
    return vae_params, var_params, labels_B, cfg, top_p, key, keep

  def edit(self, vae_params, var_params, images_BHWC, mask_Bhw, labels_B, cfg, top_p, key):
    """Zero-shot editing in one program: the images' token maps (VQVAE.img_to_idx) are
    kept where Keep.from_mask(tokens, mask_Bhw) holds, the rest is sampled as by __call__.
    mask_Bhw: float (B, h, w) at the last scale's resolution, 1 = keep; labels_B may hold
    num_classes (the unconditional class: plain in-/out-painting)."""
    placed = self._place(vae_params, var_params, labels_B, cfg, top_p, key,
                         (jnp.asarray(images_BHWC, jnp.float32), jnp.asarray(mask_Bhw, jnp.float32)))
    return self._run_edit(*placed)

  @functools.partial(jax.jit, static_argnums=0)
  def _run_edit(self, vae_params, var_params, labels_B, cfg, top_p, key, image_and_mask):
    images_BHWC, mask_Bhw = image_and_mask
    _, vae = self.models()
    tokens = vae.apply({'params': vae_params}, images_BHWC, method=VQVAE.img_to_idx)
    keep = Keep.from_mask(tokens, mask_Bhw, self.config.var.patch_nums)
    return self._run(vae_params, var_params, labels_B, cfg, top_p, key, keep)

  @functools.partial(jax.jit, static_argnums=0)
  def _run(self, vae_params, var_params, labels_B, cfg, top_p, key, keep):
    var, vae = self.models()
    vcfg, mesh = self.config.var, self.mesh
    B, N = labels_B.shape[0], vcfg.num_classes
    ready = self._ready(var_params)
    stacked, pv = ready.stacked, {'params': ready.params}
    qv = {'params': vae_params}

    labels_2B = jnp.stack([labels_B, jnp.full_like(labels_B, N)], axis=1).reshape(2 * B)
    cond_2BD, ada = var.apply(pv, labels_2B, method=VAR.condition)
    if stacked is not None:
      ada = jnp.stack(ada)
    hw = vcfg.patch_nums[-1]
    state = LoopState(
        x_2BlC=var.apply(pv, cond_2BD, method=VAR.first_token_map),
        f_hat=_constrain(jnp.zeros((B, hw, hw, self.config.vae.Cvae), jnp.float32), mesh),
        cache=_constrain_cache(KVCache.zeros(vcfg, 2 * B, self.dtype), mesh))
    step = functools.partial(self._scale, var=var, vae=vae, pv=pv, qv=qv, cond_2BD=cond_2BD,
                             ada=ada, stacked=stacked, cfg=cfg, top_p=top_p, key=key, keep=keep)
    tokens, logs = [], {'guided': [], 'cond': [], 'uncond': []}
    for si in range(len(vcfg.patch_nums)):
      state, idx_Bl, scale_logs = step(si, state)
      tokens.append(idx_Bl)
      for name, value in scale_logs.items():
        logs[name].append(value)
    images = state.f_hat
    if self.decode:
      img = vae.apply(qv, state.f_hat, method=VQVAE.decode_fhat)
      images = _constrain((img + 1) * 0.5, mesh)
    return (images, tokens, logs) if self.return_logits else (images, tokens)

  def _scale(self, si: int, st: LoopState, *, var, vae, pv, qv, cond_2BD, ada, stacked, cfg,
             top_p, key, keep: Optional[Keep]):
    """Scale si: logits with guidance, token choice, features -> (state, tokens, logs)."""
    K, pn = len(self.config.var.patch_nums), self.config.var.patch_nums[si]
    B, V = st.f_hat.shape[0], self.config.vae.vocab_size
    ratio = si / (K - 1) if K > 1 else 0.0
    logits_2BlV, cache = var.apply(pv, si, st.x_2BlC, cond_2BD, ada, st.cache, stacked,
                                   method=VAR.decode_scale)
    pair = logits_2BlV.reshape(B, 2, pn * pn, V)
    t = cfg * ratio
    logits_BlV = (1 + t) * pair[:, 0] - t * pair[:, 1]
    k_draw, k_gumbel = jax.random.split(jax.random.fold_in(key, si))
    filtered_BlV = top_k_top_p_filter(logits_BlV, self.top_k, top_p if self.use_top_p else None)
    idx_Bl = jax.random.categorical(k_draw, filtered_BlV, axis=-1).astype(jnp.int32)
    if keep is not None:
      idx_Bl = jnp.where(keep.mask[si], keep.tokens[si], idx_Bl)
    idx_Bl = _constrain(idx_Bl, self.mesh)
    if self.more_smooth:
      codebook = qv['params']['quantize']['embedding']['embedding']
      h_BlCv = gumbel_soft_codes(k_gumbel, filtered_BlV, ratio, codebook)
      if keep is not None:
        kept = vae.apply(qv, keep.tokens[si], method=VQVAE.embed_tokens)
        h_BlCv = jnp.where(keep.mask[si][..., None], kept, h_BlCv)
    else:
      h_BlCv = vae.apply(qv, idx_Bl, method=VQVAE.embed_tokens)
    f_hat, nxt_BlCv = vae.apply(qv, si, st.f_hat, h_BlCv, method=VQVAE.next_ar_input)
    x_2BlC = st.x_2BlC
    if nxt_BlCv is not None:
      x_BlC = var.apply(pv, si + 1, nxt_BlCv, method=VAR.next_token_map)
      x_2BlC = _constrain(jnp.repeat(x_BlC, 2, axis=0), self.mesh)
    logs = {}
    if self.return_logits:
      logs = {'guided': logits_BlV, 'cond': pair[:, 0], 'uncond': pair[:, 1]}
    return LoopState(x_2BlC=x_2BlC, f_hat=f_hat, cache=cache), idx_Bl, logs


def gumbel_soft_codes(key, logits_BlV, ratio: float, codebook_VC: jax.Array) -> jax.Array:
  """more_smooth: softmax((logits * (1 + ratio) + gumbel) / tau) @ codebook, tau
  = max(0.27 * (1 - 0.95 ratio), 0.005) (reference gumbel_softmax_with_rng, soft)."""
  tau = max(0.27 * (1 - ratio * 0.95), 0.005)
  g = jax.random.gumbel(key, logits_BlV.shape, jnp.float32)
  soft = jax.nn.softmax((logits_BlV * (1 + ratio) + g) / tau, axis=-1)
  return jnp.einsum('blv,vc->blc', soft, codebook_VC.astype(jnp.float32),
                    precision=jax.lax.Precision.HIGHEST)


# --- sharding helpers -------------------------------------------------------------
def _stack(*x):
  return jnp.stack(x)


def _batch_spec(mesh: Optional[Mesh], ndim: int):
  return None if mesh is None else NamedSharding(mesh, P(BATCH_AXES, *([None] * (ndim - 1))))


def _constrain(x, mesh):
  return x if mesh is None else jax.lax.with_sharding_constraint(x, _batch_spec(mesh, x.ndim))


def _constrain_cache(cache: KVCache, mesh):
  """(depth, 2B, L, H, c) buffers: split over the batch (axis 1)."""
  if mesh is None:
    return cache
  spec = NamedSharding(mesh, P(None, BATCH_AXES, None, None, None))
  return jax.tree.map(lambda a: jax.lax.with_sharding_constraint(a, spec), cache)


@functools.lru_cache(maxsize=8)
def _param_shardings(config: ModelConfig, mesh: Mesh):
  """(vae, var) NamedSharding trees from the logical axis names of every parameter."""
  var = VAR(config.var, config.vae.vocab_size, config.vae.Cvae)
  vae = VQVAE(config.vae)
  img = jnp.zeros((1, config.image_size, config.image_size, config.vae.in_channels))
  vae_abs = jax.eval_shape(lambda: vae.init({'params': jax.random.key(0)}, img)['params'])
  var_abs = jax.eval_shape(lambda: var.init({'params': jax.random.key(0)},
                                            *dummy_inputs(config.var, config.vae.Cvae))['params'])
  return (parallel.logical_shardings(vae_abs, mesh), parallel.logical_shardings(var_abs, mesh))


# --- the one-call form ------------------------------------------------------------
def seed_key(seed: Any) -> jax.Array:
  """The draws' key from `seed`: an integer (Python, numpy or a 0-d integer array) in
  the int64 range, or one jax.random key (typed, or a legacy uint32 (2,) PRNGKey)."""
  if isinstance(seed, (jax.Array, np.ndarray)):
    if jax.dtypes.issubdtype(seed.dtype, jax.dtypes.prng_key):
      if seed.shape != ():
        raise ValueError(f'seed must be one jax.random key, got a key array of shape {seed.shape}')
      return seed
    if seed.dtype == np.uint32 and seed.shape == (2,):
      return jnp.asarray(seed)                                 # jax.random.PRNGKey(n)
  integer = isinstance(seed, numbers.Integral) or (
      np.ndim(seed) == 0 and np.issubdtype(getattr(seed, 'dtype', object), np.integer))
  if isinstance(seed, bool) or not integer or not -2**63 <= int(seed) < 2**63:
    raise ValueError(f'seed must be an integer in [-2**63, 2**63) or one jax.random key, got '
                     f'{seed!r}')
  return jax.random.key(int(seed))


def sample(config: ModelConfig, vae_params, var_params, labels: Sequence[int], *, cfg: float = 1.5,
           top_k: int = 900, top_p: float = 0.96, seed: Any = 0, more_smooth: bool = False,
           dtype: Any = jnp.float32, mesh: Optional[Mesh] = None, return_logits: bool = False,
           scan_blocks: bool = True, attention: str = 'auto'):
  """Validates the arguments (check_sampling_args), builds the Sampler and calls it.
  seed: an int or a jax.random key (seed_key). See the module docstring for the rest."""
  args = check_sampling_args(cfg, top_k, top_p, labels=labels, config=config, mesh=mesh)
  s = Sampler(config, top_k=args.top_k, use_top_p=args.top_p > 0, more_smooth=more_smooth,
              dtype=dtype, mesh=mesh, return_logits=return_logits, scan_blocks=scan_blocks,
              attention=attention)
  return s(vae_params, var_params, args.labels, args.cfg, args.top_p, seed_key(seed))
