"""A tiny VAR on synthetic images: CPU smoke test of the whole training stack, no download.

Command (CPU, seconds):
  var-jax train --config configs/var_tiny.py --workdir /tmp/var_tiny
  # e.g. --config.total_steps=50 --config.batch_size=16 --config.run.nan_policy=skip
  # from pre-tokenised data: var-jax tokenize --config configs/var_tiny.py --out /tmp/var_tiny_tokens
  #   then --config.data.kind=tokens --config.data.path=/tmp/var_tiny_tokens

Hardware/time: 2-core CPU, about 20 s for the default 60 steps, most of it compiling.
Expected result: train/L_mean falls from ~ln(64)=4.16 to ~2.9 at step 60
(the tokenizer is a randomly initialised tiny VQVAE: tokens are deterministic
functions of the images, which the model learns to predict).
Model: patch_nums (1,2,3,4) -> 64 px, VQVAE vocab 64, Cvae 8, ch 32 (smaller encoder);
VAR depth 2, width 64, 2 heads, 10 classes. f32 compute (CPU).
"""
from var_jax.config_loader import import_sibling

common = import_sibling(__file__, 'common')


def get_config():
  c = common.var_config(depth=2, patch_nums=(1, 2, 3, 4))
  c.model.update(dict(embed_dim=64, num_heads=2, num_classes=10, drop_path_rate=0.0))
  c.init.adaln = 1e-2
  c.vae.update(dict(checkpoint='', vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 1, 2, 2),
                    num_res_blocks=1, using_sa=True, using_mid_sa=True))
  c.data = common.data_section(kind='synthetic', synthetic_examples=256, num_classes=10, num_threads=2)
  c.optim.update(dict(base_lr=1e-3 * 256 / 16, warmup_epochs=0.0))
  c.batch_size = 16
  c.ep = 4
  c.total_steps = 60
  c.dtype = 'float32'
  c.run = common.run_section(log_every=10, save_every=30, keep=2, eval_every=30, eval_batches=2)
  return c
