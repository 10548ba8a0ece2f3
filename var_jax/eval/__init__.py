"""Evaluation: reconstruction metrics and FID / sFID / IS / precision-recall of samples.

metrics         PSNR, SSIM, codebook usage; Frechet distance, Inception Score, k-NN
                precision/recall (numpy/scipy statistics, distances on the device)
inception       the FID InceptionV3 in Flax with pytorch-fid's weights (`load(path)`)
evaluate        scores ADM-format .npz batches (what `var-jax eval` runs), reference cache
npz             streaming reader of ADM-format image batches
weights_recipe  deterministic random Inception weights (numpy only) for tests and benchmarks
digits_fid      FID of digits samples in a small classifier's features (no download)
"""
