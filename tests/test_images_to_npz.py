"""datasets.images_to_npz and its command line, images_to_npz.py: a folder of images -> the NPZ data set."""

import os

import numpy as np
import pytest
from absl import flags
from PIL import Image

import datasets
import images_to_npz
from tests import configs_tiny


def _write_png(path, array):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(path)


def _random_images(folder, n, shape=(8, 8, 3), seed=0, prefix='img'):
  """n random uint8 PNGs in `folder` (some in a subfolder); returns {relative path: array}."""
  rng = np.random.default_rng(seed)
  images = {}
  for i in range(n):
    name = os.path.join('sub', f'{prefix}{i:02d}.png') if i % 3 == 0 else f'{prefix}{i:02d}.png'
    images[name] = rng.integers(0, 256, shape, dtype=np.uint8)
    _write_png(os.path.join(folder, name), images[name])
  return images


def _run_cli(*args):
  """images_to_npz.py's command line, parsed and run in-process on a registry of its own."""
  flag_values = flags.FlagValues()
  images_to_npz.define_flags(flag_values)
  flag_values(['images_to_npz.py', *args])
  return images_to_npz.convert(flag_values)


def test_pixels_round_trip_through_the_npz_data_set(tmp_path):
  folder = str(tmp_path / 'images')
  images = _random_images(folder, 12)
  with open(os.path.join(folder, 'notes.txt'), 'w') as f:  # not an image: ignored
    f.write('not an image')
  output = str(tmp_path / 'data.npz')
  counts = _run_cli('--images', folder, '--output', output, '--test_fraction', '0.25')
  assert counts == {'train': 9, 'test': 3}

  # The loader of data.dataset='NPZ' reads the file; every row is its image's pixels, exactly.
  arrays = datasets.load_npz_dataset(output, image_size=8, num_channels=3)
  with np.load(output) as f:
    names = {split: list(f[f'{split}_files']) for split in ('train', 'test')}
  assert sorted(names['train'] + names['test']) == sorted(images)
  assert names['train'] == sorted(names['train']) and names['test'] == sorted(names['test'])
  for split in ('train', 'test'):
    assert arrays[split].dtype == np.uint8
    for row, name in zip(arrays[split], names[split]):
      np.testing.assert_array_equal(row, images[name])

  # Through the training pipeline (tf.data, floats in [0, 1]): the same multiset of images.
  config = configs_tiny.get_config()
  config.data.path = output
  config.eval.batch_size = 3
  _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
  seen = np.concatenate([np.asarray(batch['image']) for batch in eval_ds])
  assert seen.shape == (3, 8, 8, 3)
  pixels = np.round(seen * 255.).astype(np.uint8)
  np.testing.assert_allclose(seen * 255., pixels, atol=1e-3)  # k / 255 in float32: rounding recovers k
  key = lambda a: a.tobytes()  # noqa: E731
  assert sorted(map(key, pixels)) == sorted(key(images[n]) for n in names['test'])


def test_held_out_draw_is_seeded_and_test_folder_is_used(tmp_path):
  folder = str(tmp_path / 'images')
  _random_images(folder, 10)
  a, b, c = (str(tmp_path / f'{x}.npz') for x in 'abc')
  datasets.images_to_npz(folder, a, seed=1)
  datasets.images_to_npz(folder, b, seed=1)
  datasets.images_to_npz(folder, c, seed=2)
  with np.load(a) as fa, np.load(b) as fb, np.load(c) as fc:
    assert list(fa['test_files']) == list(fb['test_files']) and len(fa['test_files']) == 1
    assert list(fa['test_files']) != list(fc['test_files'])

  test_folder = str(tmp_path / 'test_images')
  test_images = _random_images(test_folder, 2, seed=5, prefix='t')
  out = str(tmp_path / 'd.npz')
  assert _run_cli('--images', folder, '--test_images', test_folder, '--output', out) == {'train': 10, 'test': 2}
  with np.load(out) as f:
    for row, name in zip(f['test'], f['test_files']):
      np.testing.assert_array_equal(row, test_images[name])


