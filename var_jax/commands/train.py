"""`var-jax train --config configs/var_d16.py --workdir DIR [--config.key=value ...]`.

Multi-host: with more than one process (TPU pod slice, SLURM, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID set) jax.distributed.initialize() runs first.
"""
from __future__ import annotations

import json
import os

ACCEPTS_OVERRIDES = True


def add_arguments(parser):
  parser.add_argument('--config', required=True,
                      help='config file (configs/var_d16.py, or path:arg), see configs/')
  parser.add_argument('--workdir', required=True, help='checkpoints, logs, TensorBoard (resumes if present)')
  parser.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                      help='call jax.distributed.initialize(): auto = on TPU pods, SLURM, or when '
                           'JAX_COORDINATOR_ADDRESS is set')
  parser.add_argument('--stop_after', type=int, default=None,
                      help='stop (with a checkpoint) after this many optimizer steps in total')


def _want_distributed(mode: str) -> bool:
  if mode != 'auto':
    return mode == 'on'
  env = os.environ
  return bool(env.get('JAX_COORDINATOR_ADDRESS') or int(env.get('SLURM_NTASKS', '1')) > 1
              or env.get('TPU_WORKER_HOSTNAMES', '').count(',') > 0
              or env.get('MEGASCALE_COORDINATOR_ADDRESS'))


def init_distributed(mode: str) -> None:
  """jax.distributed.initialize() when `mode` (auto/on/off) asks for several processes."""
  import jax
  if not _want_distributed(mode):
    return
  env = os.environ
  if env.get('JAX_COORDINATOR_ADDRESS') and env.get('JAX_NUM_PROCESSES') and env.get('JAX_PROCESS_ID'):
    jax.distributed.initialize(coordinator_address=env['JAX_COORDINATOR_ADDRESS'],
                               num_processes=int(env['JAX_NUM_PROCESSES']),
                               process_id=int(env['JAX_PROCESS_ID']))
  else:   # TPU pods and SLURM are detected by jax itself
    jax.distributed.initialize()


def run(args) -> int:
  import jax
  init_distributed(args.distributed)
  from var_jax.config_loader import load_config
  from var_jax.train.var_trainer import VARTrainer
  cfg = load_config(args.config, getattr(args, 'overrides', []))
  summary = VARTrainer(cfg, args.workdir).train(stop_after=args.stop_after)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1), flush=True)
  return 0
