"""Image and array files for the command line: PNG grids, token npz files, and
resumable chunked output for large sampling runs. Every file is written through
var_jax.safe_io.atomic_write (complete under its name, or absent).

`ChunkedRun` keeps the finished chunks of a long job in a sidecar folder
`<out>.parts/` (one `chunk_NNNNNN.npz` per batch, each written to a temporary
name and renamed, so a chunk file is either complete or absent) with a
`manifest.json` of the run's settings. Rerunning the same command skips the
chunks already there; a rerun with different settings is refused instead of
mixing samples. `write_npz_streaming` then assembles the chunks into one
`.npz` without holding the whole array in memory (50 x 1000 images of 256 px
are 9.8 GB).
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import zipfile
from typing import Any, Callable, Dict, Iterable, Mapping, Sequence

import numpy as np

from var_jax.safe_io import atomic_write, sweep_stale


# --- images ----------------------------------------------------------------------

def to_uint8(images: Any, low: float = 0.0) -> np.ndarray:
  """Float images in [low, 1] -> uint8 (x -> round(255 x), the torchvision rule)."""
  x = np.asarray(images, np.float32)
  if low == -1.0:
    x = (x + 1) / 2
  return np.clip(np.floor(x * 255 + 0.5), 0, 255).astype(np.uint8)


def make_grid(images_BHWC: np.ndarray, nrow: int = 8, padding: int = 2, pad_value: int = 0) -> np.ndarray:
  """Tiles uint8 NHWC images into one (H, W, C) image, `nrow` per row (torchvision layout)."""
  x = np.asarray(images_BHWC)
  if x.ndim != 4:
    raise ValueError(f'expected NHWC images, got shape {x.shape}')
  b, h, w, c = x.shape
  cols = max(1, min(nrow, b))
  rows = -(-b // cols)
  grid = np.full((rows * (h + padding) + padding, cols * (w + padding) + padding, c), pad_value, x.dtype)
  for i in range(b):
    r, q = divmod(i, cols)
    y0, x0 = padding + r * (h + padding), padding + q * (w + padding)
    grid[y0:y0 + h, x0:x0 + w] = x[i]
  return grid


def save_png(path: str | os.PathLike, image_HWC: np.ndarray) -> None:
  """A PNG at `path`, atomically (never a partial image under that name)."""
  from PIL import Image
  with atomic_write(path) as f:
    Image.fromarray(np.asarray(image_HWC, np.uint8)).save(f, format='PNG')


def eight_bit(im, path=None):
  """`im` in an 8-bit mode: 16-bit greys (PNG, TIFF: modes I;16*, I) scaled to 0..255, as
  viewers show them (PIL's convert would clip every value above 255 to white). One rule
  for every reader: the commands' images and masks, and the training data."""
  from PIL import Image
  if im.mode.startswith('I;16') or im.mode == 'I':
    v = np.asarray(im, np.float64) / 257
    return Image.fromarray(np.clip(np.round(v), 0, 255).astype(np.uint8), 'L')
  if im.mode == 'F':
    raise ValueError(f'{path or "image"} holds floating-point pixels; save it as an 8- or 16-bit image')
  return im


def _opaque(im, path):
  """`im` if no pixel is transparent, else ValueError: the colours stored under transparent
  pixels (often black, or anything) are not what a viewer shows, and dropping the alpha
  channel would silently edit or encode them."""
  if im.mode in ('RGBA', 'LA', 'PA', 'RGBa', 'La') or 'transparency' in im.info:
    alpha = np.asarray(im.convert('RGBA'))[..., 3]
    if alpha.min() < 255:
      raise ValueError(f'{path} has transparent pixels ({int((alpha < 255).sum())} of '
                       f'{alpha.size}); flatten it onto a background first')
  return im


def _as_seen(im, path):
  """`im` as image viewers show it, in an 8-bit mode: turned by its EXIF orientation (a
  camera's photo stored sideways), so that a mask or box drawn on it lines up; images
  with transparent pixels are refused (`_opaque`)."""
  from PIL import ImageOps
  return _opaque(eight_bit(ImageOps.exif_transpose(im), path), path)


def read_image(path: str | os.PathLike, mode: str = 'RGB') -> np.ndarray:
  """An image file as uint8 (H, W, 3) for mode 'RGB' or (H, W) for 'L', at its own size
  as viewers show it (EXIF orientation applied, 16-bit images scaled to 8 bits)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      return np.asarray(_as_seen(im, path).convert(mode), np.uint8)
  except FileNotFoundError:
    raise
  except OSError as e:
    raise ValueError(f'cannot read image {path}: {e}') from e


def load_image(path: str | os.PathLike, size: int) -> np.ndarray:
  """An RGB image resized (shorter side, Lanczos) and centre-cropped to size x size,
  as float32 HWC in [-1, 1] (as viewers show it: see read_image)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im = _as_seen(im, path).convert('RGB')
      w, h = im.size
      s = size / min(w, h)
      nw, nh = max(size, round(w * s)), max(size, round(h * s))
      im = im.resize((nw, nh), Image.LANCZOS)
      left, top = (nw - size) // 2, (nh - size) // 2
      im = im.crop((left, top, left + size, top + size))
      x = np.asarray(im, np.float32)
  except FileNotFoundError:
    raise
  except OSError as e:
    raise ValueError(f'cannot read image {path}: {e}') from e
  return x / 127.5 - 1.0


# --- arrays ----------------------------------------------------------------------

def save_npz(path: str | os.PathLike, arrays: Mapping[str, np.ndarray]) -> None:
  """np.savez to `path` exactly (no '.npz' appended), atomically."""
  with atomic_write(path) as f:
    np.savez(f, **{k: np.asarray(v) for k, v in arrays.items()})


def tokens_to_arrays(tokens: Sequence[Any]) -> Dict[str, np.ndarray]:
  """idx_0 .. idx_{K-1}: int32 (B, pn_k^2)."""
  return {f'idx_{k}': np.asarray(t, np.int32) for k, t in enumerate(tokens)}


def write_npz_streaming(path: str | os.PathLike, name: str, shape: Sequence[int], dtype: Any,
                        parts: Iterable[np.ndarray]) -> None:
  """Writes an .npz holding one array `name` of `shape`, from row blocks streamed in order."""
  dtype = np.dtype(dtype)
  rows = 0
  with atomic_write(path) as fh:
    with zipfile.ZipFile(fh, 'w', zipfile.ZIP_STORED, allowZip64=True) as zf:
      with zf.open(f'{name}.npy', 'w', force_zip64=True) as f:
        np.lib.format.write_array_header_2_0(
            f, {'descr': np.lib.format.dtype_to_descr(dtype), 'fortran_order': False,
                'shape': tuple(int(s) for s in shape)})
        for part in parts:
          part = np.ascontiguousarray(part, dtype)
          if part.shape[1:] != tuple(shape[1:]):
            raise ValueError(f'chunk of shape {part.shape} does not fit {tuple(shape)}')
          f.write(memoryview(part.reshape(-1).view(np.uint8)))
          rows += part.shape[0]
    if rows != shape[0]:
      raise ValueError(f'streamed {rows} rows, expected {shape[0]}')


class ChunkedRun:
  """Finished chunks of a long job under `<out>.parts/`, resumable after interruption.

  The folder is known as this job's own by its manifest.json: the same settings resume,
  other settings are refused, and a folder without a manifest that holds anything is
  never touched. Before writing its final outputs a run lists them in outputs.json, so a
  rerun after a kill during that last step may replace those (its own) files.
  """
  MANIFEST, OUTPUTS = 'manifest.json', 'outputs.json'

  def __init__(self, out_path: str | os.PathLike, manifest: Mapping[str, Any], *,
               create: bool = True):
    self.out = pathlib.Path(out_path)
    self.dir = self.out.with_name(self.out.name + '.parts')
    self.manifest = json.loads(json.dumps(dict(manifest)))  # normalised (tuples -> lists)
    self.resuming = self._check()
    if create:
      self.dir.mkdir(parents=True, exist_ok=True)
      sweep_stale(self.dir, inside=True)
      if not self.resuming:
        with atomic_write(self.dir / self.MANIFEST, 'w') as f:
          json.dump(self.manifest, f, indent=1, sort_keys=True)

  def _check(self) -> bool:
    """True when the folder holds chunks of this very run; raises when it is not ours."""
    if not os.path.lexists(self.dir):
      return False
    if not self.dir.is_dir():
      raise FileExistsError(f'{self.dir} exists and is not a folder; move it away')
    mf = self.dir / self.MANIFEST
    if not mf.is_file():
      if any(self.dir.iterdir()):
        raise FileExistsError(f'{self.dir} is not a folder of chunks (no {self.MANIFEST}); '
                              'refusing to write into it: move it away')
      return False
    try:
      old = json.loads(mf.read_text())
    except (ValueError, UnicodeDecodeError):
      raise FileExistsError(f'{mf} is unreadable; move {self.dir} away') from None
    if old != self.manifest:
      diff = sorted(k for k in set(old) | set(self.manifest) if old.get(k) != self.manifest.get(k))
      raise ValueError(f'{self.dir} holds chunks of a run with other settings ({", ".join(diff)}); '
                       'rerun with the same arguments to resume, or delete that folder')
    return True

  def claims(self, path: str | os.PathLike | None) -> bool:
    """Whether `path` is a final output this run began to write (see `claim`)."""
    f = self.dir / self.OUTPUTS
    if path is None or not self.resuming or not f.is_file():
      return False
    try:
      return os.path.abspath(path) in json.loads(f.read_text())
    except (ValueError, UnicodeDecodeError):
      return False

  def claim(self, paths: Iterable[str | os.PathLike | None]) -> None:
    """Records the final outputs about to be written (before writing them)."""
    with atomic_write(self.dir / self.OUTPUTS, 'w') as f:
      json.dump(sorted(os.path.abspath(p) for p in paths if p), f, indent=1)

  def path(self, i: int) -> pathlib.Path:
    return self.dir / f'chunk_{i:06d}.npz'

  def done(self, i: int) -> bool:
    return self.path(i).is_file()

  def write(self, i: int, arrays: Mapping[str, np.ndarray]) -> None:
    save_npz(self.path(i), arrays)

  def read(self, i: int, key: str | None = None):
    with np.load(self.path(i)) as z:
      return z[key] if key is not None else {k: z[k] for k in z.files}

  def cleanup(self) -> None:
    """Removes the folder: renamed first to `.<out>.tmp-<pid>` (atomic), so that a run
    stopped while deleting thousands of chunks leaves no manifest-less `.parts` folder
    (refused by every later run) but a temporary that the next run's
    safe_io.check_output(out) sweeps."""
    trash = self.out.with_name(f'.{self.out.name}.tmp-{os.getpid()}')
    os.replace(self.dir, trash)
    shutil.rmtree(trash, ignore_errors=True)


def pipelined(indices: Iterable[int], start: Callable[[int], Any], finish: Callable[[Any], Any]):
  """Yields (i, finish(start(i))) in order, calling start(i + 1) before finish(i): with an
  asynchronous start (a jax dispatch), the host's finishing work overlaps the next item."""
  pending = None
  for i in indices:
    handle = (i, start(i))
    if pending is not None:
      yield pending[0], finish(pending[1])
    pending = handle
  if pending is not None:
    yield pending[0], finish(pending[1])


def run_chunks(run: ChunkedRun, num_chunks: int, start: Callable[[int], Any],
               finish: Callable[[Any], Mapping[str, np.ndarray]] | None = None, *,
               stop_after: int | None = None, progress: bool = True, desc: str = 'chunks',
               on_done: Callable[[Mapping[str, np.ndarray], Any], None] | None = None) -> int:
  """Makes every missing chunk (at most `stop_after` new ones); returns how many are missing after.

  start(i) begins chunk i and returns a handle; finish(handle) returns its arrays (without
  finish, start returns them). Chunk i+1 is started before chunk i is finished and
  written (`pipelined`). on_done(arrays, progress_bar) is called after each write.
  """
  from tqdm import tqdm
  finish = finish or (lambda arrays: arrays)
  missing = [i for i in range(num_chunks) if not run.done(i)]
  todo = missing if stop_after is None else missing[:stop_after]
  with tqdm(total=num_chunks, initial=num_chunks - len(missing), desc=desc, disable=not progress,
            unit='chunk') as bar:
    for i, arrays in pipelined(todo, start, finish):
      run.write(i, arrays)
      if on_done is not None:
        on_done(arrays, bar)
      bar.update(1)
  return sum(not run.done(i) for i in range(num_chunks))
