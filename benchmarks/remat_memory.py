"""Compiled memory of one VAR training gradient per remat option (no allocation).

  python benchmarks/remat_memory.py --depth 16 --batch 8 16 --remat none block dots_saveable
  python benchmarks/remat_memory.py --attention cudnn      # on a GPU: the fused kernel
  python benchmarks/remat_memory.py --residuals --attention cudnn --fake-cudnn --batch 64 \
      --remat dots_saveable dots_attention_saveable       # what the forward keeps, any host

Lowers and compiles value_and_grad of the training loss (label-smoothed CE over
float32 logits, logits kept for the token statistics like var_jax.train.var_step)
on abstract float32 parameters with bfloat16 compute, and prints XLA's
memory_analysis(): temp bytes (activations kept for the backward pass and
scratch), argument and output bytes, and the size of one (B, L, V) float32 logits
tensor for comparison. Nothing is allocated, so d16/d30 fit any host.

Measured 2026-11-23, d16, bfloat16, scanned blocks (temp GiB; one (B, L, V) float32
logits tensor is 0.083 / 0.166 / 0.664 GiB at batch 8 / 16 / 64):
  remat                             CPU xla B8   CPU xla B16   H100 cudnn B64
  none                                 24.1         46.8          70.1
  block                                 3.3          5.1           5.3
  dots_saveable                        10.0         18.6          18.4
  dots_with_no_batch_dims_saveable      6.2         11.0          18.4
On a CPU the unrolled blocks gain nothing from remat (B8: 21.0 / 21.1 / 21.1 GiB):
its scheduler runs the recomputation early; on a GPU jax.checkpoint does cut the
peak of an unrolled stack (576 -> 176 MiB on a toy 8-layer MLP).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time

import jax
import jax.numpy as jnp

GiB = 2 ** 30


def measure(depth: int, batch: int, remat: str, attention: str, scan: bool, dtype: str,
            vocab: int = 4096, cvae: int = 32) -> dict:
  from flax import linen as nn
  from var_jax.config import VARConfig
  from var_jax.transformer.model import VAR, dummy_inputs
  cfg = VARConfig.for_depth(depth)
  model = VAR(cfg, vocab, cvae, dtype=jnp.dtype(dtype), attention=attention, remat=remat,
              scan_blocks=scan)
  params = jax.eval_shape(lambda: nn.meta.unbox(
      model.init({'params': jax.random.key(0)}, *dummy_inputs(cfg, cvae))['params']))
  labels = jax.ShapeDtypeStruct((batch,), jnp.int32)
  x = jax.ShapeDtypeStruct((batch, cfg.L - cfg.first_l, cvae), jnp.float32)
  gt = jax.ShapeDtypeStruct((batch, cfg.L), jnp.int32)

  def grad_fn(p, labels, x, gt, rng):
    def loss_fn(p):
      logits = model.apply({'params': p}, labels, x, train=True, rngs={'dropout': rng})
      logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, gt[..., None], axis=-1)[..., 0]
      nll = 0.9 * nll - 0.1 * logp.mean(axis=-1)
      return nll.mean(), logits
    (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(p)
    return loss, grads, jnp.mean(jnp.argmax(logits, -1) == gt)

  t0 = time.perf_counter()
  compiled = jax.jit(grad_fn).lower(params, labels, x, gt, jax.random.key(0)).compile()
  mem = compiled.memory_analysis()
  return {
      'device': jax.devices()[0].device_kind, 'depth': depth, 'batch': batch, 'remat': remat,
      'attention': attention, 'scan': scan, 'dtype': dtype,
      'temp_GiB': round(mem.temp_size_in_bytes / GiB, 3),
      'argument_GiB': round(mem.argument_size_in_bytes / GiB, 3),
      'output_GiB': round(mem.output_size_in_bytes / GiB, 3),
      'logits_BLV_f32_GiB': round(batch * cfg.L * vocab * 4 / GiB, 3),
      'compile_s': round(time.perf_counter() - t0, 1),
  }


def saved_residuals(depth: int, batch: int, remat: str, attention: str, scan: bool, dtype: str,
                    vocab: int = 4096, cvae: int = 32) -> dict:
  """Bytes of the residuals the forward pass keeps for the backward pass (jax's
  saved_residuals on the traced training forward; nothing is compiled or allocated)."""
  from flax import linen as nn
  from jax._src.ad_checkpoint import saved_residuals as jax_saved_residuals
  from var_jax.config import VARConfig
  from var_jax.transformer.model import VAR, dummy_inputs
  cfg = VARConfig.for_depth(depth)
  params = jax.eval_shape(lambda: nn.meta.unbox(VAR(cfg, vocab, cvae).init(
      {'params': jax.random.key(0)}, *dummy_inputs(cfg, cvae))['params']))
  model = VAR(cfg, vocab, cvae, dtype=jnp.dtype(dtype), attention=attention, remat=remat,
              scan_blocks=scan)
  labels = jnp.zeros((batch,), jnp.int32)
  x = jnp.zeros((batch, cfg.L - cfg.first_l, cvae), jnp.float32)
  forward = lambda p: model.apply({'params': p}, labels, x, train=True,
                                  rngs={'dropout': jax.random.key(1)})
  res = jax_saved_residuals(forward, params)
  nbytes = sum(math.prod(a.shape) * a.dtype.itemsize for a, _ in res)
  return {'depth': depth, 'batch': batch, 'remat': remat, 'attention': attention,
          'residuals': len(res), 'saved_GiB': round(nbytes / GiB, 3)}


def fake_cudnn_for_tracing():
  """Lets a CPU trace (never run) the cuDNN attention: jax's checks for the library and
  the GPU answer as on an H100 with cuDNN 9.10 (the trick tests/test_attention.py uses)."""
  import jax._src.cudnn.fused_attention_stablehlo as fused
  from var_jax.transformer import attention as attention_lib
  fused.check_cudnn_version = lambda: 91000
  fused.check_is_flash_attention = lambda *a, **k: None
  resolve = attention_lib.resolve
  attention_lib.resolve = lambda name, dtype, platform=None: resolve(name, dtype, platform='gpu')


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--depth', type=int, default=16)
  ap.add_argument('--batch', type=int, nargs='+', default=[8, 16])
  ap.add_argument('--remat', nargs='+', default=['none', 'block', 'dots_saveable',
                                                 'dots_attention_saveable',
                                                 'dots_inputs_attention_saveable',
                                                 'dots_with_no_batch_dims_saveable'])
  ap.add_argument('--attention', default='xla', help='auto | xla | cudnn | splash')
  ap.add_argument('--unrolled', action='store_true', help='unrolled blocks (default: scanned)')
  ap.add_argument('--dtype', default='bfloat16')
  ap.add_argument('--json', default='', help='append each result as one JSON line to this file')
  ap.add_argument('--residuals', action='store_true',
                  help='print the bytes the forward keeps for the backward pass (trace only)')
  ap.add_argument('--fake-cudnn', action='store_true',
                  help='with --residuals on a CPU: trace the cuDNN attention as on a GPU')
  args = ap.parse_args(argv)
  if args.residuals:
    if args.fake_cudnn:
      fake_cudnn_for_tracing()
    for batch in args.batch:
      for remat in args.remat:
        r = saved_residuals(args.depth, batch, remat, args.attention, not args.unrolled, args.dtype)
        print(json.dumps(r), flush=True)
    return 0
  print(f"{'batch':>5} {'remat':<34} {'temp GiB':>9} {'args GiB':>9} {'logits GiB':>10} {'compile s':>9}")
  for batch in args.batch:
    for remat in args.remat:
      r = measure(args.depth, batch, remat, args.attention, not args.unrolled, args.dtype)
      print(f"{batch:>5} {remat:<34} {r['temp_GiB']:>9.3f} {r['argument_GiB']:>9.3f} "
            f"{r['logits_BLV_f32_GiB']:>10.3f} {r['compile_s']:>9.1f}", flush=True)
      if args.json:
        with open(args.json, 'a') as f:
          f.write(json.dumps(r) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
