"""Scaled dot-product attention for the VAR blocks, with an explicit kernel choice.

    impl = resolve('auto', jnp.bfloat16)          # -> 'cudnn' on NVIDIA GPUs, ...
    out_BqHc = attention(q_BqHc, k_BkHc, v_BkHc, scale=s, mask_qk=mask, implementation=impl)

Implementations (`VAR.attention`, `model.attention` in the training configs):
  xla     explicit einsums at the given precision with a float32 softmax: the
          float32 parity path, and the only one that supports attention dropout.
  cudnn   fused flash attention through jax.nn.dot_product_attention (NVIDIA GPUs,
          bfloat16/float16). The block-causal mask goes in as a (1, 1, q, k)
          boolean mask (jax turns it into an additive bias); cuDNN trains with a
          bias only on even lengths, so odd lengths are padded by one.
  splash  Pallas splash attention with a block-sparse mask (TPUs); both lengths
          padded to the 128-row block.
  auto    cudnn on NVIDIA GPUs and splash on TPUs for 16-bit compute, xla otherwise.
The choice is resolved when the model is built (the caller logs `resolve`'s
answer); a choice the platform cannot run is an error naming the alternative
(never a silent fallback). Measured on one H100 (benchmarks/attention_bench.py,
B64 H16 L680 c64 bf16, forward+backward): xla 8.70 ms and 4.41 GiB temporary,
cudnn 2.57 ms and 0.25 GiB; the ten KV-cached steps of a d16 batch-64 sample
(guidance doubles it): xla 4.34 ms, cudnn 1.17 ms.

The same function serves teacher forcing (all L tokens, block-causal mask) and
KV-cached decoding (one scale's queries against the cached prefix, no mask).
Padding never changes the result: padded keys are masked out, padded query rows
(which see every real key, so no softmax row is empty) are dropped.

Under jax.checkpoint the fused kernels' forward outputs (the attention output and
its softmax statistics, which their backward kernels read) are kept by the
`attention_saveable` policy (`VAR.remat='dots_attention_saveable'`); jax's
'dots_saveable' does not count them as dots and reruns the forward kernel in the
backward pass (on the d16 training step: 16 extra cuDNN forward calls, ~10.6 ms).

Test-only names that `attention` also accepts: 'cudnn:xla' runs the cudnn
branch (padding, mask, scale) with jax.nn's XLA kernel, and 'splash:interpret'
runs the splash kernel in the Pallas interpreter; both work on a CPU.
"""
from __future__ import annotations

import functools
import logging
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np

log = logging.getLogger('var_jax')

IMPLEMENTATIONS = ('auto', 'xla', 'cudnn', 'splash')
SPLASH_BLOCK = 128
BATCH_MESH_AXES = ('data', 'fsdp')     # var_jax.parallel: activations' batch axis


def _platform() -> str:
  return jax.devices()[0].platform


def resolve(name: str, dtype: Any, platform: Optional[str] = None) -> str:
  """The concrete implementation for `name` on `platform` (default: jax's first device)."""
  if name not in IMPLEMENTATIONS:
    raise ValueError(f'attention must be one of {IMPLEMENTATIONS}, got {name!r}')
  platform = platform or _platform()
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if name == 'auto':
    if half and platform in ('gpu', 'cuda'):
      return 'cudnn'
    if half and platform == 'tpu':
      return 'splash'
    return 'xla'
  if name == 'cudnn' and platform not in ('gpu', 'cuda'):
    raise ValueError(f"attention='cudnn' needs an NVIDIA GPU (this is {platform}); use 'xla'")
  if name == 'cudnn' and not half:
    raise ValueError("attention='cudnn' needs bfloat16/float16 compute; use 'xla' for float32")
  if name == 'splash' and platform != 'tpu':
    raise ValueError(f"attention='splash' needs a TPU (this is {platform}); use 'xla'")
  return name


# Primitives whose outputs are the fused kernels' forward results: jax's cuDNN wrapper
# ('dot_product_attention_fwd_wrapper') and Pallas calls (splash's forward; the model
# runs no other Pallas kernel). Names of jax internals, checked by tests/test_attention.py.
FUSED_FORWARD_PRIMITIVES = ('dot_product_attention_fwd', 'pallas_call')


