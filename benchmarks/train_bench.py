"""Train-step throughput and memory of the VAR task, for each attention / remat / tokenizer option.

One variant (flags choose it; any --config.key=value too):
  python benchmarks/train_bench.py --config configs/var_tiny.py --steps 10
  python benchmarks/train_bench.py --config configs/var_d16.py --batch 64 --attention cudnn \\
      --remat none --vae default --data images
Several variants in one process, one table (unattended: random weights, synthetic data,
a fixed number of steps; a variant that fails, e.g. out of memory, is a row saying so):
  python benchmarks/train_bench.py --config configs/var_d16.py --batch 64 --steps 10 --sweep
  python benchmarks/train_bench.py ... --sweep --variants 'attention=xla,remat=block;data=tokens'
A kernel breakdown: add --profile DIR (a jax.profiler trace of 3 more steps per variant),
then `python ../shared/bench/kernel_breakdown.py DIR --calls 3`.
Memory of a big model on a mesh, compiled on abstract parameters (nothing allocated; works
on CPU with fake devices):
  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \\
  python benchmarks/train_bench.py --config configs/var_d30.py --batch 64 --compile_only \\
      --config.mesh.fsdp=8 --config.mesh.data=1

Options of a variant: attention (auto|xla|cudnn|splash), remat (none|block|dots_saveable|dots_attention_saveable|...),
vae (the frozen tokenizer: highest = float32 HIGHEST, default = float32 at default precision
(TF32 on GPUs), bf16 = bfloat16 compute) and data (images: the tokenizer runs in the step;
tokens: pre-tokenised ids, no encoder) and scan (model.scan_blocks: true = the blocks as one
lax.scan, false = unrolled). The step is the trainer's own jitted, donated step
(var_jax.train.var_task) on one device-resident batch; data loading is excluded.
Reported per variant: step time, images/s, tokens/s, MFU (analytic VAR training FLOPs,
writer.var_flops_per_image, the tokenizer not counted, over devices x the device's dense
bf16 peak), the compiled per-device memory (XLA memory_analysis: arguments + outputs -
aliased + temporaries), the bytes the step writes through dynamic-update-slice
(`dus_write_GiB`: with scanned blocks, the kept activations and weight gradients put into
stacked (depth, ...) buffers; 0 unrolled) and, where the backend reports it, the device's
peak bytes in use (cumulative over the process: a sweep's later rows include earlier peaks).
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import os
import re
import sys
import time
import traceback
from typing import Any, Dict, List

import jax
import jax.numpy as jnp
import numpy as np

VAE = {'highest': ('float32', 'highest'), 'default': ('float32', 'default'),
       'bf16': ('bfloat16', 'default')}
# The default sweep: the reference's configuration and the fast options, alone and together.
SWEEP = ('attention=xla,remat=block,vae=highest,data=images;'
         'attention=auto,remat=block,vae=default,data=images;'
         'attention=auto,remat=dots_saveable,vae=default,data=images;'
         'attention=auto,remat=none,vae=default,data=images;'
         'attention=auto,remat=none,vae=bf16,data=images;'
         'attention=auto,remat=none,vae=default,data=tokens;'
         'attention=auto,remat=dots_saveable,vae=default,data=tokens;'
         'attention=auto,remat=dots_attention_saveable,vae=default,data=images;'
         'attention=auto,remat=dots_attention_saveable,vae=default,data=tokens')
GiB = float(1 << 30)


class _SyntheticSource:
  """Stands in for the training split (no files, no pipeline)."""

  def __init__(self, n: int, num_classes: int):
    self.n, self.num_classes = n, num_classes

  def __len__(self):
    return self.n

  def check(self, fingerprint, patch_nums):   # a tokens folder's check: nothing to compare
    del fingerprint, patch_nums


def parse_variant(text: str, base: Dict[str, str]) -> Dict[str, str]:
  v = dict(base)
  for part in filter(None, text.split(',')):
    k, _, val = part.partition('=')
    if k.strip() not in base:
      raise ValueError(f'unknown variant option {k!r} (one of {sorted(base)})')
    v[k.strip()] = val.strip()
  if v['vae'] not in VAE:
    raise ValueError(f'vae must be one of {sorted(VAE)}, got {v["vae"]!r}')
  if v['scan'] not in ('true', 'false'):
    raise ValueError(f"scan must be 'true' or 'false', got {v['scan']!r}")
  if v['data'] not in ('images', 'tokens'):
    raise ValueError(f"data must be 'images' or 'tokens', got {v['data']!r}")
  return v


def build_task(config_path: str, overrides: List[str], variant: Dict[str, str], batch: int):
  """The VAR task of the config with the variant's options, random weights, synthetic data."""
  from var_jax.config_loader import load_config
  from var_jax.train import loop
  from var_jax.train.var_task import VARTask
  dtype, precision = VAE[variant['vae']]
  cfg = load_config(config_path, list(overrides) + [
      '--config.vae.checkpoint=', f'--config.vae.dtype={dtype}', f'--config.vae.precision={precision}',
      f'--config.model.attention={variant["attention"]}', f'--config.model.remat={variant["remat"]}',
      f'--config.model.scan_blocks={variant["scan"] == "true"}',
      f'--config.data.kind={"tokens" if variant["data"] == "tokens" else "synthetic"}',
      f'--config.batch_size={batch}', '--config.total_steps=100000'])
  mesh, rules = loop.mesh_and_rules(cfg)
  ctx = loop.Context(cfg, mesh, rules, _SyntheticSource(batch * 1000, cfg.model.num_classes),
                     batch, 1000, cfg.total_steps)
  return VARTask(ctx)


