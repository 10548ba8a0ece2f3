"""Sampling throughput of var_jax.sampler with random weights, against the ideal.

    python benchmarks/sample_bench.py --model d16 --batch 64 --dtype bfloat16
    python benchmarks/sample_bench.py --model d16 --batch 64 --dtype bfloat16 --profile /tmp/trace
    python benchmarks/sample_bench.py --sweep --dtype bfloat16          # the table below, one process
    python benchmarks/sample_bench.py --model d16 --write-checkpoint /tmp/d16   # for `var-jax sample`

For one configuration it prints: compile time; median s/batch and images/s of the
whole sampler (transformer, token selection, quantizer, decoder); the transformer
part (the same program with decode=False) and the decoder alone; the analytic
FLOPs of both and the ideal images/s, i.e. what the device would reach at its
matmul rate (IDEAL_TFLOPS) or, where that is lower, reading the weights once per
scale at its memory bandwidth; the fraction of the ideal reached; the KV-cache
size; and three checks on the optimised program: full-KV-cache copies (0: the
cache is updated in place), f32->bf16 converts of block weights (0 with weights
made ready once) and dynamic slices of block weights (how a scan over stacked
weights reads each block's; 0 with --unrolled; whether they cost a copy shows in
--profile as loop_dynamic_slice_fusion kernels). These checks match shapes: an
activation of exactly a weight's shape would be counted too.

FLOPs are counted from the configs (2 x multiply-adds): the transformer's every
matmul of every scale on the doubled guidance batch (attention over the cached
prefix), and the decoder's every convolution and attention matmul as run
(var_jax.tokenizer.flops.vqvae_flops). XLA's cost analysis is not used: on GPUs it
does not count cuDNN convolutions.

--profile DIR writes a jax.profiler trace of --profile-calls calls and prints the
device kernels that take the time (`kernel_breakdown`; ../shared/bench/
kernel_breakdown.py reads the same trace). --sweep runs --sweep-configs (default
d16 b64, d16 b1, d30 b64, d36 at 512 px b16) in one process, prints each row as it
finishes and a table at the end; in a sweep the transformer part is the whole
minus the decoder alone (one compile per row). --attention, --dtype,
--scan/--unrolled apply to every row. Weights are random (normals / sqrt(fan-in)
drawn once and reused): the timings do not depend on them.
"""
from __future__ import annotations

import argparse
import collections
import dataclasses
import gc
import glob
import gzip
import json
import os
import re
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from var_jax import sampler
from var_jax.config import PATCH_NUMS_512, ModelConfig, VARConfig, VQVAEConfig
from var_jax.tokenizer.flops import vqvae_flops
from var_jax.tokenizer.vqvae import VQVAE
from var_jax.transformer.model import KVCache, dummy_inputs

# Practical dense matmul rate (TFLOP/s) by (device kind substring, dtype): bf16 is the rate
# of an 8192^3 bf16 matmul measured on these machines (H100 798, H200 788); float32 the
# nominal non-tensor-core peak. Memory bandwidth in TB/s (HBM3 / HBM3e).
IDEAL_TFLOPS = {('H100', 'bfloat16'): 790.0, ('H100', 'float32'): 67.0,
                ('H200', 'bfloat16'): 790.0, ('H200', 'float32'): 67.0}
HBM_TBPS = {'H100': 3.35, 'H200': 4.8}
SWEEP = 'd16:64,d16:1,d30:64,d36@512:16'


# --- models and weights -----------------------------------------------------------
def model_config(name: str, px: int = 256) -> ModelConfig:
  """'tiny' (the tiny10 fixture's architecture) or 'dN' (the release convention)."""
  if name == 'tiny':
    vae = VQVAEConfig(vocab_size=128, z_channels=8, ch=32)
    return ModelConfig(vae=vae, var=VARConfig(num_classes=10, depth=2, embed_dim=64, num_heads=2))
  if not re.fullmatch(r'd\d+', name):
    raise SystemExit(f'--model must be tiny or dN (d16, d30, ...), got {name!r}')
  pn = {256: VQVAEConfig().v_patch_nums, 512: PATCH_NUMS_512}[px]
  return ModelConfig(vae=VQVAEConfig(v_patch_nums=pn),
                     var=VARConfig.for_depth(int(name[1:]), patch_nums=pn))


