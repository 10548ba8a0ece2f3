"""Measure a digits checkpoint (the embedded one by default) and optionally record the figures.

  python benchmarks/eval_digits.py [--checkpoint DIR] [--per-class 50] [--cfg 2.0 ...]
  python benchmarks/eval_digits.py --checkpoint DIR --sweep-cfg 1,2,3,4 --sweep-top-p 0,0.9
  python benchmarks/eval_digits.py --checkpoint DIR --cfg 3 --write   # DIR/demo.json

Prints JSON: classifier accuracy of class-conditional samples (the requested class, via a
logistic regression on the real 8x8 digits), diversity vs. real digits, and the
tokenizer's held-out reconstruction PSNR/SSIM (var_jax.demo.measure); and `fid_digits`:
FID, precision and recall of the same samples against the 297 held-out digits in the
hidden-layer features of a small MLP trained here on the real digits (no download;
var_jax/eval/digits_fid.py), with `fid_train_vs_test`, real digits scored the same way.
"""
import argparse
import json
import os
import sys
import time


def digits_fid(pipe, sampling, batch=100):
  """FID etc. of the samples demo.measure scored: the same labels, batches and seeds."""
  import numpy as np
  from var_jax import demo
  from var_jax.eval.digits_fid import digits_fid as score
  labels = np.repeat(np.arange(10), sampling['per_class']).astype(np.int32)
  kw = {k: sampling[k] for k in ('cfg', 'top_k', 'top_p')}
  images = np.concatenate([
      demo.sample_digits(pipe, labels=labels[i:i + batch], seed=sampling['seed'] + i // batch,
                         **kw)[0] for i in range(0, len(labels), batch)])
  return {k: round(v, 4) if isinstance(v, float) else v for k, v in score(images).items()}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--checkpoint', default=None, help='digits checkpoint dir (default: the embedded one)')
  p.add_argument('--per-class', type=int, default=50)
  p.add_argument('--cfg', type=float, default=None)
  p.add_argument('--top-k', type=int, default=None)
  p.add_argument('--top-p', type=float, default=None)
  p.add_argument('--seed', type=int, default=None)
  p.add_argument('--sweep-cfg', default=None, help='comma-separated guidance scales to compare')
  p.add_argument('--sweep-top-p', default=None, help='comma-separated top-p values to compare')
  p.add_argument('--write', action='store_true', help='write CHECKPOINT/demo.json (sampling defaults + figures)')
  p.add_argument('--note', default='', help='free text stored in demo.json (e.g. training times)')
  a = p.parse_args(argv)
  import var_jax
  from var_jax import demo
  pipe = var_jax.load(a.checkpoint) if a.checkpoint else demo.load()
  kw = dict(per_class=a.per_class, top_k=a.top_k, seed=a.seed)
  if a.sweep_cfg or a.sweep_top_p:
    cfgs = [float(v) for v in (a.sweep_cfg or str(a.cfg if a.cfg is not None else demo.defaults()['cfg'])).split(',')]
    tps = [float(v) for v in (a.sweep_top_p or str(a.top_p if a.top_p is not None else demo.defaults()['top_p'])).split(',')]
    for c in cfgs:
      for tp in tps:
        r = demo.measure(pipe, cfg=c, top_p=tp, **kw)
        print(json.dumps({'cfg': c, 'top_p': tp, 'accuracy': round(r['accuracy'], 4),
                          'diversity_ratio': round(r['diversity']['ratio'], 4)}), flush=True)
    return 0
  t0 = time.perf_counter()
  r = demo.measure(pipe, cfg=a.cfg, top_p=a.top_p, **kw)
  r['measure_seconds'] = round(time.perf_counter() - t0, 1)
  t0 = time.perf_counter()
  r['fid_digits'] = digits_fid(pipe, r['sampling'])
  r['fid_digits']['seconds'] = round(time.perf_counter() - t0, 1)
  print(json.dumps(r, indent=1))
  if a.write:
    if not a.checkpoint:
      sys.exit('--write needs --checkpoint')
    s = r['sampling']
    out = {'sampling': {'cfg': s['cfg'], 'top_k': s['top_k'], 'top_p': s['top_p'], 'seed': s['seed'],
                        'per_class': 10},
           'measured': {k: v for k, v in r.items() if k != 'sampling'} | {'per_class': s['per_class']},
           'note': a.note}
    with open(os.path.join(a.checkpoint, demo.DEMO_JSON), 'w') as f:
      json.dump(out, f, indent=1)
  return 0


if __name__ == '__main__':
  sys.exit(main())
