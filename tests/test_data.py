"""Input pipeline tests: image folders (with a corrupt file), TFDS mock data, augmentation."""
import os
import shutil

import numpy as np
import pytest
from PIL import Image

import grain
from var_jax.data import augment, images


@pytest.fixture(scope='module')
def folder(tmp_path_factory):
  """root/train/<class>/*.png: 3 classes x 4 images of varied sizes, plus one corrupt file."""
  root = tmp_path_factory.mktemp('imgs')
  rng = np.random.default_rng(0)
  for c, name in enumerate(['cat', 'dog', 'eel']):
    d = root / 'train' / name
    d.mkdir(parents=True)
    for i in range(4):
      h, w = 20 + 3 * i, 28 - 2 * i
      arr = (rng.uniform(0, 255, (h, w, 3)) * 0 + 60 * c + 10 * i).astype(np.uint8)
      Image.fromarray(arr).save(d / f'{i}.png')
  (root / 'train' / 'dog' / 'broken.png').write_bytes(b'\x89PNG not really an image')
  (root / 'train' / 'eel' / 'notes.txt').write_text('ignored: not an image extension')
  return root


def test_folder_source_labels(folder):
  src = images.FolderSource(str(folder / 'train'))
  assert src.classes == ['cat', 'dog', 'eel'] and len(src) == 13
  assert [r[1] for r in src.items].count(1) == 5
  with pytest.raises(ValueError, match='not found'):
    images.FolderSource(str(folder / 'nope'))


def test_hidden_files_and_folders_are_not_classes_or_images(folder, tmp_path):
  """Jupyter's .ipynb_checkpoints must not become class 0 (shifting every label), nor
  macOS's ._x.png resource forks images."""
  root = tmp_path / 'train'
  shutil.copytree(folder / 'train', root)
  (root / '.ipynb_checkpoints').mkdir()
  (root / 'cat' / '.ipynb_checkpoints').mkdir()
  shutil.copy(root / 'cat' / '0.png', root / 'cat' / '.ipynb_checkpoints' / '0-checkpoint.png')
  (root / 'dog' / '._0.png').write_bytes(b'\x00\x05\x16\x07 AppleDouble')
  src = images.FolderSource(str(root))
  assert src.classes == ['cat', 'dog', 'eel'] and len(src) == 13
  assert [(os.path.relpath(p, root), label) for p, label in src.items] == [
      (os.path.relpath(p, folder / 'train'), label)
      for p, label in images.FolderSource(str(folder / 'train')).items]


def test_a_link_to_a_parent_folder_is_read_once(folder, tmp_path):
  """Symlinks are followed, but a link back up (here class/loop -> class) must not read the
  class's images again at every depth the file system allows (~40 copies)."""
  root = tmp_path / 'train'
  shutil.copytree(folder / 'train', root)
  (root / 'cat' / 'loop').symlink_to(root / 'cat', target_is_directory=True)
  (root / 'dog' / 'more').symlink_to(folder / 'train' / 'eel', target_is_directory=True)
  src = images.FolderSource(str(root))
  orig = images.FolderSource(str(folder / 'train'))
  assert len(src) == len(orig) + sum(label == 2 for _, label in orig.items)   # eel's via dog


def test_an_empty_class_folder_keeps_its_label_with_a_warning(folder, tmp_path, caplog):
  root = tmp_path / 'train'
  shutil.copytree(folder / 'train', root)
  (root / 'bee').mkdir()
  with caplog.at_level('WARNING', logger='var_jax.data'):
    src = images.FolderSource(str(root))
  assert src.classes == ['bee', 'cat', 'dog', 'eel'] and {label for _, label in src.items} == {1, 2, 3}
  assert "1 class folder(s) hold no images (bee)" in caplog.text


def test_folder_eval_split_is_val(tmp_path):
  """data.kind=folder reads path/train and path/val (ImageNet's layout, as configs/common.py says)."""
  import ml_collections
  root = tmp_path / 'data'
  for split, n in (('train', 3), ('val', 2)):
    (root / split / 'cat').mkdir(parents=True)
    for i in range(n):
      Image.fromarray(np.full((8, 8, 3), i, np.uint8)).save(root / split / 'cat' / f'{i}.png')
  cfg = ml_collections.ConfigDict(dict(kind='folder', path=str(root)))
  assert len(images.make_source(cfg, 'train')) == 3
  ev = images.make_source(cfg, 'eval')
  assert len(ev) == 2 and all('/val/' in p for p, _ in ev.items)


def test_folder_eval_labels_follow_the_training_classes(tmp_path):
  """A val/ that lacks a class keeps the training labels; a class training lacks is an error."""
  import ml_collections
  root = tmp_path / 'data'
  for split, classes in (('train', ['cat', 'dog', 'eel']), ('val', ['cat', 'eel'])):
    for c in classes:
      (root / split / c).mkdir(parents=True)
      Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / split / c / '0.png')
  cfg = ml_collections.ConfigDict(dict(kind='folder', path=str(root)))
  ev = images.make_source(cfg, 'eval')
  assert [(os.path.basename(os.path.dirname(p)), label) for p, label in ev.items] == [('cat', 0), ('eel', 2)]
  (root / 'val' / 'fox').mkdir()
  with pytest.raises(ValueError, match='classes the training split lacks: fox'):
    images.make_source(cfg, 'eval')