def attention_saveable(prim, *_, **__) -> bool:
  """jax.checkpoint policy: keep the outputs of a fused attention forward kernel
  (output + softmax statistics: B*L*C + B*H*L values per block) instead of rerunning
  it in the backward pass. Combine with others by
  jax.checkpoint_policies.save_from_both_policies."""
  return prim.name.startswith(FUSED_FORWARD_PRIMITIVES)


def attention(q_BqHc: jax.Array, k_BkHc: jax.Array, v_BkHc: jax.Array, *, scale: float,
              mask_qk: Optional[np.ndarray] = None, precision=None,
              dropout: Optional[Callable[[jax.Array], jax.Array]] = None,
              implementation: str = 'xla') -> jax.Array:
  """softmax(scale * q k^T [masked]) v over heads; returns (B, q, H, c) in v's dtype.

  `mask_qk` (q, k) numpy bool, True = may attend (static: the fused kernels plan
  their blocks from it). `implementation` is a resolved name (see `resolve`);
  attention dropout always takes the xla path.
  """
  if mask_qk is not None:
    mask_qk = np.asarray(mask_qk, bool)
  kernel, _, variant = implementation.partition(':')
  if dropout is None and kernel == 'cudnn':
    return dot_product_attention(q_BqHc, k_BkHc, v_BkHc, scale=scale, mask_qk=mask_qk,
                                 implementation=variant or 'cudnn')
  if dropout is None and kernel == 'splash':
    return splash_attention(q_BqHc, k_BkHc, v_BkHc, scale=scale, mask_qk=mask_qk,
                            interpret=variant == 'interpret')
  if kernel not in ('xla', 'cudnn', 'splash'):
    raise ValueError(f'unknown attention implementation {implementation!r}')
  return xla_attention(q_BqHc, k_BkHc, v_BkHc, scale=scale, mask_qk=mask_qk,
                       precision=precision, dropout=dropout)


def xla_attention(q_BqHc, k_BkHc, v_BkHc, *, scale, mask_qk=None, precision=None, dropout=None):
  """The float32 parity path: explicit logits (B, H, q, k) in float32."""
  logits_BHqk = jnp.einsum('bqhc,bkhc->bhqk', q_BqHc, k_BkHc, precision=precision,
                           preferred_element_type=jnp.float32) * scale
  if mask_qk is not None:
    logits_BHqk = jnp.where(jnp.asarray(mask_qk), logits_BHqk, -jnp.inf)
  probs_BHqk = jax.nn.softmax(logits_BHqk, axis=-1)
  if dropout is not None:
    probs_BHqk = dropout(probs_BHqk)
  out = jnp.einsum('bhqk,bkhc->bqhc', probs_BHqk.astype(v_BkHc.dtype), v_BkHc, precision=precision,
                   preferred_element_type=jnp.float32)
  return out.astype(v_BkHc.dtype)


