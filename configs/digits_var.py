"""The embedded digits transformer: a small class-conditional VAR on scikit-learn's digits.

Command (after configs/digits_vqvae.py; launch/train_digits.sh runs both and installs
the result in var_jax/assets/digits):
  var-jax train --config configs/digits_var.py --workdir /tmp/digits_var \
      --config.vae.checkpoint=/tmp/digits_vqvae/export

Hardware/time: 2-core CPU shared with other jobs; see README.md ("The embedded digits model").
Model: depth 4, width 128, 4 heads, 10 classes, class dropout 0.1 (for guidance),
patch_nums (1,2,3,4,6,8) = 130 tokens over the digits tokenizer (vocab 256, Cvae 16).
Default tokenizer: the one shipped in var_jax/assets/digits, so the transformer can be
retrained alone; the script points it at a freshly trained one.
Expected result: README.md ("The embedded digits model") (classifier accuracy of the samples, diversity).
"""
import os

from var_jax.config_loader import import_sibling

common = import_sibling(__file__, 'common')
ASSET = os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'var_jax', 'assets', 'digits')


def get_config():
  c = common.var_config(depth=4, patch_nums=(1, 2, 3, 4, 6, 8))
  c.seed = 0
  c.model.update(dict(embed_dim=128, num_heads=4, num_classes=10, drop_path_rate=0.0,
                      cond_drop_rate=0.1))
  c.vae.update(dict(checkpoint=os.path.normpath(ASSET), vocab_size=256, z_channels=16, ch=32,
                    ch_mult=(1, 1, 2), num_res_blocks=1, using_sa=False, using_mid_sa=True,
                    quant_resi=0.5, share_quant_resi=4, dtype='float32',
                    precision='highest'))
  c.data = common.data_section(kind='digits', mid_reso=1.0, hflip=False, num_threads=2,
                               num_classes=10)
  c.optim.update(dict(lr=1e-3, grad_clip=2.0, weight_decay=0.05, warmup_epochs=0.0,
                      final_lr=0.05))
  c.batch_size = 64
  c.total_steps = 1500
  c.dtype = 'float32'
  c.run = common.run_section(log_every=100, save_every=500, keep=1, eval_every=500,
                             eval_batches=-1, export=True)
  return c
