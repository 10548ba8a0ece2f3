"""`var-jax train-vqvae --config configs/vqvae_small.py --workdir DIR [--config.key=value ...]`.

Trains the multi-scale VQVAE (var_jax.train.vqvae_trainer); resumes from DIR if it holds
checkpoints; at the end writes DIR/export, a native checkpoint for `var_jax.load` and for
the VAR trainer's config.vae.checkpoint.
"""
from __future__ import annotations

import json

ACCEPTS_OVERRIDES = True


def add_arguments(parser):
  parser.add_argument('--config', required=True,
                      help='config file (configs/vqvae_small.py, configs/digits_vqvae.py, '
                           'configs/vqvae_f16_release.py, or path:arg)')
  parser.add_argument('--workdir', required=True, help='checkpoints, logs, export (resumes if present)')
  parser.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                      help='call jax.distributed.initialize() (auto: on pods / SLURM / JAX_COORDINATOR_ADDRESS)')
  parser.add_argument('--stop_after', type=int, default=None,
                      help='stop (with a checkpoint) after this many steps in total')


def run(args) -> int:
  import jax
  from var_jax.commands.train import init_distributed
  init_distributed(args.distributed)
  from var_jax.config_loader import load_config
  from var_jax.train.vqvae_trainer import VQVAETrainer
  cfg = load_config(args.config, getattr(args, 'overrides', []))
  summary = VQVAETrainer(cfg, args.workdir).train(stop_after=args.stop_after)
  if jax.process_index() == 0:
    print(json.dumps(summary, indent=1), flush=True)
  return 0
