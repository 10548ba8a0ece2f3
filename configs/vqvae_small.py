"""A small multi-scale VQVAE on synthetic images: CPU smoke test of train-vqvae, no download.

Command (CPU, about a minute):
  var-jax train-vqvae --config configs/vqvae_small.py --workdir /tmp/vq_small
  # with a discriminator from step 20:  --config.loss.disc=0.1 --config.loss.disc_start=20

Hardware/time: 2-core CPU, ~1 min for the default 60 steps (mostly compilation).
Model: f4 (ch_mult (1,1,2)), ch 32, vocab 64, Cvae 8, patch_nums (1,2,4,8) -> 32 px.
Expected result: eval/psnr about 13.2 dB at step 30 and 13.5 dB at step 60; usage logged per scale.
`get_config('folder')` gives the same model on an ImageNet-layout folder (data.path).
"""
from var_jax.config_loader import import_sibling

vq = import_sibling(__file__, 'vqvae_common')


def get_config(arg=None):
  c = vq.vqvae_config()
  c.model.update(dict(vocab_size=64, z_channels=8, ch=32, ch_mult=(1, 1, 2), num_res_blocks=1,
                      patch_nums=(1, 2, 4, 8), share_quant_resi=2))
  if arg == 'folder':
    c.data = vq.common.data_section(kind='folder', mid_reso=1.125, hflip=True, num_threads=4)
  else:
    c.data = vq.common.data_section(kind='synthetic', synthetic_examples=256, num_classes=10,
                                    num_threads=2, mid_reso=1.125)
  c.optim.update(dict(lr=2e-3, b1=0.9, b2=0.95, warmup_steps=5))
  c.codebook.update(dict(restart_every=20))
  c.batch_size = 16
  c.total_steps = 60
  c.run = vq.common.run_section(log_every=10, save_every=30, keep=2, eval_every=30, eval_batches=2)
  return c