def test_corrupt_image_is_skipped_and_counted(folder):
  src = images.FolderSource(str(folder / 'train'))
  it = images.make_pipeline(src, global_batch_size=4, image_size=16, train=True, seed=0, num_threads=2)
  batches = [next(it) for _ in range(6)]   # 24 good images = exactly 2 epochs of 13 files
  for b in batches:
    assert b['image'].shape == (4, 16, 16, 3) and b['image'].dtype == np.uint8
    x = augment.to_pm1(b['image'])
    assert x.dtype == np.float32 and -1 <= x.min() and x.max() <= 1
  assert it.num_skipped == 2   # the corrupt file, once per epoch seen
  # eval: corrupt image masked (not dropped), last batch padded, every real image once
  ev = list(images.make_pipeline(src, global_batch_size=4, image_size=16, train=False, num_threads=2))
  assert len(ev) == 4 and sum(int(b['mask'].sum()) for b in ev) == 12
  labels = np.concatenate([b['label'][b['mask'] == 1] for b in ev])
  assert sorted(labels.tolist()) == [0] * 4 + [1] * 4 + [2] * 4


def test_a_folder_of_unreadable_images_is_an_error_not_a_hang(tmp_path):
  """Every image corrupt: the endless training stream would filter forever; an error
  once twice the data set failed in a row (3 epochs here, so the old code ended instead)."""
  (tmp_path / 'cat').mkdir()
  for i in range(5):
    (tmp_path / 'cat' / f'{i}.jpg').write_bytes(b'not a jpeg')
  it = images.make_pipeline(images.FolderSource(str(tmp_path)), global_batch_size=2, image_size=16,
                            train=True, seed=0, num_epochs=3, num_threads=1)
  with pytest.raises(OSError, match='none of the last 10 training examples could be read'):
    next(it)


def test_order_is_seeded_and_state_resumes(folder):
  src = images.FolderSource(str(folder / 'train'))
  mk = lambda seed: images.make_pipeline(src, global_batch_size=4, image_size=16, train=True,
                                         seed=seed, hflip=True, num_threads=2)
  a, b, c = mk(0), mk(0), mk(1)
  xa = [next(a)['image'] for _ in range(3)]
  assert all(np.array_equal(x, next(b)['image']) for x in xa)
  assert not all(np.array_equal(x, next(c)['image']) for x in xa)
  state = a.get_state()
  want = [next(a)['image'] for _ in range(3)]
  fresh = mk(0)
  fresh.set_state(state)
  assert all(np.array_equal(w, next(fresh)['image']) for w in want)


def test_per_process_slices_tile_the_global_batch():
  src = images.SyntheticSource(40, 5, 18)
  whole = images.make_pipeline(src, global_batch_size=8, image_size=16, train=True, seed=3, num_threads=1)
  parts = [images.make_pipeline(src, global_batch_size=8, image_size=16, train=True, seed=3, num_threads=1,
                                shard=grain.sharding.ShardOptions(i, 2)) for i in range(2)]
  for _ in range(6):   # crosses an epoch boundary
    w = next(whole)
    p = [next(x) for x in parts]
    assert np.array_equal(w['image'], np.concatenate([q['image'] for q in p]))
    assert np.array_equal(w['label'], np.concatenate([q['label'] for q in p]))


def test_tfds_mock_data():
  tfds = pytest.importorskip('tensorflow_datasets')
  import ml_collections
  cfg = ml_collections.ConfigDict(dict(kind='tfds', tfds_name='mnist', path='', train_split='train',
                                       eval_split='test', image_key='image', label_key='label'))
  with tfds.testing.mock_data(num_examples=12):
    src = images.make_source(cfg, 'train')
    assert len(src) == 12 and src.num_classes == 10
    it = images.make_pipeline(src, global_batch_size=4, image_size=16, train=True, seed=0, num_threads=1)
    b = next(it)
    assert b['image'].shape == (4, 16, 16, 3) and b['label'].dtype == np.int32   # grey -> RGB
    ev = list(images.make_pipeline(images.make_source(cfg, 'eval'), global_batch_size=4,
                                   image_size=16, train=False, num_threads=1))
    assert sum(int(x['mask'].sum()) for x in ev) == 12


def test_16bit_greyscale_is_scaled_to_8_bits(tmp_path):
  """A 16-bit PNG (PIL mode I;16) decodes as its 8-bit image (v / 257, the rule of
  io_utils.eight_bit, shared with edit and reconstruct), not clipped to white."""
  from var_jax.train import tokenize
  v8 = np.random.default_rng(0).integers(0, 256, (20, 24), dtype=np.uint8)
  Image.fromarray(v8.astype(np.uint16) * 257).save(tmp_path / 'deep.png')
  deep = images.open_image({'path': str(tmp_path / 'deep.png')})
  assert deep.mode.startswith('I')
  want = augment.augment(Image.fromarray(v8), 16, train=False)
  assert np.array_equal(augment.augment(deep, 16, train=False), want)
  Image.fromarray(v8).save(tmp_path / 'grey.png')
  crops = [tokenize.variants({'path': str(tmp_path / f)}, 16, mid_reso=1.125, crops=2, flip=True,
                             seed=0, index=0) for f in ('deep.png', 'grey.png')]
  assert np.array_equal(*crops)


def test_augment_matches_torchvision_semantics():
  img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 60, 3), dtype=np.uint8))
  r = augment.resize_shorter(img, 18)
  assert r.size == (27, 18)              # int(18 * 60 / 40)
  ref = np.asarray(img.resize((27, 18), Image.LANCZOS))
  out = augment.augment(img, 16, train=False, mid_reso=1.125)   # round(1.125*16)=18
  assert np.array_equal(out, ref[1:17, 6:22])   # centre crop: top round(2/2)=1, left round(11/2)=6 (banker's)
  x = augment.to_pm1(np.array([0, 255, 128], np.uint8))
  assert x.dtype == np.float32 and x[0] == -1 and x[1] == 1
  rng = np.random.default_rng(1)
  crop = augment.augment(img, 16, train=True, rng=rng)
  assert crop.shape == (16, 16, 3)
