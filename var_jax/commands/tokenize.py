"""`var-jax tokenize --config CONFIG --out DIR [--crops N] [--flip|--no-flip]`: encode once.

Encodes the training split (N random crops per image, their mirror images with --flip;
default: config.data.hflip) and the eval split (centre crops) with the frozen tokenizer
of the config (config.vae), into ArrayRecord shards of token maps and labels under DIR
(var_jax.train.tokenize). Then train without the encoder in the step:

    var-jax train --config CONFIG --workdir W --config.data.kind=tokens --config.data.path=DIR

Every process of a multi-host job encodes its share of the shards (same launchers as
`var-jax train`); a killed run, rerun with the same command, keeps the finished shards.
DIR must be new, empty, or an unfinished run of the same command: anything else is refused.
"""
from __future__ import annotations

import argparse

from var_jax.commands._common import FAILURE, USAGE, CommandError, guarded, show_info_logs
from var_jax.commands.train import debug_mode, init_distributed

ACCEPTS_OVERRIDES = True


def add_arguments(parser):
  parser.add_argument('--config', required=True, help='the training config (configs/var_d16.py, ...)')
  parser.add_argument('--out', required=True, help='the tokens folder to write (new or empty)')
  parser.add_argument('--crops', type=int, default=1,
                      help='random crops per training image (each an epoch-level variant)')
  parser.add_argument('--flip', action=argparse.BooleanOptionalAction, default=None,
                      help='also store the mirror image of every crop (default: config.data.hflip)')
  parser.add_argument('--shard-size', type=int, default=1024, help='images per shard')
  parser.add_argument('--batch-size', type=int, default=64, help='images per encoder call')
  parser.add_argument('--threads', type=int, default=8, help='image decoding threads')
  parser.add_argument('--distributed', choices=('auto', 'on', 'off'), default='auto',
                      help='call jax.distributed.initialize() (see var-jax train)')
  parser.add_argument('--debug', action='store_true', help='show the traceback of an error')


def _run(args) -> int:
  show_info_logs()
  if args.crops < 1 or args.shard_size < 1 or args.batch_size < 1 or args.threads < 1:
    raise CommandError('--crops, --shard-size, --batch-size and --threads must be >= 1', USAGE)
  from var_jax import safe_io
  safe_io.require_local(args.out, '--out')
  from var_jax.config_loader import load_config
  cfg = load_config(args.config, getattr(args, 'overrides', []))
  init_distributed(args.distributed)
  from var_jax.data.tokens import TokensError
  from var_jax.train import tokenize
  try:
    tokenize.tokenize(cfg, args.out, crops=args.crops, flip=args.flip, shard_size=args.shard_size,
                      batch_size=args.batch_size, num_threads=args.threads)
  except TokensError as e:   # --out holds something that is not our tokens folder
    raise CommandError(str(e), FAILURE) from e
  return 0


def run(args) -> int:
  if debug_mode(args):
    return int(_run(args))
  # signals: SIGTERM/Ctrl-C end with the one-line message after the shard being written
  # is complete (train.tokenize writes each inside safe_io.uninterruptible)
  return guarded('tokenize', _run, args, signals=True)
