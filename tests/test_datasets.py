"""Tests of datasets.py: the NPZ pipeline end to end and its errors, tfds (mocked), TFRecords, TOY dispatch."""
import os
import sys
import types

import numpy as np
import pytest

import datasets
import tf_cpu
from configs import default_cifar10_configs

H = W = 4
N_TRAIN, N_TEST = 6, 6


def _config(**data):
  config = default_cifar10_configs.get_default_configs()
  config.training.batch_size = 2
  config.eval.batch_size = 3
  config.data.image_size = H
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def _images(n, seed, channels=3):
  # Every pixel differs from its mirror image, so a flipped image is never mistaken for the original.
  rng = np.random.default_rng(seed)
  images = rng.integers(0, 256, size=(n, H, W, channels), dtype=np.uint8)
  images[:, :, 0] = 0
  images[:, :, -1] = 255
  return images


@pytest.fixture(autouse=True)
def small_shuffle_buffer(monkeypatch):
  # Training datasets repeat before shuffling (Score SDE's order), so the first batch waits for the whole
  # 10000-image buffer; a small one keeps the tests fast and changes nothing they check.
  monkeypatch.setattr(datasets, 'SHUFFLE_BUFFER_SIZE', 16)


@pytest.fixture
def npz_file(tmp_path):
  path = str(tmp_path / 'data.npz')
  train, test = _images(N_TRAIN, 0), _images(N_TEST, 1)
  np.savez(path, train=train, test=test)
  return path, train, test


def _match(image, originals):
  """'plain' or 'flipped' if the float image is one of the uint8 originals (to float32 rounding), else None."""
  # Pixel values differ by at least 1/255, far above the tolerance.
  for original in originals:
    if np.allclose(image, original / 255., rtol=0, atol=1e-6):
      return 'plain'
    if np.allclose(image, original[:, ::-1] / 255., rtol=0, atol=1e-6):
      return 'flipped'
  return None


def _take(ds, k):
  out = []
  for batch in ds:
    out.append(batch)
    if len(out) == k:
      break
  return out