# --- padding (shared by the fused kernels) ------------------------------------------
def round_up(n: int, multiple: int) -> int:
  return -(-n // multiple) * multiple


def padded_mask(mask_qk: Optional[np.ndarray], lq: int, lk: int, lq_pad: int,
                lk_pad: int) -> np.ndarray:
  """(lq_pad, lk_pad) bool: `mask_qk` (None: all True) top-left; padded keys are never
  visible; padded query rows see every real key (no empty softmax row; dropped later)."""
  out = np.zeros((lq_pad, lk_pad), bool)
  out[:lq, :lk] = True if mask_qk is None else mask_qk
  out[lq:, :lk] = True
  return out


def _pad_len(x_BLHc: jax.Array, length: int) -> jax.Array:
  extra = length - x_BLHc.shape[1]
  return x_BLHc if extra == 0 else jnp.pad(x_BLHc, ((0, 0), (0, extra), (0, 0), (0, 0)))


# --- cuDNN (jax.nn.dot_product_attention) -------------------------------------------
def dot_product_attention(q_BqHc, k_BkHc, v_BkHc, *, scale: float,
                          mask_qk: Optional[np.ndarray] = None,
                          implementation: str = 'cudnn') -> jax.Array:
  """jax.nn.dot_product_attention in the layout and padding the cuDNN kernel takes.

  q, k, v (B, len, H, c) in one 16-bit dtype (cuDNN: bf16/fp16, head_dim a multiple
  of 8 up to 128/256); `scale` a Python float (the per-head L2-norm scale is folded
  into q by the caller). With a mask, odd lengths are padded to even (cuDNN's
  training kernels with a bias need it). implementation='xla' computes the same
  function with jax's reference kernel (CPU tests of this wrapper).
  """
  lq, lk = q_BqHc.shape[1], k_BkHc.shape[1]
  mask = None
  if mask_qk is not None:
    lq_pad, lk_pad = round_up(lq, 2), round_up(lk, 2)
    if (lq_pad, lk_pad) != (lq, lk):
      mask_qk = padded_mask(mask_qk, lq, lk, lq_pad, lk_pad)
      q_BqHc, k_BkHc, v_BkHc = (_pad_len(q_BqHc, lq_pad), _pad_len(k_BkHc, lk_pad),
                                _pad_len(v_BkHc, lk_pad))
    mask = jnp.asarray(mask_qk)[None, None]
  out = jax.nn.dot_product_attention(q_BqHc, k_BkHc, v_BkHc, mask=mask, scale=float(scale),
                                     implementation=implementation)
  return out[:, :lq]


# --- Pallas splash attention (TPU) --------------------------------------------------
@functools.lru_cache(maxsize=32)
def _splash_kernel(mask_bytes: bytes, lq_pad: int, lk_pad: int, heads: int, interpret: bool):
  from jax.experimental.pallas.ops.tpu import splash_attention as sa
  mask = np.frombuffer(mask_bytes, np.bool_).reshape(lq_pad, lk_pad)
  b = SPLASH_BLOCK
  sizes = sa.BlockSizes(block_q=b, block_kv=b, block_kv_compute=b, block_q_dkv=b,
                        block_kv_dkv=b, block_kv_dkv_compute=b, block_q_dq=b, block_kv_dq=b)
  multi = sa.MultiHeadMask([sa.NumpyMask(mask)] * heads)
  with jax.ensure_compile_time_eval():     # concrete mask tables, safe to cache across traces
    return sa.make_splash_mha(multi, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)


def _batch_axes(mesh) -> tuple:
  """Mesh axes (of BATCH_MESH_AXES) the batch is split over, () without a mesh."""
  if mesh is None or mesh.empty:
    return ()
  return tuple(a for a in BATCH_MESH_AXES if a in mesh.axis_names and mesh.shape[a] > 1)


def splash_attention(q_BqHc, k_BkHc, v_BkHc, *, scale: float,
                     mask_qk: Optional[np.ndarray] = None, interpret: bool = False) -> jax.Array:
  """Pallas splash attention: lengths padded to SPLASH_BLOCK, the static mask planned
  into block-sparse form (fully masked blocks skipped), `scale` folded into q (the
  kernel has none), one kernel call per example (vmap). Under a mesh (jax.set_mesh)
  the batch is split over its data/fsdp axes by shard_map (a Pallas call is not
  partitioned by XLA); heads are not split."""
  B, lq, H, _ = q_BqHc.shape
  lk = k_BkHc.shape[1]
  lq_pad, lk_pad = round_up(lq, SPLASH_BLOCK), round_up(lk, SPLASH_BLOCK)
  mask = padded_mask(mask_qk, lq, lk, lq_pad, lk_pad)
  kernel = _splash_kernel(mask.tobytes(), lq_pad, lk_pad, H, bool(interpret))
  if scale != 1.0:
    q_BqHc = (q_BqHc.astype(jnp.float32) * scale).astype(q_BqHc.dtype)
  to_BHLc = lambda x, n: _pad_len(x, n).transpose(0, 2, 1, 3)
  q, k, v = to_BHLc(q_BqHc, lq_pad), to_BHLc(k_BkHc, lk_pad), to_BHLc(v_BkHc, lk_pad)

  def run(q, k, v):
    return jax.vmap(kernel)(q, k, v)

  axes = _batch_axes(jax.sharding.get_abstract_mesh())
  if axes:
    spec = jax.sharding.PartitionSpec(axes)
    run = jax.shard_map(run, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
  out_BHqc = run(q, k, v)
  return out_BHqc.transpose(0, 2, 1, 3)[:, :lq].astype(v_BkHc.dtype)