def abstract_params(cfg: ModelConfig):
  var_m, vae_m = sampler.Sampler(cfg).models()
  img = jnp.zeros((1, cfg.image_size, cfg.image_size, cfg.vae.in_channels))
  var_abs = jax.eval_shape(lambda: var_m.init({'params': jax.random.key(0)},
                                              *dummy_inputs(cfg.var, cfg.vae.Cvae))['params'])
  vae_abs = jax.eval_shape(lambda: vae_m.init({'params': jax.random.key(0)}, img)['params'])
  return nn.meta.unbox(vae_abs), nn.meta.unbox(var_abs)


def random_params(abstract, seed: int, pool_size: int = 1 << 24):
  """Normals scaled by 1/sqrt(fan-in) for matrices/convs, ones for norm scales, zeros for
  biases: slices of one pool of normals (drawing 2 B fresh ones would take minutes)."""
  rng = np.random.default_rng(seed)
  pool = rng.standard_normal(pool_size, np.float32)
  pool2 = np.concatenate([pool, pool])

  def make(path, leaf):
    name = str(path[-1].key)
    if name == 'bias':
      return jnp.zeros(leaf.shape, leaf.dtype)
    if name == 'scale':
      return jnp.ones(leaf.shape, leaf.dtype)
    size = int(np.prod(leaf.shape))
    start = int(rng.integers(0, pool_size))
    x = pool2[start:start + size] if size <= pool_size else np.resize(pool, size)
    x = x.reshape(leaf.shape)
    fan_in = int(np.prod(leaf.shape[:-1])) if len(leaf.shape) > 1 else 1
    return jnp.asarray(x / np.float32(np.sqrt(max(fan_in, 1))), leaf.dtype)
  return jax.tree_util.tree_map_with_path(make, abstract)


# --- analytic FLOPs ---------------------------------------------------------------
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


def block_weight_bytes(var_params, depth: int, dtype) -> int:
  """Bytes of the weights read at every scale: the blocks (compute dtype) and the head."""
  n_blocks = sum(x.size for i in range(depth) for x in jax.tree.leaves(var_params[f'blocks_{i}']))
  n_head = sum(x.size for x in jax.tree.leaves(var_params['head']))
  return n_blocks * jnp.dtype(dtype).itemsize + n_head * 4


# --- checks on the optimised program ----------------------------------------------
_HLO_DTYPE = {'float32': 'f32', 'bfloat16': 'bf16'}


def _hlo_dtype(dtype) -> str:
  return dtype if dtype in _HLO_DTYPE.values() else _HLO_DTYPE[str(jnp.dtype(dtype))]


def count_ops(hlo_text: str, op: str, dtype: str, shapes) -> int:
  """Instructions `op` in optimised HLO text whose result is `dtype`[dims] with dims in shapes."""
  rx = re.compile(r'= %s\[([\d,]*)\]\S* %s\(' % (_hlo_dtype(dtype), re.escape(op)))
  shapes = {tuple(s) for s in shapes}
  return sum(tuple(int(d) for d in m.group(1).split(',') if d) in shapes for m in rx.finditer(hlo_text))


def count_converts(hlo_text: str, dtype: str, shapes) -> int:
  return count_ops(hlo_text, 'convert', dtype, shapes)


def block_weight_shapes(var_params, depth: int):
  """Shapes of every block weight matrix, per block and stacked (depth, ...)."""
  shapes = set()
  for leaf in jax.tree.leaves(var_params['blocks_0']):
    if leaf.ndim >= 2:
      shapes |= {tuple(leaf.shape), (depth,) + tuple(leaf.shape)}
  return shapes


def program_checks(hlo_text: str, cfg: ModelConfig, var_params, batch: int, dtype) -> dict:
  v = cfg.var
  kv = [(v.depth, 2 * batch, v.L, v.num_heads, v.head_dim)]
  per_block = {s for x in jax.tree.leaves(var_params['blocks_0']) if x.ndim >= 2
               for s in (tuple(x.shape), (1,) + tuple(x.shape))}
  return {'kv_copies': count_ops(hlo_text, 'copy', dtype, kv),
          'weight_casts': count_converts(hlo_text, 'bf16', block_weight_shapes(var_params, v.depth))
          if jnp.dtype(dtype) == jnp.bfloat16 else 0,
          'weight_slices': sum(count_ops(hlo_text, 'dynamic-slice', d, per_block)
                               for d in ('f32', 'bf16'))}


