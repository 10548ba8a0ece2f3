"""One process of the multi-process training test (run by tests/test_multihost.py).

argv: port num_processes process_id workdir out.npz. Each process has 4 // num_processes CPU
devices; the mesh always spans 4 devices, so 1 x 4 and 2 x 2 run the same sharded program.
"""
import os
import pathlib
import sys

port, nproc, pid, workdir, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
os.environ['XLA_FLAGS'] = (f'--xla_force_host_platform_device_count={4 // nproc} '
                           '--xla_backend_optimization_level=0')   # compile-bound, as in conftest
os.environ['JAX_PLATFORMS'] = 'cpu'

import jax  # noqa: E402
import numpy as np  # noqa: E402

if nproc > 1:
  jax.distributed.initialize(coordinator_address=f'localhost:{port}', num_processes=nproc,
                             process_id=pid, initialization_timeout=120)

from flax import traverse_util  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from var_jax.config_loader import load_config  # noqa: E402
from var_jax.train import loop  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
cfg = load_config(str(ROOT / 'configs' / 'var_tiny.py'), [
    '--config.vae.patch_nums=(1, 2, 3)', '--config.vae.ch_mult=(1, 1)', '--config.vae.using_sa=false',
    '--config.vae.using_mid_sa=false', '--config.batch_size=8', '--config.data.synthetic_examples=32',
    '--config.data.num_threads=1', '--config.run.eval_every=0', '--config.run.log_every=1000',
    '--config.run.export=false', '--config.total_steps=3', '--config.run.save_every=2',
    '--config.mesh.data=2', '--config.mesh.fsdp=2', '--config.data.hflip=true'])
assert jax.device_count() == 4, jax.device_count()
state, summary = loop.train_and_evaluate(cfg, workdir)
params = multihost_utils.process_allgather(state.params, tiled=True)
if pid == 0:
  np.savez(out, **{k: np.asarray(v) for k, v in traverse_util.flatten_dict(params, sep='/').items()})
print('summary', summary, flush=True)
