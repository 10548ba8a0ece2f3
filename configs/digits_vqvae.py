"""The embedded digits tokenizer: a small multi-scale VQVAE on scikit-learn's digits at 32x32.

Command (the whole digits default, tokenizer then transformer, is launch/train_digits.sh):
  var-jax train-vqvae --config configs/digits_vqvae.py --workdir /tmp/digits_vqvae

Hardware/time: 2-core CPU shared with other jobs; see README.md ("The embedded digits model").
Model: f4 (ch_mult (1,1,2)), ch 32, one res block per level, mid attention, vocab 256,
Cvae 16, patch_nums (1,2,3,4,6,8) -> 32 px, 4 partially shared phi convs.
Loss: L1 + L2 + VQ (beta 0.25); no LPIPS/GAN (no downloads); EMA of the weights;
dead-code restarts during the first two thirds. Data: 1500 train digits (fixed split,
var_jax.data.digits), no flips (digits are not mirror-symmetric).
Expected result: README.md ("The embedded digits model") (held-out PSNR, codebook usage).
"""
from var_jax.config_loader import import_sibling

vq = import_sibling(__file__, 'vqvae_common')


def get_config():
  c = vq.vqvae_config()
  c.seed = 0
  c.model.update(dict(vocab_size=256, z_channels=16, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                      using_sa=False, using_mid_sa=True, patch_nums=(1, 2, 3, 4, 6, 8),
                      share_quant_resi=4))
  c.init.codebook = 0.0
  c.data = vq.common.data_section(kind='digits', mid_reso=1.0, hflip=False, num_threads=2,
                                  num_classes=10)
  c.loss.update(dict(l1=1.0, l2=1.0, vq=1.0))
  c.optim.update(dict(lr=2e-3, b1=0.9, b2=0.95, weight_decay=0.0, grad_clip=1.0, schedule='cos',
                      warmup_steps=50, final_lr=0.05))
  c.ema = 0.99
  c.codebook.update(dict(restart_every=100, restart_until=600, restart_threshold=0.05))
  c.batch_size = 32
  c.total_steps = 1000
  c.run = vq.common.run_section(log_every=100, save_every=500, keep=1, eval_every=250,
                                eval_batches=-1, export=True)
  return c
