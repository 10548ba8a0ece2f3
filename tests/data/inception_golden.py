"""Regenerates tests/data/inception_{keys.json,golden.npz}: run ONCE in a throwaway env.

    python -m venv /tmp/torchenv && /tmp/torchenv/bin/pip install torch torchvision pytorch-fid
    /tmp/torchenv/bin/python tests/data/inception_golden.py

Not part of var-jax and not run by the tests (it needs torch and pytorch-fid; it only
imports them, it copies none of their code). It
  1. builds pytorch-fid's FID InceptionV3 (pytorch_fid.inception.InceptionV3, i.e.
     fid_inception_v3 with its FIDInceptionA/C/E blocks) and writes the names and shapes
     of its state dict (num_batches_tracked left out) to inception_keys.json;
  2. fills it with var_jax.eval.weights_recipe.random_state_dict(shapes, seed=SEED)
     (numpy only; imported from this checkout without importing jax);
  3. runs it on small deterministic uint8 images of several sizes (so the bilinear
     resize to 299 is exercised up and down) and stores, per size: the images, pool3
     (N, 2048), logits = fc(pool3) (N, 1008) and spatial = Mixed_6d.branch1x1.conv's
     output before its batch norm, first 7 channels, NHWC (N, 17, 17, 7).
Measured with torch 2.14.1+cu130, torchvision 0.29.1, pytorch-fid 0.3.0, numpy 2.4.6, CPU.
"""
import importlib.util
import json
import pathlib
import sys

import numpy as np
import torch
import torch.nn.functional as F
from pytorch_fid import inception as fid_inception

HERE = pathlib.Path(__file__).resolve().parent
SEED = 0
SIZES = ((32, 32), (64, 48), (299, 299), (331, 400))
PER_SIZE = 2


def _recipe():
  path = HERE.parents[1] / 'var_jax' / 'eval' / 'weights_recipe.py'
  spec = importlib.util.spec_from_file_location('weights_recipe', path)
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


def make_images(h, w, n, seed):
  """Random colour blocks plus a horizontal wave: deterministic uint8 (n, h, w, 3) whose
  rows repeat within a block, so the npz compresses well even for large images."""
  rng = np.random.default_rng(1000 + seed)
  grid = rng.integers(0, 256, size=(n, 9, 11, 3)).astype(np.float64)
  i = np.arange(h) * 9 // h
  j = np.arange(w) * 11 // w
  wave = 60 * np.sin(2 * np.pi * 2.5 * np.arange(w) / w)[None, None, :, None]
  v = 0.7 * grid[:, i][:, :, j] + wave + 20
  return np.clip(np.rint(v), 0, 255).astype(np.uint8)


def main():
  torch.set_num_threads(2)
  recipe = _recipe()
  # The shapes come from pytorch-fid's own network: record the model fid_inception_v3
  # builds and hand its own (uninitialised) state dict back instead of downloading.
  made, state = [], {}
  build = fid_inception._inception_v3
  fid_inception._inception_v3 = lambda *a, **k: made.append(build(*a, **k)) or made[-1]
  fid_inception.load_state_dict_from_url = (
      lambda *a, **k: state['sd'] if 'sd' in state else made[-1].state_dict())
  model_shapes = {k: list(v.shape) for k, v in fid_inception.fid_inception_v3().state_dict().items()
                  if not k.endswith('num_batches_tracked')}
  sd = recipe.random_state_dict(model_shapes, seed=SEED)
  state['sd'] = {k: torch.from_numpy(v) for k, v in sd.items()}
  net = fid_inception.InceptionV3([3], resize_input=True, normalize_input=True,
                                  use_fid_inception=True).eval()
  taps = {}
  mixed_6d = net.blocks[2][6]
  mixed_6d.branch1x1.conv.register_forward_hook(lambda m, i, o: taps.__setitem__('spatial', o))
  fc_w, fc_b = state['sd']['fc.weight'], state['sd']['fc.bias']
  out = {'seed': np.int64(SEED)}
  for n_size, (h, w) in enumerate(SIZES):
    images = make_images(h, w, PER_SIZE, n_size)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    with torch.no_grad():
      pool3 = net(x)[0][:, :, 0, 0]
      logits = F.linear(pool3, fc_w, fc_b)
    tag = f'{h}x{w}'
    out[f'images_{tag}'] = images
    out[f'pool3_{tag}'] = pool3.numpy().astype(np.float32)
    out[f'logits_{tag}'] = logits.numpy().astype(np.float32)
    out[f'spatial_{tag}'] = taps['spatial'][:, :7].permute(0, 2, 3, 1).numpy().astype(np.float32)
    print(tag, 'pool3 mean/std', float(pool3.mean()), float(pool3.std()),
          'logits std', float(logits.std()), 'spatial std', float(taps['spatial'].std()))
  rows = ',\n'.join(f' {json.dumps(k)}: {json.dumps(v)}' for k, v in model_shapes.items())
  (HERE / 'inception_keys.json').write_text('{\n' + rows + '\n}\n')
  np.savez_compressed(HERE / 'inception_golden.npz', **out)
  print('wrote', HERE / 'inception_keys.json', HERE / 'inception_golden.npz', file=sys.stderr)


if __name__ == '__main__':
  main()
