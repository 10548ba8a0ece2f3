"""Sampling throughput of var_jax.sampler with random weights.

    .venv/bin/python benchmarks/sample_bench.py --model d16 --batch 16 --dtype bfloat16 --runs 5
    .venv/bin/python benchmarks/sample_bench.py --model d16 --batch 1 --unrolled --tf_compile_only

Prints the compile time of the one-program sampler, the median seconds per batch
and images/s, the FLOPs of the transformer (counted analytically: every matmul
of every scale on the doubled guidance batch) and of the VQVAE decoder (XLA cost
analysis of decode_fhat), their achieved TFLOP/s and fraction of the device's
peak, and the KV-cache size. --unrolled runs the transformer blocks as an
unrolled Python loop instead of the default lax.scan over stacked blocks
(VAR.scan_blocks). --tf_compile times the compilation of the teacher-forcing
forward (VAR.__call__) and of its gradient (what the trainer compiles) at the
model's full L; --tf_compile_only stops after that. The number of full-cache
copies in the optimised sampler program is printed as a check that the KV cache
is updated in place. The transformer part is timed as the sampler
program without its decoder (decode=False: transformer, token selection and the
quantizer steps); the decoder alone on the same batch.
Weights are random (fan-in scaled normals): the timings do not depend on them.
"""
from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax import sampler
from var_jax.config import ModelConfig, VARConfig, VQVAEConfig
from var_jax.transformer.model import KVCache, dummy_inputs
from var_jax.tokenizer.vqvae import VQVAE

# Dense peak TFLOP/s by (device kind substring, compute dtype).
PEAK_TFLOPS = {
    ('H100', 'bfloat16'): 989.0, ('H100', 'float32'): 67.0,
    ('H200', 'bfloat16'): 989.0, ('H200', 'float32'): 67.0,
}


def model_config(name: str) -> ModelConfig:
  if name == 'tiny':   # the tiny10 fixture's architecture (release VQVAE structure, ch 32)
    vae = VQVAEConfig(vocab_size=128, z_channels=8, ch=32)
    return ModelConfig(vae=vae, var=VARConfig(num_classes=10, depth=2, embed_dim=64, num_heads=2))
  depth = int(name[1:])
  return ModelConfig(vae=VQVAEConfig(), var=VARConfig.for_depth(depth))


def transformer_flops(cfg: VARConfig, vocab: int, Cvae: int, batch: int) -> float:
  """2 x multiply-adds of one sample call: every matmul on the doubled batch,
  attention over the cached prefix; AdaLN projections once per call."""
  C, hid, B2 = cfg.embed_dim, cfg.mlp_hidden, 2 * batch
  macs = B2 * (6 * C * C * (1 if cfg.shared_aln else cfg.depth) + 2 * C * C)   # AdaLN + head AdaLN
  for (b, e) in cfg.begin_ends:
    l = e - b
    per_block = 4 * C * C * l + 2 * C * hid * l + 2 * l * e * C               # qkv+proj, ffn, qk+pv
    macs += B2 * (cfg.depth * per_block + C * vocab * l + Cvae * C * l)        # blocks, head, word_embed
  return 2.0 * macs


def random_params(abstract, seed: int):
  """Normals scaled by 1/sqrt(fan-in) for matrices/convs, ones for norm scales, zeros for
  biases; drawn with numpy (compiling a random program per leaf would dominate)."""
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = str(path[-1].key)
    if name == 'bias':
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    x = rng.standard_normal(leaf.shape, np.float32) / np.float32(np.sqrt(max(fan_in, 1)))
    return jnp.asarray(x, leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, abstract)


def cache_copies(compiled, cfg: ModelConfig, batch: int, dtype) -> int:
  """`copy` instructions of the optimised HLO whose result has the full KV-cache
  shape (depth, 2B, L, H, c): 0 means the cache is only updated in place."""
  v = cfg.var
  dims = f'[{v.depth},{2 * batch},{v.L},{v.num_heads},{v.head_dim}]'
  name = {'float32': 'f32', 'bfloat16': 'bf16'}[jnp.dtype(dtype).name]
  return sum(1 for line in compiled.as_text().splitlines()
             if f'{name}{dims}' in line.split('=', 1)[-1].split('(')[0] and ' copy(' in line)


def tf_compile_times(cfg: ModelConfig, var_p, labels, dtype, scan: bool):
  """Compile time of the teacher-forcing forward and of forward+backward (train=True)."""
  var_m = sampler._models(cfg, dtype, scan)[0]
  x = jnp.zeros((labels.shape[0], cfg.var.L - cfg.var.first_l, cfg.vae.Cvae), jnp.float32)
  fwd = jax.jit(lambda p, l, x: var_m.apply({'params': p}, l, x))

  def loss(p, l, x, k):
    return var_m.apply({'params': p}, l, x, train=True, rngs={'dropout': k}).mean()
  grad = jax.jit(jax.grad(loss))
  for name, f, a in (('forward', fwd, (var_p, labels, x)),
                     ('forward+backward (train=True)', grad, (var_p, labels, x, jax.random.key(0)))):
    t0 = time.perf_counter()
    f.lower(*a).compile()
    print(f'teacher-forcing compile, {name}: {time.perf_counter() - t0:.1f} s')


def peak(dtype: str):
  kind = jax.devices()[0].device_kind
  for (k, d), v in PEAK_TFLOPS.items():
    if k in kind and d == dtype:
      return v
  return None


