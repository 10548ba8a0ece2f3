"""Evaluation metrics (PSNR, SSIM, codebook usage)."""