# --- profile ------------------------------------------------------------------------
def kernel_breakdown(trace_dir: str, calls: int, top: int = 25) -> str:
  """The device kernels of the newest trace under trace_dir, largest total time first."""
  files = sorted(glob.glob(f'{trace_dir}/**/*.trace.json.gz', recursive=True))
  if not files:
    return f'no trace under {trace_dir}'
  events = json.load(gzip.open(files[-1]))
  events = events['traceEvents'] if isinstance(events, dict) else events
  procs = {e['pid']: e['args']['name'] for e in events
           if e.get('ph') == 'M' and e.get('name') == 'process_name'}
  device = {p for p, name in procs.items() if '/device:' in name}
  total = collections.defaultdict(float)
  count = collections.Counter()
  for e in events:
    if e.get('ph') == 'X' and e.get('pid') in device:
      total[e['name']] += e.get('dur', 0)
      count[e['name']] += 1
  all_us = sum(total.values())
  lines = [f'{files[-1]}: {all_us / calls / 1e3:.2f} ms of device kernels per call']
  for name, us in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
    lines.append(f'  {us / calls / 1e3:8.2f} ms {100 * us / max(all_us, 1):5.1f}% '
                 f'{count[name] // calls:5d}x  {name[:110]}')
  return '\n'.join(lines)


def tf_compile_times(cfg: ModelConfig, var_abs, batch: int, dtype, scan: bool):
  """Compile time of the teacher-forcing forward and of forward+backward (train=True):
  what the trainer compiles (shapes suffice, no weights)."""
  var_m = dataclasses.replace(sampler.Sampler(cfg, dtype=dtype, scan_blocks=scan).models()[0])
  labels = jnp.zeros((batch,), jnp.int32)
  x = jnp.zeros((batch, cfg.var.L - cfg.var.first_l, cfg.vae.Cvae), jnp.float32)
  fwd = jax.jit(lambda p, l, x: var_m.apply({'params': p}, l, x))

  def loss(p, l, x, k):
    return var_m.apply({'params': p}, l, x, train=True, rngs={'dropout': k}).mean()
  for name, f, a in (('forward', fwd, (var_abs, labels, x)),
                     ('forward+backward (train=True)', jax.jit(jax.grad(loss)),
                      (var_abs, labels, x, jax.random.key(0)))):
    t0 = time.perf_counter()
    f.lower(*a).compile()
    print(f'teacher-forcing compile, {name}: {time.perf_counter() - t0:.1f} s', flush=True)


# --- one configuration ------------------------------------------------------------
def device_figures(dtype: str):
  kind = jax.devices()[0].device_kind
  tflops = next((v for (k, d), v in IDEAL_TFLOPS.items() if k in kind and d == dtype), None)
  bw = next((v for k, v in HBM_TBPS.items() if k in kind), None)
  return tflops, bw


def timed(f, runs: int, *a):
  jax.block_until_ready(f(*a))                       # warm-up
  ts = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(f(*a))
    ts.append(time.perf_counter() - t0)
  return statistics.median(ts), ts


