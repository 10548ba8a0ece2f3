"""VQVAE tokenizer: encoder/decoder (layers), multi-scale quantizer, and the VQVAE module."""
from var_jax.tokenizer.flops import vqvae_flops
from var_jax.tokenizer.quantizer import MultiScaleQuantizer
from var_jax.tokenizer.vqvae import VQVAE

__all__ = ['VQVAE', 'MultiScaleQuantizer', 'vqvae_flops']
