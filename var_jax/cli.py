"""`var-jax` console command: one subcommand per job, each in var_jax/commands/.

Each command module defines `add_arguments(parser)` and `run(args) -> int`
(and `ACCEPTS_OVERRIDES = True` to receive unparsed `--config.key=value` flags
as `args.overrides`); it is
imported only when its subcommand is used, so `var-jax demo` never pays for the
trainer's imports. Run as the console command, jax's persistent compilation cache
is on (commands._common.enable_compilation_cache: ~/.cache/var_jax/jax_cache, or
$VAR_JAX_COMPILATION_CACHE; =off disables it), so a second run skips compiling.

Errors are one line (a second for a hint), exit status 2 for bad arguments and 1 for
bad or protected files, without a traceback unless --debug (any command) or
VAR_JAX_DEBUG=1; see commands._common.guarded.
"""
from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS = {
    'demo': ('var_jax.commands.demo', 'sample every class from the embedded digits model'),
    'convert': ('var_jax.commands.convert', 'reference .pth files -> native var_jax checkpoint'),
    'sample': ('var_jax.commands.sample', 'class-conditional sampling from a checkpoint'),
    'reconstruct': ('var_jax.commands.reconstruct', 'encode and decode images with the VQVAE'),
    'edit': ('var_jax.commands.edit', 'zero-shot in-painting, out-painting, class-conditional editing'),
    'train': ('var_jax.commands.train', 'train the VAR transformer or the VQVAE (the config decides)'),
    'train-vqvae': ('var_jax.commands.train_vqvae', 'the same as train (kept for scripts)'),
    'tokenize': ('var_jax.commands.tokenize', 'encode a data set once with the frozen tokenizer'),
    'eval': ('var_jax.commands.eval', 'FID, sFID, IS, precision/recall of a sample batch'),
}


class _Parser(argparse.ArgumentParser):
  """argparse with a two-line error: the message, then where the options are listed
  (instead of the whole usage text); exit status 2."""

  def error(self, message):
    self.exit(2, f'{self.prog}: error: {message}\n(`{self.prog} --help` lists the options)\n')


def main(argv=None) -> int:
  console = argv is None      # the console command (library callers pass argv)
  argv = sys.argv[1:] if argv is None else argv
  parser = _Parser(prog='var-jax', description=__doc__.splitlines()[0])
  sub = parser.add_subparsers(dest='command', metavar='COMMAND', required=True)
  name = next((a for a in argv if not a.startswith('-')), None)
  parsers = {}
  for cmd, (module, help_) in COMMANDS.items():
    p = parsers[cmd] = sub.add_parser(cmd, help=help_, conflict_handler='resolve')
    if cmd == name:  # import only the command being run
      p.add_argument('--debug', action='store_true',
                     help='show the traceback of an error (also VAR_JAX_DEBUG=1)')
      importlib.import_module(module).add_arguments(p)
  args, rest = parser.parse_known_args(argv)
  module = importlib.import_module(COMMANDS[args.command][0])
  args.console = console
  if console:
    from var_jax.commands._common import enable_compilation_cache
    enable_compilation_cache()
  if getattr(module, 'ACCEPTS_OVERRIDES', False):  # e.g. --config.lr=3e-4
    args.overrides = rest
  elif rest:
    parsers[args.command].error(f'unrecognized arguments: {" ".join(rest)}')
  return int(module.run(args) or 0)


if __name__ == '__main__':
  sys.exit(main())