def bench_one(args, model: str, px: int, batch: int, *, split: bool, say=print) -> dict:
  cfg = model_config(model, px)
  dtype = jnp.dtype(args.dtype)
  top_k = min(args.top_k, cfg.vae.vocab_size)
  s = sampler.Sampler(cfg, top_k=top_k, use_top_p=args.top_p > 0, dtype=dtype,
                      scan_blocks=args.scan, attention=args.attention)
  t0 = time.perf_counter()
  vae_abs, var_abs = abstract_params(cfg)
  vae_p, var_p = random_params(vae_abs, 1), random_params(var_abs, 0)
  ready = s.prepare(var_p)
  jax.block_until_ready((vae_p, ready))
  n_var = sum(x.size for x in jax.tree.leaves(var_p))
  n_vae = sum(x.size for x in jax.tree.leaves(vae_p))
  say(f'[{model} {px}px b{batch}] random weights {time.perf_counter() - t0:.1f} s: VAR '
      f'{n_var / 1e6:.1f} M, VQVAE {n_vae / 1e6:.1f} M params; top_k {top_k} top_p {args.top_p}')
  labels = jnp.arange(batch, dtype=jnp.int32) % cfg.var.num_classes
  call = (vae_p, ready, labels, args.cfg, args.top_p, jax.random.key(0))
  t0 = time.perf_counter()
  full = s.lower(*call).compile()
  row = {'model': model, 'px': px, 'batch': batch, 'compile_s': time.perf_counter() - t0}
  row.update(program_checks(full.as_text(), cfg, var_p, batch, dtype))
  hw = cfg.patch_nums[-1]
  f_hat = jax.random.normal(jax.random.key(2), (batch, hw, hw, cfg.vae.Cvae))
  vae_m = s.models()[1]
  dec = jax.jit(lambda p, f: vae_m.apply({'params': p}, f, method=VQVAE.decode_fhat))
  dec = dec.lower(vae_p, f_hat).compile()
  run_args = (vae_p, ready, labels, jnp.float32(args.cfg), jnp.float32(args.top_p), call[5], None)
  row['s'], times = timed(full, args.runs, *run_args)
  row['dec_s'], _ = timed(dec, args.runs, vae_p, f_hat)
  if split:
    t0 = time.perf_counter()
    no_dec = dataclasses.replace(s, decode=False).lower(*call).compile()
    say(f'compile without decoder: {time.perf_counter() - t0:.1f} s')
    row['var_s'], _ = timed(no_dec, args.runs, *run_args)
  else:
    row['var_s'] = row['s'] - row['dec_s']
  row['var_tflop'] = transformer_flops(cfg.var, cfg.vae.vocab_size, cfg.vae.Cvae, batch) / 1e12
  row['dec_tflop'] = vqvae_flops(cfg.vae, batch, 'decode') / 1e12
  row['img_s'] = batch / row['s']
  tflops, bw = device_figures(args.dtype)
  if tflops:
    t_flops = (row['var_tflop'] + row['dec_tflop']) / tflops
    t_bytes = len(cfg.patch_nums) * block_weight_bytes(var_p, cfg.var.depth, dtype) / (bw * 1e12) if bw else 0
    row['ideal_img_s'] = batch / max(t_flops, t_bytes)
    row['frac'] = row['img_s'] / row['ideal_img_s']
  kv = KVCache.nbytes(cfg.var, 2 * batch, dtype)
  say(f'compile {row["compile_s"]:.1f} s; sample: median {row["s"] * 1e3:.1f} ms/batch over '
      f'{args.runs} runs = {row["img_s"]:.2f} images/s (runs {[round(t * 1e3, 1) for t in times]} ms)')
  say(f'transformer (+ token selection, quantizer): {row["var_tflop"]:.4f} TFLOP in '
      f'{row["var_s"] * 1e3:.1f} ms = {row["var_tflop"] / row["var_s"]:.2f} TFLOP/s'
      f'{"" if split else " (whole minus decoder)"}; decoder: {row["dec_tflop"]:.4f} TFLOP in '
      f'{row["dec_s"] * 1e3:.1f} ms = {row["dec_tflop"] / row["dec_s"]:.2f} TFLOP/s')
  if 'frac' in row:
    say(f'ideal {row["ideal_img_s"]:.1f} images/s ({tflops:g} TFLOP/s, {bw} TB/s): reached '
        f'{row["frac"]:.1%}')
  say(f'KV cache {kv / 2 ** 20:.1f} MiB; in the optimised program: {row["kv_copies"]} full-KV-cache '
      f'copies, {row["weight_casts"]} block-weight casts, {row["weight_slices"]} block-weight slices')
  if args.profile:
    jax.profiler.start_trace(args.profile, create_perfetto_trace=True)
    for _ in range(args.profile_calls):
      out = full(*run_args)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    say(kernel_breakdown(args.profile, args.profile_calls))
  del full, dec, vae_p, var_p, ready, call, run_args
  gc.collect()
  jax.clear_caches()
  return row


