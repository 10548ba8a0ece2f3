"""VAR-16 on ImageNet 256 px: the reference recipe (README: --depth=16 --bs=768 --ep=200 --fp16=1 --alng=1e-3 --wpe=0.1).

Command (8 hosts x 8 accelerators or any mesh; batch is global):
  var-jax train --config configs/var_d16.py --workdir /shared/ckpt/var_d16 \
    --config.data.path=/data/imagenet   # train/<class>/*.JPEG, val/<class>/*.JPEG
  # /shared: a file system every host mounts at that path (NFS/Filestore, gcsfuse), not a gs:// URL
  # TFDS instead: --config.data.kind=tfds --config.data.tfds_name=imagenet2012 --config.data.path=TFDS_DIR
  # bigger models: --config.mesh.fsdp=8 (FSDP) and/or --config.mesh.tensor=N
  # no encoder in the step: encode once, then train from the tokens (crop/flip variants kept)
  #   var-jax tokenize --config configs/var_d16.py --out /data/in256_tokens --crops 4 --flip \
  #     --config.data.path=/data/imagenet
  #   var-jax train ... --config.data.kind=tokens --config.data.path=/data/in256_tokens
Speed options (see configs/common.py for what each costs and buys): model.attention='auto'
(cuDNN flash attention on GPUs, splash on TPUs), vae.precision='default' (TF32 tokenizer
convs, like the reference trainer), model.remat='dots_attention_saveable' (keep matmul
outputs and the attention's, recompute the rest), model.scan_blocks=True (False: unrolled
blocks, no stacked activation buffers; not yet timed); `benchmarks/train_bench.py --sweep`
measures them. Measured on one H100 (2026-11-23, batch 64 per GPU, random weights) with
remat='dots_saveable' (which also reruns the attention forward in the backward pass;
the new default is not yet measured on a GPU): images tokenised in the step 280 ms/step
= 228 images/s, 22 GiB peak, MFU 21.5%; from pre-tokenised data (data.kind=tokens) 207
ms/step = 309 images/s, MFU 29%; the reference trainer ran 126.9 images/s in 45 GiB on
the same machine.

Hardware/time: not run at full scale in this repository. The reference trained it
on A100 nodes in fp16; this port uses bf16 compute with f32 master weights.
Expected result (reference model zoo, 50k samples, cfg 1.5): FID 3.55, about 310M params.
The frozen tokenizer is the released vae_ch160v4096z32.pth (config.vae.checkpoint).
"""
from var_jax.config_loader import import_sibling

common = import_sibling(__file__, 'common')


def get_config():
  return common.var_config(
      depth=16, patch_nums=common.PN_256,
      **{'batch_size': 768, 'ep': 200, 'optim.base_lr': 1e-4, 'init.adaln_gamma': 1e-3,
         'optim.final_lr': 0.1, 'optim.weight_decay_end': -1.0, 'model.shared_aln': False,
         'run.save_every': 2000, 'run.log_every': 100})
