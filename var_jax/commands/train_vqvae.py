"""`var-jax train-vqvae`: the same command as `var-jax train` (the config decides the model).

    var-jax train-vqvae --config configs/vqvae_small.py --workdir DIR [--config.key=value ...]

Kept for existing scripts; see var_jax.commands.train.
"""
from var_jax.commands.train import ACCEPTS_OVERRIDES, add_arguments, run  # noqa: F401
