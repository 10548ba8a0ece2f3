"""Attention kernels and the VQVAE encoder/decoder: time per call on this device.

  python benchmarks/attention_bench.py                # d16 shapes, batch 64, 256 px (a GPU)
  python benchmarks/attention_bench.py --tiny         # small shapes: runs on a CPU in a minute
  python benchmarks/attention_bench.py --only vqvae --json out.jsonl

Prints three tables:
  1. block-causal attention forward+backward at B64 H16 L680 c64 bfloat16 (d16
     teacher forcing) per implementation this platform runs (xla everywhere, cudnn on
     NVIDIA GPUs, splash on TPUs), with the compiled temporary memory;
  2. the KV-cached sampling steps (each scale's queries of the doubled batch against
     the cached prefix, no mask), forward only, summed over the 10 scales;
  3. VQVAE encode (image -> f), tokenize (image -> token maps) and decode (f_hat ->
     image) at batch 64, 256 px, random weights, in float32 at HIGHEST precision,
     float32 at the default precision (TF32 on GPUs) and bfloat16 (decode also without
     the sub-pixel upsample), with TFLOP/s from the analytic count
     (var_jax.tokenizer.vqvae_flops; XLA's cost analysis misses cuDNN convolutions)
     and the transposes/copies left in the optimised program.
Times are the mean over --iters calls after two warm-up calls (compilation excluded).

Measured 2026-11-23 on one H100 80GB (jax 0.11.2; random weights):
  attention fwd+bwd B64 H16 L680 c64 bf16: xla 8.70 ms (4.41 GiB temp), cudnn 2.57 ms (0.25 GiB)
  KV-cached steps, batch 128, 10 scales:    xla 4.34 ms, cudnn 1.17 ms
  VQVAE batch 64, 256 px (ms; TFLOP/s from vqvae_flops):
                  encode        tokenize      decode
    f32-highest   457.4 (30)    458.6         914.1 (25)
    f32-default    71.5 (193)    72.6         118.1 (191)
    bf16           42.8 (322)    43.8          68.1 (332)
    bf16, upsample as repeat + 3x3 conv:       72.3 (349 on 1.12x the FLOPs)
  The bf16 programs keep activations NHWC: their only transposes are the weights'
  (HWIO -> cuDNN's layout, fused with the bf16 cast), no copies, and one float32
  tensor larger than 4M elements (decode's float32 output image).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

GiB = 2 ** 30


def timed(fn, *args, iters: int) -> float:
  """Mean seconds per call of an already-jitted fn (two warm-up calls first)."""
  for _ in range(2):
    jax.block_until_ready(fn(*args))
  t0 = time.perf_counter()
  for _ in range(iters):
    out = fn(*args)
  jax.block_until_ready(out)
  return (time.perf_counter() - t0) / iters


def implementations(dtype) -> list:
  from var_jax.transformer import attention as attention_lib
  out = ['xla']
  for name in ('cudnn', 'splash'):
    try:
      out.append(attention_lib.resolve(name, dtype))
    except ValueError:
      pass
  return out


def hlo_counts(compiled, big: int = 2 ** 22) -> dict:
  """Layout and precision traffic left in an optimised program: transposes, copies and
  converts anywhere (fused or not), convolutions (XLA ops or cuDNN custom calls), and
  float32 tensors of more than `big` elements written to memory (outputs of top-level
  instructions)."""
  text = compiled.as_text()
  entry = text[text.index('ENTRY'):]
  f32_big = 0
  for shape in re.findall(r'^\s*(?:ROOT )?%\S+ = f32\[([\d,]+)\]', entry, re.M):
    if np.prod([int(d) for d in shape.split(',')]) > big:
      f32_big += 1
  return {'transpose': len(re.findall(r' transpose\(', text)),
          'copy': len(re.findall(r' copy\(', text)),
          'convert': len(re.findall(r' convert\(', text)),
          'conv': len(re.findall(r' convolution\(|__cudnn\$conv', text)),
          'f32_big': f32_big}


# --- attention -----------------------------------------------------------------------------
def bench_attention(args, rows):
  from var_jax.transformer import attention as attention_lib
  from var_jax.transformer.model import block_causal_mask
  dtype = jnp.bfloat16
  pns = args.patch_nums
  mask = block_causal_mask(pns)
  L, B, H, c = mask.shape[0], args.batch, args.heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 4)
  q, k, v, ct = (jax.random.normal(kk, (B, L, H, c), jnp.float32).astype(dtype) for kk in keys)
  print(f'\n1. block-causal attention fwd+bwd, B{B} H{H} L{L} c{c} bf16 ({jax.devices()[0].device_kind})')
  print(f"{'impl':<8} {'ms':>8} {'temp GiB':>9}")
  for impl in implementations(dtype):
    def loss(q, k, v, ct):     # ct an argument, not a constant XLA would fold
      out = attention_lib.attention(q, k, v, scale=1.0, mask_qk=mask, implementation=impl)
      return jnp.vdot(out.astype(jnp.float32), ct.astype(jnp.float32))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1, 2)))
    compiled = fn.lower(q, k, v, ct).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes / GiB
    dt = timed(compiled, q, k, v, ct, iters=args.iters)
    print(f'{impl:<8} {dt * 1e3:>8.3f} {temp:>9.3f}', flush=True)
    rows.append({'bench': 'attention_fwd_bwd', 'impl': impl, 'B': B, 'H': H, 'L': L, 'c': c,
                 'ms': dt * 1e3, 'temp_GiB': temp})



def bench_cached(args, rows):
  from var_jax.transformer import attention as attention_lib
  dtype = jnp.bfloat16
  pns, B, H, c = args.patch_nums, args.batch, args.heads, args.head_dim
  keys = jax.random.split(jax.random.key(0), 3)
  B2 = 2 * B
  print(f'\n2. KV-cached steps (queries of one scale vs the prefix, no mask), batch {B2} (2 x {B}, '
        f'guidance), forward')
  ends = np.cumsum([p * p for p in pns])
  print(f"{'impl':<8} {'total ms':>9}   per scale ms")
  for impl in implementations(dtype):
    per = []
    for pn, end in zip(pns, ends):
      l = pn * pn
      qs = jax.random.normal(keys[0], (B2, l, H, c), jnp.float32).astype(dtype)
      ks = jax.random.normal(keys[1], (B2, int(end), H, c), jnp.float32).astype(dtype)
      vs = jax.random.normal(keys[2], (B2, int(end), H, c), jnp.float32).astype(dtype)
      fn = jax.jit(lambda q, k, v: attention_lib.attention(q, k, v, scale=1.0, implementation=impl))
      per.append(timed(fn, qs, ks, vs, iters=args.iters))
    print(f'{impl:<8} {sum(per) * 1e3:>9.3f}   ' + ' '.join(f'{t * 1e3:.3f}' for t in per), flush=True)
    rows.append({'bench': 'attention_cached', 'impl': impl, 'B': B2, 'H': H, 'c': c,
                 'ms': sum(per) * 1e3, 'per_scale_ms': [t * 1e3 for t in per]})


# --- VQVAE ---------------------------------------------------------------------------------
def vqvae_modes():
  hi = jax.lax.Precision.HIGHEST
  return [('f32-highest', jnp.float32, hi, True), ('f32-default', jnp.float32,
                                                   jax.lax.Precision.DEFAULT, True),
          ('bf16', jnp.bfloat16, None, True), ('bf16-repeat-up', jnp.bfloat16, None, False)]


def bench_vqvae(args, rows):
  from flax import linen as nn
  from var_jax.tokenizer import VQVAE, vqvae_flops
  cfg = args.vqvae
  B, S, h = args.vae_batch, cfg.image_size, cfg.v_patch_nums[-1]
  params = jax.jit(lambda k: nn.meta.unbox(VQVAE(cfg).init(k, jnp.zeros((1, S, S, 3)))['params']))(
      jax.random.key(0))
  img = jax.random.uniform(jax.random.key(1), (B, S, S, 3), jnp.float32, -1, 1)
  f = jax.random.normal(jax.random.key(2), (B, h, h, cfg.Cvae), jnp.float32)
  print(f'\n3. VQVAE (ch {cfg.ch}, {S} px), batch {B}, random weights')
  print(f"{'mode':<15} {'what':<9} {'ms':>9} {'img/s':>9} {'TFLOP/s':>8}  optimised HLO (top-level)")
  for mode, dtype, precision, subpixel in vqvae_modes():
    model = VQVAE(cfg, dtype=dtype, precision=precision, subpixel_upsample=subpixel)
    whats = [('decode', 'decode_fhat', f)] if not subpixel else [
        ('encode', 'encode_f', img), ('tokenize', 'img_to_idx', img), ('decode', 'decode_fhat', f)]
    for what, method, x in whats:
      fn = jax.jit(lambda p, x, method=method, model=model: model.apply({'params': p}, x, method=method))
      compiled = fn.lower(params, x).compile()
      dt = timed(compiled, params, x, iters=args.iters)
      flops = vqvae_flops(cfg, B, 'encode' if what == 'tokenize' else what, subpixel=subpixel)
      counts = hlo_counts(compiled)
      print(f'{mode:<15} {what:<9} {dt * 1e3:>9.2f} {B / dt:>9.1f} {flops / dt / 1e12:>8.1f}  '
            + ' '.join(f'{k}={v}' for k, v in counts.items()), flush=True)
      rows.append({'bench': 'vqvae', 'mode': mode, 'what': what, 'batch': B, 'size': S,
                   'ms': dt * 1e3, 'images_per_s': B / dt, 'tflops_per_s': flops / dt / 1e12,
                   'flops': flops, **counts})


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--tiny', action='store_true', help='small shapes (CPU smoke run)')
  ap.add_argument('--only', choices=('attention', 'cached', 'vqvae'), default=None)
  ap.add_argument('--iters', type=int, default=None)
  ap.add_argument('--json', default='', help='append every row as one JSON line to this file')
  args = ap.parse_args(argv)
  from var_jax.config import PATCH_NUMS_256, VQVAEConfig
  if args.tiny:
    args.patch_nums, args.batch, args.heads, args.head_dim = (1, 2, 3, 4), 2, 2, 16
    args.vqvae, args.vae_batch = VQVAEConfig(ch=32, ch_mult=(1, 2, 2), vocab_size=64, z_channels=8,
                                             v_patch_nums=(1, 2, 4)), 2
    args.iters = args.iters or 2
  else:
    args.patch_nums, args.batch, args.heads, args.head_dim = PATCH_NUMS_256, 64, 16, 64
    args.vqvae, args.vae_batch = VQVAEConfig(), 64
    args.iters = args.iters or 10
  print(f'jax {jax.__version__}, {jax.devices()[0].device_kind} x {jax.device_count()}')
  rows = []
  if args.only in (None, 'attention'):
    bench_attention(args, rows)
  if args.only in (None, 'cached'):
    bench_cached(args, rows)
  if args.only in (None, 'vqvae'):
    bench_vqvae(args, rows)
  if args.json:
    device = jax.devices()[0].device_kind
    with open(args.json, 'a') as fh:
      for r in rows:
        fh.write(json.dumps(dict(r, device=device)) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