def synthetic_batch(task, seed: int = 0) -> Dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  B = task.ctx.global_batch
  out = {'label': rng.integers(0, task.var_cfg.num_classes, (B,)).astype(np.int32)}
  if task.from_tokens:
    out['tokens'] = rng.integers(0, task.vae_cfg.vocab_size, (B, task.var_cfg.L)).astype(np.int32)
  else:
    S = task.vae_cfg.image_size
    out['image'] = rng.integers(0, 256, (B, S, S, 3), dtype=np.uint8)
  return out


def memory_of(compiled) -> Dict[str, float]:
  """Per-device GiB from XLA's memory analysis of a compiled step."""
  ma = compiled.memory_analysis()
  if ma is None:
    return {}
  arg, out = ma.argument_size_in_bytes, ma.output_size_in_bytes
  alias, temp = ma.alias_size_in_bytes, ma.temp_size_in_bytes
  return {'mem_args_GiB': arg / GiB, 'mem_temp_GiB': temp / GiB,
          'mem_total_GiB': (arg + out - alias + temp) / GiB}


_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 'bf16': 2, 'f16': 2, 's16': 2, 'u16': 2, 'f32': 4, 's32': 4,
          'u32': 4, 'f64': 8, 's64': 8, 'u64': 8}


def dus_write_bytes(hlo_text: str) -> int:
  """Bytes written by dynamic-update-slice in one run of a compiled module (update sizes,
  times the known trip counts of the enclosing while loops). In a training step with
  scanned blocks this is the traffic of the stacked (depth, ...) buffers: each saved
  activation written into its slot in the forward loop, each weight gradient in the
  backward loop; with unrolled blocks it is 0."""
  shapes, calls, dus, comp = {}, {}, {}, None
  for line in hlo_text.splitlines():
    head = re.match(r'(?:ENTRY )?%(\S+) \(.*\{$', line)
    if head:
      comp = head.group(1)
      calls[comp], dus[comp] = [], []
      if line.startswith('ENTRY'):
        entry = comp
      continue
    m = re.match(r'\s*(?:ROOT )?%(\S+) = ([a-z0-9]+)\[([0-9,]*)\]', line)
    if m and m.group(2) in _BYTES:
      shapes[m.group(1)] = _BYTES[m.group(2)] * math.prod(int(d) for d in m.group(3).split(',') if d)
    if comp is None:
      continue
    u = re.search(r' dynamic-update-slice\(%[^,\s]+, %([^,\s)]+)', line)
    if u:
      dus[comp].append(u.group(1))
    trip = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
    for callee in re.findall(r'(?:calls|body)=%([^,\s]+)', line):
      calls[comp].append((callee, int(trip.group(1)) if trip and ' while(' in line else 1))

  memo = {}

  def total(c):
    if c not in memo:
      memo[c] = sum(shapes.get(n, 0) for n in dus.get(c, ())) + sum(
          k * total(callee) for callee, k in calls.get(c, ()))
    return memo[c]
  return total(entry)


