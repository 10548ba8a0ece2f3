"""Streaming reader of ADM-format image batches: an .npz whose `arr_0` is uint8 NHWC.

    with NpzImages('samples.npz') as imgs:       # reads the header only
      for batch in imgs.batches(100):            # (<=100, H, W, 3) uint8, read as needed
        ...

50,000 samples at 256 x 256 are 9.8 GB, so the images are read from the zip member a
batch at a time (compressed members too), never whole. `var-jax demo`'s samples.npz
(key `images`) is read as well. Other arrays of the file (a reference batch's
precomputed `mu`/`sigma`/`mu_s`/`sigma_s`) come from `extra_arrays`.
"""
from __future__ import annotations

import os
import zipfile
from typing import Dict, Iterator, Sequence

import numpy as np

IMAGE_KEYS = ('arr_0', 'images')  # ADM's name first; `images` is var-jax demo's


def _read_header(f):
  """(shape, fortran_order, dtype) of an .npy stream, which is left at the data."""
  version = np.lib.format.read_magic(f)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(f)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(f)
  raise ValueError(f'unsupported .npy format version {version}')


class NpzImages:
  """The uint8 (N, H, W, C) image array of an .npz, validated from its header."""

  def __init__(self, path: str | os.PathLike, keys: Sequence[str] = IMAGE_KEYS):
    self.path = os.fspath(path)
    if not os.path.isfile(self.path):
      raise FileNotFoundError(f'file not found: {self.path}')
    try:
      self._zip = zipfile.ZipFile(self.path)
    except (zipfile.BadZipFile, OSError) as e:
      raise ValueError(f'{self.path} is not an .npz file ({e})') from e
    names = [n[:-4] for n in self._zip.namelist() if n.endswith('.npy')]
    self.key = next((k for k in keys if k in names), None)
    if self.key is None:
      self._zip.close()
      raise ValueError(f'{self.path} has no arr_0 (ADM format: uint8 NHWC images); '
                       f'it holds {sorted(names)}')
    with self._zip.open(f'{self.key}.npy') as f:
      try:
        self.shape, fortran, self.dtype = _read_header(f)
        header = f.tell()
      except (ValueError, OSError, zipfile.BadZipFile) as e:
        self._zip.close()
        raise ValueError(f'{self.path}: {self.key} is not a readable array ({e})') from e
    self._fortran = fortran
    if self.dtype != np.uint8:
      self._zip.close()
      raise ValueError(f'{self.path}: {self.key} must be uint8 images (0..255), got {self.dtype}')
    if len(self.shape) != 4 or self.shape[-1] not in (1, 3) or 0 in self.shape:
      self._zip.close()
      raise ValueError(f'{self.path}: {self.key} must be non-empty (N, H, W, 3) images, '
                       f'got shape {tuple(self.shape)}')
    row = int(np.prod(self.shape[1:]))
    size = self._zip.getinfo(f'{self.key}.npy').file_size - header
    if size < len(self) * row:
      self._zip.close()
      raise ValueError(f'{self.path}: {self.key} is truncated: it holds {size // row} of '
                       f'{len(self)} images')

  def __len__(self) -> int:
    return int(self.shape[0])

  def batches(self, batch_size: int) -> Iterator[np.ndarray]:
    """Consecutive (<= batch_size, H, W, C) blocks, read from the file as they are needed."""
    if self._fortran:  # rare: no row-contiguous layout to stream; read it whole
      arr = np.load(self.path)[self.key]
      for i in range(0, len(arr), batch_size):
        yield np.ascontiguousarray(arr[i:i + batch_size])
      return
    row = int(np.prod(self.shape[1:]))
    with self._zip.open(f'{self.key}.npy') as f:
      _read_header(f)
      for i in range(0, len(self), batch_size):
        n = min(batch_size, len(self) - i)
        data = f.read(n * row)
        if len(data) != n * row:
          raise ValueError(f'{self.path}: {self.key} is truncated (image {i + len(data) // row} '
                           f'of {len(self)})')
        yield np.frombuffer(data, np.uint8).reshape((n,) + tuple(self.shape[1:]))

  def close(self) -> None:
    self._zip.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def extra_arrays(path: str | os.PathLike, keys: Sequence[str]) -> Dict[str, np.ndarray]:
  """The arrays among `keys` that the .npz holds (e.g. a reference batch's mu/sigma)."""
  with np.load(os.fspath(path)) as z:
    return {k: z[k] for k in keys if k in z.files}