def main():
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--model', choices=['tiny', 'd16', 'd20', 'd24', 'd30'], default='tiny')
  ap.add_argument('--batch', type=int, default=8)
  ap.add_argument('--dtype', choices=['float32', 'bfloat16'], default='float32')
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--cfg', type=float, default=1.5)
  ap.add_argument('--top_k', type=int, default=900)
  ap.add_argument('--top_p', type=float, default=0.96)
  ap.add_argument('--unrolled', action='store_true', help='unrolled blocks (scan_blocks=False)')
  ap.add_argument('--tf_compile', action='store_true', help='also time teacher-forcing compiles')
  ap.add_argument('--tf_compile_only', action='store_true')
  args = ap.parse_args()
  scan = not args.unrolled

  cfg = model_config(args.model)
  top_k = min(args.top_k, cfg.vae.vocab_size)
  dtype = jnp.dtype(args.dtype)
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({dev.platform}) x{len(jax.devices())}; model {args.model} '
        f'(depth {cfg.var.depth}, C {cfg.var.embed_dim}, L {cfg.var.L}, V {cfg.vae.vocab_size}); '
        f'batch {args.batch}; dtype {args.dtype}; cfg {args.cfg} top_k {top_k} top_p {args.top_p}; '
        f'blocks {"lax.scan" if scan else "unrolled"}')

  var_m, vae_m = sampler._models(cfg, dtype)
  img = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.vae.in_channels))
  var_abs = jax.eval_shape(lambda: var_m.init({'params': jax.random.key(0)},
                                              *dummy_inputs(cfg.var, cfg.vae.Cvae))['params'])
  vae_abs = jax.eval_shape(lambda: vae_m.init({'params': jax.random.key(0)}, img)['params'])
  labels = jnp.arange(args.batch, dtype=jnp.int32) % cfg.var.num_classes
  if args.tf_compile or args.tf_compile_only:   # shapes suffice to compile: no weights needed
    tf_compile_times(cfg, nn.meta.unbox(var_abs), labels, dtype, scan)
    if args.tf_compile_only:
      return
  t0 = time.perf_counter()
  var_p, vae_p = random_params(nn.meta.unbox(var_abs), 0), random_params(nn.meta.unbox(vae_abs), 1)
  jax.block_until_ready((var_p, vae_p))
  n_var = sum(x.size for x in jax.tree.leaves(var_p))
  n_vae = sum(x.size for x in jax.tree.leaves(vae_p))
  print(f'random weights: {time.perf_counter() - t0:.1f} s; VAR {n_var / 1e6:.1f} M params, '
        f'VQVAE {n_vae / 1e6:.1f} M params')

  call_args = (vae_p, var_p, labels, jnp.float32(args.cfg), jnp.float32(args.top_p), jax.random.key(0))
  progs = {}
  for decode in (True, False):
    fn = sampler.make_sample_fn(cfg, top_k=top_k, use_top_p=args.top_p > 0, dtype=dtype, decode=decode,
                                scan_blocks=scan)
    t0 = time.perf_counter()
    progs[decode] = fn.lower(*call_args).compile()
    print(f'compile ({"full sampler" if decode else "without decoder"}): {time.perf_counter() - t0:.1f} s')
  print(f'full-KV-cache copies in the optimised sampler: {cache_copies(progs[True], cfg, args.batch, dtype)}')
  hw = cfg.patch_nums[-1]
  f_hat = jax.random.normal(jax.random.key(2), (args.batch, hw, hw, cfg.vae.Cvae))
  dec = jax.jit(lambda p, f: vae_m.apply({'params': p}, f, method=VQVAE.decode_fhat))
  dec = dec.lower(vae_p, f_hat).compile()
  ca = dec.cost_analysis()
  ca = ca[0] if isinstance(ca, (list, tuple)) else ca
  dec_flops = float(ca.get('flops', float('nan'))) if ca else float('nan')

  def timed(f, *a):
    jax.block_until_ready(f(*a))          # warm-up
    ts = []
    for i in range(args.runs):
      t0 = time.perf_counter()
      jax.block_until_ready(f(*a))
      ts.append(time.perf_counter() - t0)
    return statistics.median(ts), ts

  t_total, times = timed(progs[True], *call_args)
  t_var, _ = timed(progs[False], *call_args)
  t_dec, _ = timed(dec, vae_p, f_hat)
  var_flops = transformer_flops(cfg.var, cfg.vae.vocab_size, cfg.vae.Cvae, args.batch)
  pk = peak(args.dtype)

  def frac(tflops):
    return f'{tflops / pk:.1%} of {pk:g} peak' if pk else 'fraction of peak n/a'

  print(f'sample: median {t_total:.3f} s/batch over {args.runs} runs ({args.batch / t_total:.2f} images/s); '
        f'runs {[round(t, 3) for t in times]}')
  tv, td = var_flops / t_var / 1e12, dec_flops / t_dec / 1e12
  print(f'transformer (+ sampling, quantizer): {var_flops / 1e12:.4f} TFLOP/batch in {t_var:.3f} s '
        f'-> {tv:.4f} TFLOP/s ({frac(tv)})')
  print(f'decoder: {dec_flops / 1e12:.4f} TFLOP/batch in {t_dec:.3f} s -> {td:.4f} TFLOP/s ({frac(td)})')
  kv = KVCache.nbytes(cfg.var, 2 * args.batch, dtype)
  print(f'KV cache: {kv / 2**20:.1f} MiB ({2 * args.batch} rows x L {cfg.var.L} x C {cfg.var.embed_dim} '
        f'x depth {cfg.var.depth} x (k, v) in {args.dtype})')


if __name__ == '__main__':
  main()