def compile_step(task, batch_global):
  """The task's jitted train step compiled for abstract state (no allocation)."""
  from var_jax.train import state as state_lib
  abstract = state_lib.abstract_with_shardings(task.abstract_state, task.state_shardings)
  lw = jnp.asarray(task.loss_weights(0))
  with task.ctx.activate():
    return task._train_step.lower(abstract, task.vae_params, batch_global, lw).compile()


def measure(config_path, overrides, variant, batch, steps, compile_only=False,
            profile: str = '') -> Dict[str, Any]:
  from var_jax.train import loop, writer
  row: Dict[str, Any] = dict(variant)
  t0 = time.perf_counter()
  task = build_task(config_path, overrides, variant, batch)
  row['attention'] = f'{variant["attention"]}->{task.attention}'
  row['params_M'] = round(task.num_params / 1e6, 2)
  local = synthetic_batch(task)
  batch_global = loop.global_batch(local, task.batch_shardings)
  compiled = compile_step(task, batch_global)
  row.update(memory_of(compiled))
  row['dus_write_GiB'] = dus_write_bytes(compiled.as_text()) / GiB
  row['compile_s'] = time.perf_counter() - t0
  if compile_only:
    return row
  state = task.init_state()
  lw = jnp.asarray(task.loss_weights(0))

  def step(state):
    with task.ctx.activate():
      return compiled(state, task.vae_params, batch_global, lw)

  state, m = step(state)          # warm-up (and the first loss)
  jax.block_until_ready(m)
  t0 = time.perf_counter()
  for _ in range(steps):
    state, m = step(state)
  jax.block_until_ready((state, m))
  dt = (time.perf_counter() - t0) / steps
  peak = writer.peak_flops()
  n_dev = jax.device_count()
  row.update(step_ms=dt * 1e3, images_per_s=batch / dt, tokens_per_s=batch * task.var_cfg.L / dt,
             tflops_per_s=task.flops_per_image * batch / dt / 1e12,
             mfu=task.flops_per_image * batch / dt / (n_dev * peak) if peak > 0 else None,
             loss=float(m['loss']))
  if profile:                     # a trace of 3 more steps, for ../shared/bench/kernel_breakdown.py
    with jax.profiler.trace(profile):
      for _ in range(3):
        state, m = step(state)
      jax.block_until_ready((state, m))
  stats = jax.devices()[0].memory_stats() or {}
  if 'peak_bytes_in_use' in stats:
    row['peak_GiB'] = stats['peak_bytes_in_use'] / GiB
  del state, m
  return row


COLUMNS = (('attention', '{}'), ('remat', '{}'), ('scan', '{}'), ('vae', '{}'), ('data', '{}'), ('step_ms', '{:.1f}'),
           ('images_per_s', '{:.1f}'), ('tokens_per_s', '{:.0f}'), ('mfu', '{:.1%}'),
           ('mem_total_GiB', '{:.2f}'), ('dus_write_GiB', '{:.2f}'), ('peak_GiB', '{:.2f}'), ('compile_s', '{:.0f}'),
           ('loss', '{:.4f}'), ('error', '{}'))