def test_npz_training_shapes_range_and_flips(npz_file):
  path, train, test = npz_file
  train_ds, eval_ds, builder = datasets.get_dataset(_config(dataset='NPZ', path=path, random_flip=True))
  assert builder is None
  # Training datasets repeat forever: more batches than one epoch.
  batches = _take(train_ds, 3 * N_TRAIN // 2)
  assert len(batches) == 3 * N_TRAIN // 2
  kinds = []
  for batch in batches:
    image = np.asarray(batch['image'])
    assert image.shape == (2, H, W, 3) and image.dtype == np.float32
    assert batch['label'] is None
    kinds += [_match(x, train) for x in image]
  assert None not in kinds
  # 18 images, each flipped with probability 1/2: both kinds appear (fails with probability 2^-17).
  assert set(kinds) == {'plain', 'flipped'}
  eval_kinds = [_match(x, test) for b in _take(eval_ds, 4) for x in np.asarray(b['image'])]
  assert None not in eval_kinds


def test_npz_no_flip_when_disabled(npz_file):
  path, train, _ = npz_file
  train_ds, _, _ = datasets.get_dataset(_config(dataset='NPZ', path=path, random_flip=False))
  kinds = [_match(x, train) for b in _take(train_ds, 6) for x in np.asarray(b['image'])]
  assert set(kinds) == {'plain'}


def test_npz_evaluation_one_epoch_eval_batch_size_no_flip(npz_file):
  path, train, test = npz_file
  train_ds, eval_ds, _ = datasets.get_dataset(_config(dataset='NPZ', path=path, random_flip=True),
                                              evaluation=True)
  for ds, originals in ((train_ds, train), (eval_ds, test)):
    assert len(ds) == 2  # a known number of batches: Score SDE's evaluation loops over range(len(ds))
    images = [np.asarray(b['image']) for b in ds]
    assert [x.shape for x in images] == [(3, H, W, 3)] * 2  # eval.batch_size = 3, one epoch of 6
    images = np.concatenate(images)
    # Exactly the split's images, each once, never flipped (order is shuffled).
    got = sorted(np.round(x * 255).astype(np.uint8).tobytes() for x in images)
    assert got == sorted(x.tobytes() for x in originals)
    assert {_match(x, originals) for x in images} == {'plain'}


def test_npz_uniform_dequantization(npz_file):
  path, _, test = npz_file
  _, eval_ds, _ = datasets.get_dataset(_config(dataset='NPZ', path=path), uniform_dequantization=True,
                                       evaluation=True)
  images = np.concatenate([np.asarray(b['image']) for b in eval_ds]).astype(np.float64)
  assert images.min() >= 0. and images.max() <= 1.
  # (255 x + u) / 256 with u in [0, 1): 256 y - 255 x is the noise u. (Not floor(256 y) == 255 x: in float32,
  # x * 255 + u rounds to the next integer for u within ~1e-5 of 1.) The pipeline shuffles, so each image is
  # matched to the one test image it lies within [0, 1) of, up to float32 rounding.
  scaled = images * 256.
  pixels = test.astype(np.float64)
  matched = []
  for image in scaled:
    noise = image[None] - pixels
    fits = np.all((noise > -1e-3) & (noise < 1. + 1e-3), axis=(1, 2, 3))
    assert fits.sum() == 1
    matched.append(int(np.argmax(fits)))
  assert sorted(matched) == list(range(len(test)))
  noise = scaled - pixels[matched]
  assert noise.std() > 0.2 and abs(noise.mean() - 0.5) < 0.1  # U[0, 1): std 0.289, mean 0.5


def test_npz_small_split_warns(npz_file, caplog):
  path, _, _ = npz_file
  config = _config(dataset='NPZ', path=path)
  config.eval.batch_size = N_TEST + 1
  with caplog.at_level('WARNING'):
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
  assert 'fewer than one batch' in caplog.text
  assert list(eval_ds) == []


def _write(path, **arrays):
  np.savez(path, **arrays)
  return str(path)


@pytest.mark.parametrize('case, needles', [
    ('missing_array', ["'test'", 'is missing', "['train']"]),
    ('float_dtype', ["'train'", 'float32', 'expected uint8']),
    ('ndim', ["'train'", '(6, 4, 12)', '4 dimensions']),
    ('size', ["'test'", '5 x 4', 'config.data.image_size=4']),
    ('channels', ["'train'", '1 channels', 'config.data.num_channels=3']),
    ('empty', ["'train'", 'no images']),
])
def test_npz_errors(tmp_path, case, needles):
  good = _images(N_TRAIN, 0)
  path = str(tmp_path / f'{case}.npz')
  arrays = {
      'missing_array': dict(train=good),
      'float_dtype': dict(train=good.astype(np.float32), test=good),
      'ndim': dict(train=good.reshape(6, 4, 12), test=good),
      'size': dict(train=good, test=np.zeros((2, 5, 4, 3), np.uint8)),
      'channels': dict(train=good[..., :1], test=good),
      'empty': dict(train=good[:0], test=good),
  }[case]
  _write(path, **arrays)
  with pytest.raises(ValueError) as e:
    datasets.get_dataset(_config(dataset='NPZ', path=path))
  message = str(e.value)
  assert path in message
  for needle in needles:
    assert needle in message


def test_npz_missing_path_file_and_bad_file(tmp_path):
  with pytest.raises(ValueError, match=r"config\.data\.path=''"):
    datasets.get_dataset(_config(dataset='NPZ', path=''))
  missing = str(tmp_path / 'nope.npz')
  with pytest.raises(FileNotFoundError, match=r'config\.data\.path=.*nope\.npz'):
    datasets.get_dataset(_config(dataset='NPZ', path=missing))
  garbage = tmp_path / 'garbage.npz'
  garbage.write_bytes(b'not an npz file at all')
  with pytest.raises(ValueError, match='could not be read as an .npz'):
    datasets.get_dataset(_config(dataset='NPZ', path=str(garbage)))
  single = tmp_path / 'single.npz'
  with open(single, 'wb') as f:
    np.save(f, _images(2, 0))  # an .npy under an .npz name
  with pytest.raises(ValueError, match='single array'):
    datasets.get_dataset(_config(dataset='NPZ', path=str(single)))


def test_unknown_dataset_and_bad_fields():
  with pytest.raises(ValueError, match=r"config\.data\.dataset='MNIST'.*'CIFAR10'.*'NPZ'.*'TOY'"):
    datasets.get_dataset(_config(dataset='MNIST'))
  with pytest.raises(ValueError, match=r'config\.data\.num_channels=1 .*\(3,\)'):
    datasets.get_dataset(_config(num_channels=1))
  config = _config()
  config.training.batch_size = 0
  with pytest.raises(ValueError, match=r'config\.training\.batch_size=0'):
    datasets.get_dataset(config)
  config = _config()
  config.eval.batch_size = -3
  with pytest.raises(ValueError, match=r'config\.eval\.batch_size=-3'):
    datasets.get_dataset(config, evaluation=True)
  with pytest.raises(ValueError, match=r'config\.data\.category=None'):
    datasets.get_dataset(_config(dataset='LSUN'))


@pytest.mark.parametrize('dataset, image_size, has_label', [
    ('CIFAR10', 32, True), ('CIFAR10', 16, True), ('IMAGENET32', 32, False), ('SVHN', 8, True),
    ('CELEBA', 16, False), ('LSUN', 128, False), ('LSUN', 8, False)])
def test_tfds_mock_data(tmp_path, dataset, image_size, has_label):
  # Mock LSUN and ImageNet32 images come in random sizes (their tfds shape is (None, None, 3)): the resizing
  # must cope with dynamic shapes. LSUN 128 takes Score SDE's resize_small + central_crop path, 8 crop_resize.
  import tensorflow_datasets as tfds
  config = _config(dataset=dataset, image_size=image_size, data_dir=str(tmp_path), category='bedroom')
  with tfds.testing.mock_data(num_examples=8):
    train_ds, eval_ds, builder = datasets.get_dataset(config)
    assert isinstance(builder, tfds.core.DatasetBuilder)
    for ds in (train_ds, eval_ds):
      batch = next(iter(ds))
      image = np.asarray(batch['image'])
      assert image.shape == (2, image_size, image_size, 3) and image.dtype == np.float32
      assert image.min() >= 0. and image.max() <= 1.
      if has_label:
        assert np.asarray(batch['label']).shape == (2,)
      else:
        assert batch['label'] is None
    _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
    assert len(eval_ds) == 2
    assert sum(np.asarray(b['image']).shape[0] for b in eval_ds) == 6  # one epoch of 8, batches of 3


@pytest.mark.parametrize('data_dir', ['', '/some/prepared/dir'])
def test_tfds_builder_gets_data_dir(monkeypatch, data_dir):
  import tensorflow_datasets as tfds
  calls = []

  def builder(name, **kwargs):
    calls.append((name, kwargs))
    raise KeyboardInterrupt  # stop here: only the call matters

  monkeypatch.setattr(tfds, 'builder', builder)
  with pytest.raises(KeyboardInterrupt):
    datasets.get_dataset(_config(dataset='LSUN', category='bedroom', data_dir=data_dir))
  assert calls == [('lsun/bedroom', {'data_dir': data_dir or None})]


def test_tfds_failure_names_data_dir(tmp_path, monkeypatch):
  import tensorflow_datasets as tfds

  def fail(self, *args, **kwargs):
    raise OSError('no network')

  monkeypatch.setattr(tfds.core.DatasetBuilder, 'download_and_prepare', fail)
  with pytest.raises(RuntimeError, match=r"'cifar10'.*config\.data\.data_dir=.*no network"):
    datasets.get_dataset(_config(dataset='CIFAR10', data_dir=str(tmp_path)))


def _write_tfrecords(path, images_chw):
  tf = datasets.import_tensorflow()
  with tf.io.TFRecordWriter(path) as writer:
    for image in images_chw:
      example = tf.train.Example(features=tf.train.Features(feature={
          'shape': tf.train.Feature(int64_list=tf.train.Int64List(value=list(image.shape))),
          'data': tf.train.Feature(bytes_list=tf.train.BytesList(value=[image.tobytes()])),
      }))
      writer.write(example.SerializeToString())


def test_tfrecords_ffhq(tmp_path):
  images = _images(4, 3)
  path = str(tmp_path / 'ffhq-r02.tfrecords')
  _write_tfrecords(path, images.transpose(0, 3, 1, 2))  # stored CHW, as Score SDE reads them
  config = _config(dataset='FFHQ', random_flip=False)
  config.data.tfrecords_path = path
  config.eval.batch_size = 2
  train_ds, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
  got = np.concatenate([np.asarray(b['image']) for b in train_ds])
  assert got.shape == (4, H, W, 3)
  assert {_match(x, images) for x in got} == {'plain'}
  config.data.image_size = 8
  _, eval_ds, _ = datasets.get_dataset(config, evaluation=True)
  with pytest.raises(Exception, match=r'config\.data\.image_size=8'):
    next(iter(eval_ds))
  config.data.tfrecords_path = str(tmp_path / 'missing.tfrecords')
  with pytest.raises(FileNotFoundError, match=r'config\.data\.tfrecords_path=.*missing'):
    datasets.get_dataset(config)


def test_toy_dispatch(monkeypatch):
  calls = []

  def get_toy_datasets(config, evaluation=False):
    calls.append(evaluation)
    return 'train', 'eval'

  monkeypatch.setitem(sys.modules, 'toy', types.SimpleNamespace(get_toy_datasets=get_toy_datasets))
  assert datasets.get_dataset(_config(dataset='TOY'), evaluation=True) == ('train', 'eval', None)
  assert calls == [True]


def test_import_tensorflow_hides_gpus(monkeypatch):
  tf = datasets.import_tensorflow()
  calls = []
  monkeypatch.setattr(tf.config, 'set_visible_devices', lambda devices, kind: calls.append((devices, kind)))
  monkeypatch.setattr(tf_cpu, '_TF_GPUS_HIDDEN', False)
  datasets.import_tensorflow()
  datasets.import_tensorflow()
  assert calls == [([], 'GPU')]  # once, on first use
  assert tf.config.get_visible_devices('GPU') == []


def test_import_does_not_import_tensorflow():
  import subprocess
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, datasets; assert "tensorflow" not in sys.modules; '
          'assert not any(m.startswith("tensorflow") for m in sys.modules), "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], cwd=root, check=True)


def test_crop_and_resize_helpers_static_and_dynamic():
  tf = datasets.import_tensorflow()
  image = np.arange(9 * 6 * 3, dtype=np.float32).reshape(9, 6, 3)
  dynamic = tf.TensorSpec([None, None, 3], tf.float32)
  crop_dynamic = tf.function(lambda x: datasets.central_crop(x, 4), input_signature=[dynamic])
  for crop in (datasets.central_crop(tf.constant(image), 4), crop_dynamic(image)):
    np.testing.assert_array_equal(crop.numpy(), image[2:6, 1:5])
  # Shorter side -> 4: 9 x 6 becomes round(6.0) x 4 (static) and the same with unknown shapes.
  resize_dynamic = tf.function(lambda x: datasets.resize_small(x, 4), input_signature=[dynamic])
  assert datasets.resize_small(tf.constant(image), 4).shape == (6, 4, 3)
  assert tuple(resize_dynamic(image).shape) == (6, 4, 3)
  assert datasets.resize_small(tf.zeros([7, 5, 3]), 2).shape == (3, 2, 3)  # 2.8 -> 3
  # crop_resize: central square, bicubic, uint8; a constant image stays constant up to Score SDE's truncating
  # cast (200 - 1e-5 -> 199), and bicubic overshoot at a sharp edge is clipped, not wrapped around by the cast.
  const = np.full((10, 6, 3), 200, np.uint8)
  small = datasets.crop_resize(tf.constant(const), 3).numpy()
  assert small.shape == (3, 3, 3) and set(np.unique(small)) <= {199, 200}
  edge = np.zeros((8, 8, 3), np.uint8)
  edge[:, 4:] = 255
  up = datasets.crop_resize(tf.constant(edge), 32).numpy()
  assert up.dtype == np.uint8 and up[:, :12].max() < 30 and up[:, 20:].min() > 225