def table(rows) -> str:
  head = ('| model | batch | images/s | ms/batch | transformer ms | decoder ms | ideal images/s | '
          'of ideal | compile s | KV copies / weight casts / slices |')
  lines = [head, '|' + ' --- |' * 10]
  for r in rows:
    ideal = f'{r["ideal_img_s"]:.1f}' if 'ideal_img_s' in r else 'n/a'
    frac = f'{r["frac"]:.1%}' if 'frac' in r else 'n/a'
    lines.append(f'| {r["model"]} {r["px"]}px | {r["batch"]} | {r["img_s"]:.1f} | {r["s"] * 1e3:.1f} | '
                 f'{r["var_s"] * 1e3:.1f} | {r["dec_s"] * 1e3:.1f} | {ideal} | {frac} | '
                 f'{r["compile_s"]:.1f} | {r["kv_copies"]} / {r["weight_casts"]} / {r["weight_slices"]} |')
  return '\n'.join(lines)


def write_checkpoint(args, directory: str):
  """The random-weight model as a native checkpoint (for timing `var-jax sample`)."""
  from var_jax import checkpoint
  cfg = model_config(args.model, args.px)
  vae_abs, var_abs = abstract_params(cfg)
  out = checkpoint.save(directory, cfg, random_params(vae_abs, 1), random_params(var_abs, 0))
  print(f'random-weight {args.model} checkpoint -> {out}')


def main(argv=None):
  ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  ap.add_argument('--model', default='d16', help='tiny, or dN: the release convention at depth N')
  ap.add_argument('--px', type=int, choices=(256, 512), default=256, help='image size (schedule)')
  ap.add_argument('--batch', type=int, default=64)
  ap.add_argument('--dtype', choices=['float32', 'bfloat16'], default='bfloat16')
  ap.add_argument('--attention', default='auto', help='auto | xla | cudnn | splash')
  scan = ap.add_mutually_exclusive_group()
  scan.add_argument('--scan', dest='scan', action='store_true', default=True,
                    help='blocks as one lax.scan over stacked weights (default)')
  scan.add_argument('--unrolled', dest='scan', action='store_false', help='blocks unrolled')
  ap.add_argument('--runs', type=int, default=5)
  ap.add_argument('--cfg', type=float, default=1.5)
  ap.add_argument('--top_k', '--top-k', type=int, default=900)
  ap.add_argument('--top_p', '--top-p', type=float, default=0.96)
  ap.add_argument('--profile', default=None, metavar='DIR', help='write a jax.profiler trace here')
  ap.add_argument('--profile-calls', type=int, default=3)
  ap.add_argument('--sweep', action='store_true', help='run --sweep-configs, print a table')
  ap.add_argument('--sweep-configs', default=SWEEP,
                  help=f'model[@px]:batch,... (default {SWEEP})')
  ap.add_argument('--tf_compile', action='store_true',
                  help='time the teacher-forcing forward and gradient compiles, then exit')
  ap.add_argument('--write-checkpoint', default=None, metavar='DIR',
                  help='write the random-weight --model as a native checkpoint and exit')
  args = ap.parse_args(argv)
  if args.write_checkpoint:
    return write_checkpoint(args, args.write_checkpoint)
  if args.tf_compile:
    cfg = model_config(args.model, args.px)
    return tf_compile_times(cfg, abstract_params(cfg)[1], args.batch, args.dtype, args.scan)
  dev = jax.devices()[0]
  print(f'device: {dev.device_kind} ({dev.platform}) x{len(jax.devices())}; jax {jax.__version__}; '
        f'dtype {args.dtype}; attention {args.attention}; blocks '
        f'{"lax.scan" if args.scan else "unrolled"}; cfg {args.cfg} top_k {args.top_k} '
        f'top_p {args.top_p}; XLA_FLAGS {os.environ.get("XLA_FLAGS", "")!r}', flush=True)
  say = lambda *a: print(*a, flush=True)
  if not args.sweep:
    bench_one(args, args.model, args.px, args.batch, split=True, say=say)
    return
  rows = []
  for item in args.sweep_configs.split(','):
    spec, batch = item.split(':')
    model, _, px = spec.partition('@')
    try:
      rows.append(bench_one(args, model, int(px or 256), int(batch), split=False, say=say))
    except Exception as e:   # keep the rows already measured (e.g. out of memory)
      say(f'[{item}] failed: {type(e).__name__}: {str(e)[:300]}')
    say(table(rows))


if __name__ == '__main__':
  sys.exit(main())
