"""Inception feature throughput on the current devices, and the time to score 50,000 samples.

  python benchmarks/inception_bench.py                       # CPU: batch 16, 256 px inputs
  python benchmarks/inception_bench.py --batch 200 --runs 10 # GPU
  python benchmarks/inception_bench.py --dtype bfloat16 --fid-dims 2048 --pr 50000

Times the jitted, batch-sharded FID InceptionV3 (var_jax/eval/inception.py: bilinear
resize to 299 + network; random weights by weights_recipe, the speed does not depend on
them) on uint8 images already in host memory, transfer to the devices included; median
of --runs batches after a compiling call. Extrapolates the feature time of 50,000
samples (+ 10,000 reference images once, the size of ADM's reference batches).
Optionally times the statistics part: FID's matrix square root at --fid-dims (scipy's
sqrtm and the eigh variant) and precision/recall of --pr random features per side.
Prints one JSON object.
"""
import argparse
import json
import statistics
import sys
import time


def _time(fn, runs):
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    fn()
    times.append(time.perf_counter() - t0)
  return statistics.median(times)


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--batch', type=int, default=16, help='images per call (global batch)')
  p.add_argument('--size', type=int, default=256, help='input image side (resized to 299)')
  p.add_argument('--runs', type=int, default=5)
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32')
  p.add_argument('--fid-dims', type=int, default=0, help='also time sqrtm at this dimension')
  p.add_argument('--pr', type=int, default=0, help='also time precision/recall, N per side')
  a = p.parse_args(argv)
  import jax
  import jax.numpy as jnp
  import numpy as np
  from var_jax.eval import inception, metrics, weights_recipe

  sd = weights_recipe.random_state_dict(inception.expected_shapes(), seed=0)
  net = inception.FIDInception(inception.variables_from_state_dict(sd),
                               dtype=jnp.bfloat16 if a.dtype == 'bfloat16' else jnp.float32)
  images = np.random.default_rng(0).integers(0, 256, (a.batch, a.size, a.size, 3), np.uint8)
  run = lambda: np.asarray(net.dispatch(images)[0]['pool3'])
  t0 = time.perf_counter()
  run()
  compile_s = time.perf_counter() - t0
  per_batch = _time(run, a.runs)
  ips = a.batch / per_batch
  out = {
      'device_kind': jax.devices()[0].device_kind, 'devices': jax.device_count(),
      'dtype': a.dtype, 'batch': a.batch, 'input_size': a.size,
      'first_call_s': round(compile_s, 2), 's_per_batch': round(per_batch, 4),
      'images_per_s': round(ips, 2),
      'features_50k_samples_s': round(50_000 / ips, 1),
      'features_10k_reference_s': round(10_000 / ips, 1),
  }
  if a.fid_dims:
    rng = np.random.default_rng(1)
    x, y = (rng.standard_normal((a.fid_dims * 2, a.fid_dims)) for _ in range(2))
    s1, s2 = np.cov(x, rowvar=False), np.cov(y + 0.1, rowvar=False)
    mu = np.zeros(a.fid_dims)
    for method in ('scipy', 'eigh'):
      t0 = time.perf_counter()
      metrics.frechet_distance(mu, s1, mu, s2, sqrtm=method)
      out[f'frechet_{method}_{a.fid_dims}d_s'] = round(time.perf_counter() - t0, 2)
  if a.pr:
    rng = np.random.default_rng(2)
    real, fake = (rng.standard_normal((a.pr, 2048)).astype(np.float32) for _ in range(2))
    t0 = time.perf_counter()
    metrics.precision_recall(real, fake + 0.1)
    out[f'precision_recall_{a.pr}_s'] = round(time.perf_counter() - t0, 2)
  print(json.dumps(out, indent=1))
  return 0


if __name__ == '__main__':
  sys.exit(main())
