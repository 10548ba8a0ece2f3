"""Zero-shot class editing on the embedded digits model: how often the demo's classifier reads
a held-out digit whose lower half was regenerated as another class as that class.

  python benchmarks/edit_digits.py                       # all 297 held-out digits x 9 targets
  python benchmarks/edit_digits.py --limit 50 --sweep-cfg 2,4,6

Each held-out digit (var_jax.data.digits, 'test' split) keeps its upper half (token rows
0 .. h/2 - 1 of the last scale) and has the lower half regenerated toward each of the 9
other classes (var_jax.demo.measure_edit, the shipped sampling defaults unless given).
Prints JSON: accuracy (classifier label == requested class), per target class,
still_source (the edit still reads as the original digit), target_before_edit (the
unedited digit already read as the target: the floor), and the seconds taken.
"""
import argparse
import json
import sys
import time


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--checkpoint', default=None, help='digits checkpoint dir (default: the embedded one)')
  p.add_argument('--limit', type=int, default=None, help='only the first N held-out digits')
  p.add_argument('--cfg', type=float, default=None)
  p.add_argument('--top-k', type=int, default=None)
  p.add_argument('--top-p', type=float, default=None)
  p.add_argument('--seed', type=int, default=0)
  p.add_argument('--sweep-cfg', default=None, help='comma-separated guidance scales to compare')
  a = p.parse_args(argv)
  import var_jax
  from var_jax import demo
  pipe = var_jax.load(a.checkpoint) if a.checkpoint else demo.load()
  cfgs = [float(v) for v in a.sweep_cfg.split(',')] if a.sweep_cfg else [a.cfg]
  for cfg in cfgs:
    t0 = time.perf_counter()
    r = demo.measure_edit(pipe, cfg=cfg, top_k=a.top_k, top_p=a.top_p, seed=a.seed, limit=a.limit)
    r['seconds'] = round(time.perf_counter() - t0, 1)
    print(json.dumps(r, indent=None if a.sweep_cfg else 1), flush=True)
  return 0


if __name__ == '__main__':
  sys.exit(main())
