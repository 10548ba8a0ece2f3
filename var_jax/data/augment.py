"""The reference's image augmentation (utils/data.py) on PIL images, torchvision semantics.

train: [hflip p=0.5] -> shorter side to round(mid_reso * size) with LANCZOS -> random crop;
eval:  shorter side to round(mid_reso * size) with LANCZOS -> centre crop.
Output uint8 HWC (normalise with `to_pm1`: x/255*2-1, bit-equal to ToTensor + x+x-1).
Randomness comes from a numpy Generator the caller seeds per example, so the
result depends only on (seed, example position), never on worker or host count.
"""
from __future__ import annotations

import numpy as np
from PIL import Image


def mid_size(final_reso: int, mid_reso: float = 1.125) -> int:
  return round(mid_reso * final_reso)


def resize_shorter(img: Image.Image, size: int) -> Image.Image:
  """torchvision Resize(int): shorter side -> size, longer side int(size * long / short)."""
  w, h = img.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return img
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  return img.resize((new_w, new_h), Image.LANCZOS)


def center_crop(arr: np.ndarray, size: int) -> np.ndarray:
  h, w = arr.shape[:2]
  if h < size or w < size:
    raise ValueError(f'image {h}x{w} smaller than crop {size}')
  top, left = int(round((h - size) / 2.0)), int(round((w - size) / 2.0))
  return arr[top:top + size, left:left + size]


def random_crop(arr: np.ndarray, size: int, rng: np.random.Generator) -> np.ndarray:
  h, w = arr.shape[:2]
  if h < size or w < size:
    raise ValueError(f'image {h}x{w} smaller than crop {size}')
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return arr[top:top + size, left:left + size]


def to_rgb(img: Image.Image) -> Image.Image:
  """The RGB image of any PIL mode; 16-bit greys scaled to 8 bits (io_utils.eight_bit),
  where PIL's convert('RGB') clips them to white."""
  from var_jax import io_utils
  return io_utils.eight_bit(img).convert('RGB')


def augment(img: Image.Image, final_reso: int, *, train: bool, rng: np.random.Generator | None = None,
            mid_reso: float = 1.125, hflip: bool = False) -> np.ndarray:
  """PIL image -> uint8 (final_reso, final_reso, 3)."""
  img = to_rgb(img)
  if train:
    if rng is None:
      raise ValueError('train augmentation needs an rng')
    if hflip and rng.random() < 0.5:
      img = img.transpose(Image.FLIP_LEFT_RIGHT)
  arr = np.asarray(resize_shorter(img, mid_size(final_reso, mid_reso)), dtype=np.uint8)
  return random_crop(arr, final_reso, rng) if train else center_crop(arr, final_reso)


def to_pm1(x_uint8):
  """uint8 -> float32 in [-1, 1] (numpy or jax arrays)."""
  return (x_uint8.astype('float32') / 255.0) * 2.0 - 1.0