def table(rows: List[Dict[str, Any]]) -> str:
  cols = [c for c in COLUMNS if any(r.get(c[0]) is not None for r in rows)]
  cells = [[c for c, _ in cols]] + [
      ['-' if r.get(c) is None else f.format(r[c]) for c, f in cols] for r in rows]
  widths = [max(len(row[i]) for row in cells) for i in range(len(cols))]
  lines = ['| ' + ' | '.join(x.ljust(w) for x, w in zip(row, widths)) + ' |' for row in cells]
  lines.insert(1, '|' + '|'.join('-' * (w + 2) for w in widths) + '|')
  return '\n'.join(lines)


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='configs/var_tiny.py')
  ap.add_argument('--batch', type=int, default=0, help='global batch (0: the config\'s)')
  ap.add_argument('--steps', type=int, default=10, help='timed steps per variant (after one warm-up)')
  ap.add_argument('--attention', default='auto')
  ap.add_argument('--remat', default='none')
  ap.add_argument('--vae', default='default', choices=sorted(VAE))
  ap.add_argument('--data', default='images', choices=('images', 'tokens'))
  ap.add_argument('--scan', default='true', choices=('true', 'false'),
                  help='model.scan_blocks: blocks as one lax.scan (true) or unrolled (false)')
  ap.add_argument('--sweep', action='store_true', help='run --variants (default: a standard set)')
  ap.add_argument('--variants', default=SWEEP,
                  help="';'-separated variants, each 'key=value,...' over the flags above")
  ap.add_argument('--compile_only', action='store_true',
                  help='compile on abstract params and report memory_analysis only')
  ap.add_argument('--profile', default='', metavar='DIR',
                  help='write a jax.profiler trace of 3 steps of each variant here')
  ap.add_argument('--json', default='', help='append each row as one JSON line to this file')
  args, overrides = ap.parse_known_args(argv)
  bad = [o for o in overrides if not o.startswith('--config.')]
  if bad:
    ap.error(f'unrecognized arguments: {" ".join(bad)}')
  if args.batch <= 0:
    from var_jax.config_loader import load_config
    args.batch = int(load_config(args.config, overrides).batch_size)
  base = {'attention': args.attention, 'remat': args.remat, 'vae': args.vae, 'data': args.data,
          'scan': args.scan}
  try:
    variants = ([parse_variant(v, base) for v in args.variants.split(';') if v.strip()]
                if args.sweep else [base])
  except ValueError as e:      # a bad --variants entry: one line, exit 2
    ap.error(str(e))
  dev = jax.devices()[0]
  print(f'# {args.config} {" ".join(overrides)}: global batch {args.batch} on {jax.device_count()} x '
        f'{dev.device_kind} ({dev.platform}), {args.steps} timed steps', flush=True)
  rows = []
  for v in variants:
    try:
      row = measure(args.config, overrides, v, args.batch, args.steps, args.compile_only,
                    args.profile)
    except Exception as e:   # e.g. out of memory, or an attention the platform cannot run
      row = dict(v, error=f'{type(e).__name__}: {str(e).splitlines()[0][:120]}')
      if not args.sweep:
        traceback.print_exc()
    row.update(config=args.config, overrides=overrides, batch=args.batch, device=dev.device_kind,
               devices=jax.device_count(), xla_flags=os.environ.get('XLA_FLAGS', ''))
    rows.append(row)
    print(json.dumps(row), flush=True)
    if args.json:
      with open(args.json, 'a') as f:
        f.write(json.dumps(row) + '\n')
    jax.clear_caches()
    gc.collect()
  print(table(rows), flush=True)
  return 0 if all('error' not in r for r in rows) or args.sweep else 1


if __name__ == '__main__':
  sys.exit(main())
