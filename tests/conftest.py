"""Shared test helpers: where the reference fixtures live and how to load them."""
import importlib.util
import json
import os
import pathlib

# The tests run on the CPU with eight fake devices (the sharding tests need them), whatever
# the host has: set before jax starts, appended to any XLA_FLAGS the caller already set.
# The CPU backend's LLVM runs at -O0 unless the caller chose a level: the suite is
# dominated by compiles of small programs (README API test 55 -> 40 s on 2 cores).
# VAR_JAX_TEST_PLATFORM=cuda (or tpu) runs them on an accelerator instead.
NUM_CPU_DEVICES = 8
os.environ['JAX_PLATFORMS'] = os.environ.get('VAR_JAX_TEST_PLATFORM', 'cpu')
_flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
          if not f.startswith('--xla_force_host_platform_device_count')]
if not any(f.startswith('--xla_backend_optimization_level') for f in _flags):
  _flags.append('--xla_backend_optimization_level=0')
os.environ['XLA_FLAGS'] = ' '.join(_flags + [f'--xla_force_host_platform_device_count={NUM_CPU_DEVICES}'])

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
FIXTURES = pathlib.Path(os.environ.get('VAR_JAX_FIXTURES', ROOT.parent / 'shared' / 'fixtures'))
FIXTURE_NAMES = ('tiny4', 'tiny10')


class Fixture:
  """One fixture folder: config dict, io arrays, and the two state dicts (lazily)."""

  def __init__(self, name):
    self.name = name
    self.dir = FIXTURES / name
    if not self.dir.is_dir():
      raise FileNotFoundError(f'fixture folder {self.dir} not found (set VAR_JAX_FIXTURES)')
    self.raw_config = json.loads((self.dir / 'config.json').read_text())
    with np.load(self.dir / 'io.npz') as z:
      self.io = {k: z[k] for k in z.files}
    self._vae_sd = self._var_sd = None

  @property
  def config(self):
    from var_jax.config import ModelConfig
    return ModelConfig.from_dict(self.raw_config)

  @property
  def vae_sd(self):
    if self._vae_sd is None:
      from var_jax.convert.torch_io import load_pth
      self._vae_sd = load_pth(self.dir / 'vae.pth')
    return self._vae_sd

  @property
  def var_sd(self):
    if self._var_sd is None:
      from var_jax.convert.torch_io import load_pth
      self._var_sd = load_pth(self.dir / 'var.pth')
    return self._var_sd

  def nhwc(self, key):
    """An NCHW fixture array as NHWC."""
    return np.transpose(self.io[key], (0, 2, 3, 1))


def load_benchmark(name: str):
  """benchmarks/<name>.py as a module (the benchmark scripts are not a package)."""
  spec = importlib.util.spec_from_file_location(name, ROOT / 'benchmarks' / f'{name}.py')
  mod = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(mod)
  return mod


_CACHE = {}


def get_fixture(name):
  if name not in _CACHE:
    _CACHE[name] = Fixture(name)
  return _CACHE[name]


@pytest.fixture(params=[pytest.param('tiny4'), pytest.param('tiny10', marks=pytest.mark.slow)])
def fx(request):
  """Each fixture in turn; tiny10 (the 10-scale 256 px schedule) only in the full run."""
  return get_fixture(request.param)
