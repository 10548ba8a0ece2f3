"""Train-step throughput: step time, tokens/s, images/s, MFU for a config, batch and mesh.

  python benchmarks/train_bench.py --config configs/var_tiny.py --steps 20 [--config.x=y ...]
  python benchmarks/train_bench.py --config configs/var_d16.py --config.vae.checkpoint= \\
      --config.data.kind=synthetic --config.batch_size=256 --config.mesh.fsdp=8

Measures the jitted step only (tokenizer + VAR forward/backward + AdamW) on one fixed
device-resident batch, after a warm-up step that compiles; data loading is excluded.
MFU = analytic VAR training FLOPs (writer.var_flops_per_image; the frozen tokenizer is
not counted) / (devices x peak bf16 FLOP/s of the device kind).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np


def main(argv=None) -> int:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument('--config', default='configs/var_tiny.py')
  ap.add_argument('--steps', type=int, default=20)
  ap.add_argument('--json', default='', help='append the result as one JSON line to this file')
  args, overrides = ap.parse_known_args(argv)

  from var_jax.config_loader import load_config
  from var_jax.data import images as data_lib
  from var_jax.train import loop, writer
  cfg = load_config(args.config, overrides)
  if True:
    t = loop.make_task(cfg)
    state = t.init_state()
    c = t.ctx
    it = data_lib.make_train_pipeline(c.source, cfg.data, seed=0, global_batch_size=c.global_batch,
                                      image_size=t.image_size(cfg))
    batch = loop.global_batch(next(it), t.batch_shardings)

    def step(state):
      with c.activate():
        return t.train_step(state, batch, 0)

    t0 = time.perf_counter()
    state, m = step(state)
    jax.block_until_ready(m)
    compile_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
      state, m = step(state)
    jax.block_until_ready((state, m))
    dt = (time.perf_counter() - t0) / args.steps

  gb, L = c.global_batch, t.var_cfg.L
  peak = writer.peak_flops()
  out = {
      'config': args.config, 'overrides': overrides, 'device': jax.devices()[0].device_kind,
      'devices': jax.device_count(), 'mesh': dict(c.mesh.shape), 'global_batch': gb,
      'params_M': round(t.num_params / 1e6, 3), 'dtype': cfg.dtype,
      'compile_s': round(compile_s, 2), 'step_time_s': round(dt, 5),
      'images_per_s': round(gb / dt, 2), 'tokens_per_s': round(gb * L / dt, 1),
      'tflops_per_s': round(t.flops_per_image * gb / dt / 1e12, 4),
      'mfu': (round(t.flops_per_image * gb / dt / (jax.device_count() * peak), 4)
              if peak > 0 else None),
      'loss': float(m['loss']),
  }
  print(json.dumps(out, indent=1))
  if args.json:
    with open(args.json, 'a') as f:
      f.write(json.dumps(out) + '\n')
  return 0


if __name__ == '__main__':
  sys.exit(main())
