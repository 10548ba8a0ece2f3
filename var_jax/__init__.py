"""var_jax: VAR (next-scale prediction) in JAX/Flax."""
