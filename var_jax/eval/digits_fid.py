"""FID for the digits model in a feature space that needs no download.

    r = digits_fid(images_NHWC_uint8)   # {'fid', 'fid_train_vs_test', 'precision', 'recall', ...}

The Inception network does not suit 8x8 digits (and its weights are a download), so the
features are those of a small classifier trained here on the real train digits: an MLP
(64 -> 64 ReLU -> 10 classes, scikit-learn L-BFGS, fixed seed; 95% on the test digits)
whose hidden-layer activations are the features, as pool3 is Inception's penultimate
layer. Samples and real digits go through the same path: 32x32 uint8 -> 8x8 means
(data.digits.to_8x8_features) -> MLP. The reference is the 297 held-out test digits.
`fid_train_vs_test` scores as many real train digits (a fixed random subset, all 1500
at most) against the same reference: the floor a perfect generator would reach with
this many images, as FID is biased upwards for small sets.
"""
from __future__ import annotations

import functools
from typing import Dict

import numpy as np

from var_jax.data import digits
from var_jax.eval import metrics

HIDDEN = 64
SEED = 0


@functools.lru_cache(maxsize=None)
def fit_feature_net():
  """The MLP classifier on the real 8x8 train digits (features in [0, 1]); deterministic."""
  from sklearn.neural_network import MLPClassifier
  images, labels = digits.digits_arrays('train')
  clf = MLPClassifier(hidden_layer_sizes=(HIDDEN,), activation='relu', alpha=1e-3,
                      solver='lbfgs', max_iter=500, random_state=SEED)  # ~50 iterations
  clf.fit(digits.to_8x8_features(images), labels)
  return clf


def digit_features(images_NHWC: np.ndarray) -> np.ndarray:
  """(N, 64) float64 hidden-layer activations of 32x32 digit images."""
  clf = fit_feature_net()
  x = digits.to_8x8_features(images_NHWC).astype(np.float64)
  return np.maximum(x @ clf.coefs_[0] + clf.intercepts_[0], 0.0)


def digits_fid(images_NHWC: np.ndarray, k: int = 3) -> Dict[str, float]:
  """FID / precision / recall of 32x32 uint8 digit images against the held-out digits."""
  test, test_y = digits.digits_arrays('test')
  train, _ = digits.digits_arrays('train')
  n = min(len(images_NHWC), len(train))
  train = train[np.random.default_rng(SEED).permutation(len(train))[:n]]
  real, fake = digit_features(test), digit_features(images_NHWC)
  clf = fit_feature_net()
  return {
      'fid': metrics.fid_from_features(fake, real),
      'fid_train_vs_test': metrics.fid_from_features(digit_features(train), real),
      **metrics.precision_recall(real, fake, k=k),
      'feature_net_test_accuracy': float(clf.score(digits.to_8x8_features(test), test_y)),
      'n_samples': int(len(images_NHWC)), 'n_ref': int(len(test)),
  }
