"""`var-jax train --config CONFIG --workdir DIR [--config.key=value ...]`: the VAR or the VQVAE.

The config decides the model (`config.task`: configs/var_*.py train the VAR,
configs/vqvae_*.py and digits_vqvae.py the VQVAE; `train-vqvae` is the same command).
Rerunning a command resumes from DIR. Exit status: 0 when training finished, 75 when it
stopped on a preemption notice after saving (run it again; the SLURM launcher requeues
on it), 2 for bad arguments or config values, 1 for files that are missing or unusable,
130 on Ctrl-C (a checkpoint save in progress finishes first); errors are one line unless
--debug or VAR_JAX_DEBUG=1.

Multi-host: with more than one process (TPU pod slice, SLURM, or JAX_COORDINATOR_ADDRESS /
JAX_NUM_PROCESSES / JAX_PROCESS_ID set) jax.distributed.initialize() runs first.
"""
from __future__ import annotations

import json
import os

from var_jax.commands._common import FAILURE, USAGE, CommandError, guarded, show_info_logs

ACCEPTS_OVERRIDES = True


def add_arguments(parser):
  parser.add_argument('--config', required=True,
                      help='config file (configs/var_d16.py, configs/vqvae_small.py, or path:arg), '
                           'see configs/')
  parser.add_argument('--workdir', required=True,
                      help='checkpoints, logs, TensorBoard, export (resumes if present)')
  parser.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                      help='call jax.distributed.initialize(): auto = on TPU pods, SLURM, or when '
                           'JAX_COORDINATOR_ADDRESS is set')
  parser.add_argument('--stop_after', type=int, default=None,
                      help='stop (with a checkpoint) after this many optimizer steps in total')
  parser.add_argument('--debug', action='store_true',
                      help='show the traceback of an error (also VAR_JAX_DEBUG=1)')


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


def debug_mode(args) -> bool:
  return bool(getattr(args, 'debug', False)) or os.environ.get('VAR_JAX_DEBUG') == '1'


def _run(args) -> int:
  from var_jax import safe_io
  safe_io.require_local(args.workdir, '--workdir')
  if args.stop_after is not None and args.stop_after < 1:
    raise CommandError(f'--stop_after must be >= 1 (optimizer steps in total), got '
                       f'{args.stop_after}', USAGE)
  show_info_logs()
  from var_jax.config_loader import load_config
  cfg = load_config(args.config, getattr(args, 'overrides', []))   # bad config: no jax start-up
  import jax
  init_distributed(args.distributed)
  from var_jax.data.tokens import TokensError
  from var_jax.train import loop
  try:
    _, summary = loop.train_and_evaluate(cfg, args.workdir, stop_after=args.stop_after)
  except (FloatingPointError, TokensError) as e:   # run.nan_policy=stop; an unusable tokens folder
    raise CommandError(str(e), FAILURE) from e
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1), flush=True)
  return loop.PREEMPTED_EXIT_CODE if summary['status'] == 'preempted' else 0


def run(args) -> int:
  if debug_mode(args):
    return int(_run(args))
  # signals: a Ctrl-C that a gc callback swallowed (jax has one) is sent again, not lost
  return guarded(args.command, _run, args, signals=True)