def test_central_crop_resize_and_grayscale(tmp_path):
  folder = str(tmp_path / 'images')
  rng = np.random.default_rng(0)
  wide = rng.integers(0, 256, (8, 12, 3), dtype=np.uint8)   # 8 high, 12 wide
  tall = rng.integers(0, 256, (10, 8, 3), dtype=np.uint8)
  big = rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)
  for name, array in (('a.png', wide), ('b.png', tall), ('c.png', big)):
    _write_png(os.path.join(folder, name), array)
  out = str(tmp_path / 'd.npz')
  datasets.images_to_npz(folder, out, image_size=8, test_fraction=0.34)
  with np.load(out) as f:
    rows = {n: r for split in ('train', 'test') for n, r in zip(f[f'{split}_files'], f[split])}
  # A crop of exactly image_size is not resampled: the central columns 2..9 / rows 1..8.
  np.testing.assert_array_equal(rows['a.png'], wide[:, 2:10])
  np.testing.assert_array_equal(rows['b.png'], tall[1:9])
  # Resized: PIL's bicubic of the whole (square) image.
  expected = np.asarray(Image.fromarray(big).resize((8, 8), Image.Resampling.BICUBIC))
  np.testing.assert_array_equal(rows['c.png'], expected)

  gray = str(tmp_path / 'gray')
  images = _random_images(gray, 4, shape=(6, 6, 1))
  out = str(tmp_path / 'g.npz')
  datasets.images_to_npz(gray, out, grayscale=True, test_fraction=0.25)
  arrays = datasets.load_npz_dataset(out, image_size=6, num_channels=1)
  with np.load(out) as f:
    for row, name in zip(arrays['train'], f['train_files']):
      np.testing.assert_array_equal(row, images[name])


def test_errors_name_the_problem(tmp_path):
  folder = str(tmp_path / 'images')
  out = str(tmp_path / 'd.npz')
  with pytest.raises(FileNotFoundError, match='is not a directory'):
    datasets.images_to_npz(folder, out)
  os.makedirs(folder)
  with open(os.path.join(folder, 'readme.txt'), 'w') as f:
    f.write('no images here')
  with pytest.raises(ValueError, match='holds no images'):
    datasets.images_to_npz(folder, out)

  _random_images(folder, 3)
  with pytest.raises(ValueError, match=r'leaves 0 test and 3 training'):
    datasets.images_to_npz(folder, out, test_fraction=0.1)
  with pytest.raises(ValueError, match=r'test_fraction=1\.5'):
    datasets.images_to_npz(folder, out, test_fraction=1.5)
  with pytest.raises(ValueError, match=r'image_size=0'):
    datasets.images_to_npz(folder, out, image_size=0)
  with pytest.raises(ValueError, match=r"output_path='d\.np' must be a file name ending in \.npz"):
    datasets.images_to_npz(folder, 'd.np')

  # Mixed sizes, or not square, without an image size: named, with the way out.
  _write_png(os.path.join(folder, 'big.png'), np.zeros((10, 10, 3), np.uint8))
  with pytest.raises(ValueError, match=r'different sizes: .*8 x 8, .*big\.png is 10 x 10.*--image_size'):
    datasets.images_to_npz(folder, out, test_fraction=0.5)
  os.remove(os.path.join(folder, 'big.png'))
  oblong = str(tmp_path / 'oblong')
  _random_images(oblong, 2, shape=(4, 6, 3))
  with pytest.raises(ValueError, match=r'4 x 6, not square.*--image_size'):
    datasets.images_to_npz(oblong, out, test_fraction=0.5)

  # A file that claims to be an image and is not.
  with open(os.path.join(folder, 'broken.png'), 'wb') as f:
    f.write(b'\x89PNG not really')
  with pytest.raises(ValueError, match=r'broken\.png: not a readable image'):
    datasets.images_to_npz(folder, out, test_fraction=0.5)
  os.remove(os.path.join(folder, 'broken.png'))
  assert not os.path.exists(out)  # nothing written by a failed conversion

  # An existing file is kept unless --overwrite.
  datasets.images_to_npz(folder, out, test_fraction=0.5)
  before = open(out, 'rb').read()
  with pytest.raises(FileExistsError, match='--overwrite'):
    _run_cli('--images', folder, '--output', out)
  assert open(out, 'rb').read() == before
  assert _run_cli('--images', folder, '--output', out, '--overwrite', '--test_fraction', '0.34') == {
      'train': 2, 'test': 1}
