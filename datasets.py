"""Data pipelines and the data scalers of Score SDE.

`get_dataset` returns Score SDE's tf.data pipelines (tfds for CIFAR10, SVHN, CELEBA, LSUN; TFRecords for FFHQ
and CelebAHQ), plus ImageNet 32x32 (`downsampled_imagenet/32x32`, FP-Diffusion's second data set), a local
`.npz` file (`data.dataset = 'NPZ'`), scikit-learn's handwritten digits (`'DIGITS'`: 8x8 grey images with 17
levels, offline) and the 2-D toy data of `toy.py`.

TensorFlow is imported lazily (`import_tensorflow`, from `tf_cpu`), so that modules that only need the scalers
import without it, and it is always kept off the GPUs: the data pipeline and the Inception network run on the
CPU and leave every byte of GPU memory to PyTorch. Image samples are scored with `evaluation.py`'s Inception
metrics, and `compute_dataset_stats` writes the statistics file they are measured against.
"""

import functools
import gc
import collections
import itertools
import logging
import math
import os
import zipfile
import zlib

import numpy as np
import torch

import checkpoints
import distributed
import evaluation
import tf_cpu
import utils

# Every value `config.data.dataset` may take.
DATASETS = ('CIFAR10', 'SVHN', 'CELEBA', 'LSUN', 'FFHQ', 'CelebAHQ', 'IMAGENET32', 'NPZ', 'DIGITS', 'TOY')


def _dataset_name(config):
  """`config.data.dataset`, validated: one of `DATASETS` (each reader in this module asks here)."""
  return utils.check_choice('data.dataset', config.data.dataset, DATASETS)


# Score SDE's pipeline constants. Score SDE uses a private thread pool of 48; we cap it at the number of CPUs.
SHUFFLE_BUFFER_SIZE = 10000
_MAX_PRIVATE_THREADPOOL_SIZE = 48

# The arrays a `data.dataset = 'NPZ'` file holds: split name -> array name.
NPZ_ARRAYS = {'train': 'train', 'test': 'test'}

# scikit-learn's digits (`sklearn.datasets.load_digits`, shipped with the package: no download): 1797 8 x 8 grey
# images, pixel values 0..16. The split is fixed: stratified by digit, 360 test images, `random_state` below.
DIGITS_LEVELS = 17
DIGITS_IMAGE_SIZE = 8
DIGITS_SPLIT_SIZES = {'train': 1437, 'test': 360}
DIGITS_SPLIT_SEED = 0

# The name scripts and tests call; the definition (and the GPU hiding) lives in `tf_cpu`.
import_tensorflow = tf_cpu.import_tensorflow


def get_data_scaler(config):
  """Data normalizer. Assume data are always in [0, 1]."""
  if utils.config_value(config, 'data.centered'):
    # Rescale to [-1, 1]
    return lambda x: x * 2. - 1.
  else:
    return lambda x: x


def get_data_inverse_scaler(config):
  """Inverse data normalizer."""
  if utils.config_value(config, 'data.centered'):
    # Rescale [-1, 1] to [0, 1]
    return lambda x: (x + 1.) / 2.
  else:
    return lambda x: x


def crop_resize(image, resolution):
  """Crops the largest central square of an image and resizes it to `resolution` (bicubic, antialiased).

  Args:
    image: a (H, W, C) image tensor.
    resolution: the output side length.

  Returns:
    A (resolution, resolution, C) uint8 tensor.
  """
  tf = import_tensorflow()
  h, w = tf.shape(image)[0], tf.shape(image)[1]
  crop = tf.minimum(h, w)
  image = image[(h - crop) // 2:(h + crop) // 2, (w - crop) // 2:(w + crop) // 2]
  image = tf.image.resize(image, size=(resolution, resolution), antialias=True,
                          method=tf.image.ResizeMethod.BICUBIC)
  # Bicubic overshoots [0, 255] near edges, and casting an out-of-range float to uint8 is undefined (Score SDE
  # casts without clipping); clipping changes nothing else. Truncation, not rounding, as Score SDE.
  return tf.cast(tf.clip_by_value(image, 0., 255.), tf.uint8)


def _height_width(image):
  """The image's height and width: Python ints where the static shape knows them, else scalar tensors."""
  tf = import_tensorflow()
  dynamic = tf.shape(image)
  return tuple(image.shape[i] if image.shape[i] is not None else dynamic[i] for i in (0, 1))


def resize_small(image, resolution):
  """Resizes an image (antialiased bilinear) so that its shorter side is `resolution`.

  Score SDE's version calls `tf.round(x, tf.int32)`, which TF 2 reads as `tf.round(x, name=tf.int32)` and
  rejects; here the sizes are rounded (half to even, as `tf.round`) and may also be dynamic (LSUN's are).

  Args:
    image: a (H, W, C) image tensor.
    resolution: the length of the shorter side after resizing.

  Returns:
    The resized float image.
  """
  tf = import_tensorflow()
  h, w = _height_width(image)
  if isinstance(h, int) and isinstance(w, int):
    ratio = resolution / min(h, w)
    size = [int(round(h * ratio)), int(round(w * ratio))]
  else:
    hw = tf.cast(tf.stack([h, w]), tf.float64)
    size = tf.cast(tf.round(hw * (resolution / tf.reduce_min(hw))), tf.int32)
  return tf.image.resize(image, size, antialias=True)


def central_crop(image, size):
  """Crops the central (size, size) square of an image."""
  tf = import_tensorflow()
  h, w = _height_width(image)
  return tf.image.crop_to_bounding_box(image, (h - size) // 2, (w - size) // 2, size, size)


def _batch_size(config, evaluation):
  """The per-process batch size (Score SDE's is per host, divided over its JAX devices)."""
  if evaluation:
    return utils.config_value(config, 'eval.batch_size')
  return utils.config_value(config, 'training.batch_size')


# What a member's .npy header says: the array's shape and dtype, and the bytes the member holds after the header.
NpyHeader = collections.namedtuple('NpyHeader', ('shape', 'dtype', 'data_bytes'))


def read_npz_headers(path, what='config.data.path'):
  """The header of every array of an `.npz` file, read from the zip directory and each member's .npy header.

  No array is read (`np.load(..., mmap_mode=...)` still inflates compressed members), so neither a header that
  claims 10^9 images nor an object array costs memory or runs code.

  Args:
    path: the file; checked with `check_input_path` before it is opened.
    what: how messages name it.

  Returns:
    A dict array name -> `NpyHeader`.

  Raises:
    FileNotFoundError: no such file. ValueError: not a regular file, or not a readable .npz file (empty,
      truncated, not a zip, a bad .npy header); one line naming the file.
  """
  utils.check_input_path(path, what)
  headers = {}
  try:
    with zipfile.ZipFile(path) as archive:
      for info in archive.infolist():
        if not info.filename.endswith('.npy'):
          continue
        with archive.open(info) as f:
          version = np.lib.format.read_magic(f)
          read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                         else np.lib.format.read_array_header_2_0)
          shape, _, dtype = read_header(f)
          headers[info.filename[:-len('.npy')]] = NpyHeader(shape, dtype, info.file_size - f.tell())
  except (OSError, EOFError, ValueError, NotImplementedError, zipfile.BadZipFile, zlib.error) as e:
    with open(path, 'rb') as f:  # a regular file (checked above): reading 6 bytes cannot block
      if f.read(6) == b'\x93NUMPY':
        raise ValueError(f'{what}={path!r} holds a single array (.npy), not an .npz archive of arrays.') from None
    raise ValueError(f'{what}={path!r} could not be read as an .npz file ({type(e).__name__}: {e}).') from None
  if not headers:
    raise ValueError(f'{what}={path!r} is not an .npz archive of arrays (it holds no .npy member).')
  return headers


def memory_bytes():
  """This machine's physical memory in bytes, or None where the OS does not say."""
  try:
    return os.sysconf('SC_PHYS_PAGES') * os.sysconf('SC_PAGE_SIZE')
  except (ValueError, OSError, AttributeError):
    return None


def byte_size(n):
  """`n` bytes in the largest binary unit that keeps it >= 1, e.g. '3.75 KiB', '715 GiB', '192 bytes'."""
  for power, unit in ((4, 'TiB'), (3, 'GiB'), (2, 'MiB'), (1, 'KiB')):
    if n >= 1024 ** power:
      return f'{n / 1024 ** power:.3g} {unit}'
  return f'{int(n)} bytes'


def check_npz_headers(path, image_size, num_channels):
  """Checks the arrays of a `data.dataset = 'NPZ'` file from their headers (`read_npz_headers`), before any load.

  Args:
    path: the `.npz` file (`config.data.path`).
    image_size: the expected height and width (`config.data.image_size`).
    num_channels: the expected number of channels (`config.data.num_channels`).

  Returns:
    A dict split name -> number of images.

  Raises:
    ValueError: an array is missing, is not uint8 (object arrays included), is not N x H x W x C, holds no
      image or images of another size, its header does not match the bytes stored, or the arrays do not fit in
      this machine's memory. The message names the file, the array, what was found and what was expected.
    FileNotFoundError: `path` does not exist.
  """
  if not path:
    raise ValueError("config.data.path='' is empty; data.dataset='NPZ' needs the path of an .npz file holding "
                     "uint8 arrays 'train' and 'test' of shape N x H x W x C.")
  headers = read_npz_headers(path)
  sizes, total = {}, 0
  for split, key in NPZ_ARRAYS.items():
    if key not in headers:
      raise ValueError(f'{path}: array {key!r} is missing; the file holds {sorted(headers)!r}, expected uint8 '
                       f'arrays {sorted(NPZ_ARRAYS.values())!r} of shape N x H x W x C.')
    shape, dtype, data_bytes = headers[key]
    if dtype != np.uint8:
      raise ValueError(f'{path}: array {key!r} has dtype {dtype}; expected uint8 (pixel values 0..255).')
    if len(shape) != 4:
      raise ValueError(f'{path}: array {key!r} has shape {shape} ({len(shape)} dimensions); expected N x H x W x C '
                       '(4 dimensions; C = 1 for grey images).')
    n, h, w, c = shape
    if n == 0:
      raise ValueError(f'{path}: array {key!r} has shape {shape}: no images.')
    if (h, w) != (image_size, image_size):
      raise ValueError(f'{path}: array {key!r} holds {h} x {w} images (shape {shape}); expected '
                       f'{image_size} x {image_size} (config.data.image_size={image_size}).')
    if c != num_channels:
      raise ValueError(f'{path}: array {key!r} holds images with {c} channels (shape {shape}); expected '
                       f'{num_channels} (config.data.num_channels={num_channels}).')
    size = math.prod(shape) * dtype.itemsize
    if size != data_bytes:
      raise ValueError(f'{path}: array {key!r}: its header says shape {shape} ({size} bytes), but the file holds '
                       f'{data_bytes} bytes of it: the file is truncated or corrupt.')
    sizes[split] = n
    total += size
  memory = memory_bytes()
  if memory is not None and total > memory:
    raise ValueError(f'{path}: arrays {sorted(NPZ_ARRAYS.values())!r} take {byte_size(total)} in memory, more than '
                     f"this machine's {byte_size(memory)}; data.dataset='NPZ' reads them into memory.")
  return sizes


def load_npz_dataset(path, image_size, num_channels):
  """Loads and validates the arrays of a `data.dataset = 'NPZ'` file.

  The headers are checked first (`check_npz_headers`), so that a bad file is refused before anything is read.

  Args:
    path: the `.npz` file (`config.data.path`).
    image_size: the expected height and width (`config.data.image_size`).
    num_channels: the expected number of channels (`config.data.num_channels`).

  Returns:
    A dict split name ('train', 'test') -> uint8 array of shape (N, H, W, C).

  Raises:
    ValueError: if `path` is empty, is not a regular file or not an `.npz` file, or an array is missing, has
      the wrong dtype or shape, or cannot be read. The message names the file, the array, what was found and
      what was expected.
    FileNotFoundError: if `path` does not exist.
  """
  check_npz_headers(path, image_size, num_channels)
  arrays = {}
  key = None  # np.load itself may fail, before any array is read
  try:
    with np.load(path, allow_pickle=False) as npz:
      for split, key in NPZ_ARRAYS.items():
        arrays[split] = npz[key]
  except (OSError, EOFError, ValueError, zipfile.BadZipFile, zlib.error) as e:
    # The headers were fine: the data behind them are not (a truncated or corrupt member).
    what = 'the file' if key is None else f'array {key!r}'
    raise ValueError(f'config.data.path={path!r}: {what} could not be read ({type(e).__name__}: {e}).') from None
  return arrays


def num_levels(dataset):
  """How many grey levels each pixel of a data set has: 17 for 'DIGITS', 256 (8-bit) for the other images."""
  return DIGITS_LEVELS if dataset == 'DIGITS' else 256


@functools.lru_cache(maxsize=1)
def load_digits_splits():
  """scikit-learn's handwritten digits, split into the fixed 'train' (1437) and 'test' (360) images.

  The split is `sklearn.model_selection.train_test_split` of the 1797 images with `test_size=360`,
  `stratify` = the digit and `random_state=DIGITS_SPLIT_SEED` (each digit is 20% of the test images, as of the
  whole set, to within one image); the indices of each split are kept in the data set's order. scikit-learn
  is imported here only, so that it is needed for 'DIGITS' alone.

  Returns:
    A dict split name -> `(images, labels)`: uint8 (N, 8, 8, 1) arrays of levels 0..16 (read-only) and the
    digits, int64 (N,).
  """
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  from sklearn.model_selection import train_test_split  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  images = digits.images
  if images.shape[1:] != (DIGITS_IMAGE_SIZE, DIGITS_IMAGE_SIZE) or np.any(images != np.round(images)) or (
      images.min() < 0 or images.max() >= DIGITS_LEVELS):
    raise ValueError(f'sklearn.datasets.load_digits returned images of shape {images.shape} with values in '
                     f'[{images.min()}, {images.max()}]; expected 8 x 8 images of integer levels 0..16.')
  indices = np.arange(images.shape[0])
  train, test = train_test_split(indices, test_size=DIGITS_SPLIT_SIZES['test'], stratify=digits.target,
                                 random_state=DIGITS_SPLIT_SEED)
  splits = {}
  for split, index in (('train', np.sort(train)), ('test', np.sort(test))):
    split_images = images[index].astype(np.uint8)[..., None]
    split_images.flags.writeable = False  # shared by every caller through the cache
    splits[split] = (split_images, digits.target[index].astype(np.int64))
  return splits


def _digits_arrays(image_size, num_channels):
  """The digits' images per split, for a config that must ask for 8 x 8 images with one channel."""
  utils.check_field('data.image_size', image_size, allowed=(DIGITS_IMAGE_SIZE,))
  utils.check_field('data.num_channels', num_channels, allowed=(1,))
  return {split: images for split, (images, _) in load_digits_splits().items()}


# ------------------------------------------------------------------------------------------------------------
# A folder of images -> a `data.dataset = 'NPZ'` file (`images_to_npz.py` is the command line).
# ------------------------------------------------------------------------------------------------------------

# File name endings read as images (case-insensitive); other files in the folder are ignored.
IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.gif', '.tif', '.tiff', '.webp', '.ppm', '.pgm')


def _is_regular_file(path):
  """Whether `path` is a regular file (a symlink: its target); warns about, and so skips, anything else (a FIFO
  would block the read, a device never end it), without opening it."""
  try:
    kind = utils.file_kind(path)
  except FileNotFoundError as e:
    kind = str(e)
  if kind != 'file':
    logging.warning('Skipping %s: %s, not a regular file.', path, kind)
  return kind == 'file'


def list_image_files(image_dir):
  """The image files under `image_dir` (recursively, hidden files and folders skipped), sorted by path.

  Only regular files (judged by their target, for a symlink) count: a FIFO, socket or device with an image's
  name is skipped with a warning, and never opened.

  Raises:
    FileNotFoundError: `image_dir` is not a directory.
    ValueError: it holds no file with an image extension (`IMAGE_EXTENSIONS`).
  """
  if not os.path.isdir(image_dir):
    raise FileNotFoundError(f'{image_dir!r} is not a directory: images_to_npz reads the images of a folder.')
  files = []
  for folder, subfolders, names in os.walk(image_dir):
    subfolders[:] = sorted(d for d in subfolders if not d.startswith('.'))
    files += [os.path.join(folder, n) for n in sorted(names)
              if not n.startswith('.') and n.lower().endswith(IMAGE_EXTENSIONS)]
  files = [f for f in files if _is_regular_file(f)]
  if not files:
    raise ValueError(f'{image_dir!r} holds no images (files ending in {", ".join(IMAGE_EXTENSIONS)}, in it or '
                     'its subfolders).')
  return sorted(files)


def read_image(path, image_size=None, grayscale=False):
  """Reads one image file as a uint8 (H, W, C) array, C = 3 (RGB) or 1 (`grayscale`).

  With `image_size`, the largest central square is cropped and resized to `image_size` x `image_size` (PIL
  bicubic, antialiased), as Score SDE's `crop_resize` does for LSUN; without, the pixels are kept as they are.
  An alpha channel is dropped.

  Raises:
    ValueError: the file cannot be decoded as an image (the message names it).
  """
  from PIL import Image  # pylint: disable=g-import-not-at-top
  try:
    with Image.open(path) as image:
      image = image.convert('L' if grayscale else 'RGB')
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: not a readable image ({type(e).__name__}: {e}).') from e
  if image_size is not None:
    w, h = image.size
    crop = min(w, h)
    left, top = (w - crop) // 2, (h - crop) // 2
    image = image.crop((left, top, left + crop, top + crop))
    if crop != image_size:
      image = image.resize((image_size, image_size), Image.Resampling.BICUBIC)
  array = np.asarray(image, dtype=np.uint8)
  return array[..., None] if array.ndim == 2 else array


def _check_one_size(paths, arrays):
  """Raises unless every array has the shape of the first, and that shape is square."""
  h, w = arrays[0].shape[:2]
  for path, array in zip(paths, arrays):
    if array.shape[:2] != (h, w):
      raise ValueError(f'Images of different sizes: {paths[0]} is {h} x {w}, {path} is {array.shape[0]} x '
                       f'{array.shape[1]}. Give an image size (--image_size) to crop and resize them all.')
  if h != w:
    raise ValueError(f'The images are {h} x {w}, not square (data.dataset=\'NPZ\' holds image_size x image_size '
                     'images). Give an image size (--image_size) to crop the central square and resize it.')


def _split_files(train_files, test_files, test_fraction, seed):
  """(train, test) file lists: `test_files` if given, else a seeded random `test_fraction` of `train_files`."""
  if test_files is not None:
    return train_files, test_files
  test_fraction = utils.check_number('test_fraction', test_fraction, low=0., high=1., low_open=True,
                                     high_open=True)
  n = len(train_files)
  num_test = int(round(n * test_fraction))
  if not 0 < num_test < n:
    raise ValueError(f'test_fraction={test_fraction} of {n} image(s) leaves {num_test} test and {n - num_test} '
                     'training image(s); each split needs at least one. Add images, change test_fraction, or '
                     'give a folder of test images.')
  rng = np.random.default_rng(utils.check_field('seed', seed))
  is_test = np.zeros(n, dtype=bool)
  is_test[rng.permutation(n)[:num_test]] = True
  # Each split keeps the sorted file order, so that row i of an array is the i-th of its `*_files` names.
  return ([f for f, t in zip(train_files, is_test) if not t], [f for f, t in zip(train_files, is_test) if t])


def images_to_npz(image_dir, output_path, image_size=None, *, test_dir=None, test_fraction=0.1, seed=0,
                  grayscale=False, overwrite=False):
  """Writes the images of a folder as a `data.dataset = 'NPZ'` file (`load_npz_dataset` reads it).

  The file holds uint8 arrays `train` and `test` of shape (N, image_size, image_size, C) (C = 3, or 1 with
  `grayscale`), and the relative paths of their images, `train_files` and `test_files` (row i of `train` is
  the image `train_files[i]`). Point a config at it with `data.dataset='NPZ'`, `data.path=output_path`,
  `data.image_size`, `data.num_channels`.

  Args:
    image_dir: the folder of images (subfolders included; files of other types are ignored).
    output_path: the `.npz` file to write (written atomically).
    image_size: None keeps every image as it is (they must then all be square and of one size); an int crops
      each image's central square and resizes it to `image_size` x `image_size`.
    test_dir: an optional folder of test images; without it, a random `test_fraction` of the images of
      `image_dir` (drawn with `seed`) becomes the test split.
    test_fraction: the share of images held out for the test split when `test_dir` is None, in (0, 1).
    seed: the seed of that draw.
    grayscale: one channel (luminance) instead of RGB.
    overwrite: replace an existing `output_path`; without it, an existing file is an error.

  Returns:
    A dict split name -> number of images written.

  Raises:
    FileNotFoundError: a folder does not exist. FileExistsError: `output_path` exists (and not `overwrite`).
    ValueError: no images, an unreadable image, images of different or non-square sizes without `image_size`,
      a bad argument value, or a split that would be empty; the message names the file or the argument.
  """
  if not isinstance(output_path, str) or not output_path.endswith('.npz'):
    raise ValueError(f'output_path={output_path!r} must be a file name ending in .npz (config.data.path).')
  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f'{output_path} exists; it is never replaced unless asked to (overwrite=True, '
                          '--overwrite).')
  if image_size is not None:
    image_size = utils.check_number('image_size', image_size, low=1, integer=True)
  train_files = list_image_files(image_dir)
  roots = {'train': image_dir, 'test': image_dir if test_dir is None else test_dir}
  test_files = None if test_dir is None else list_image_files(test_dir)
  split_files = dict(zip(('train', 'test'), _split_files(train_files, test_files, test_fraction, seed)))
  arrays = {split: [read_image(f, image_size, grayscale) for f in files] for split, files in split_files.items()}
  all_files = split_files['train'] + split_files['test']
  _check_one_size(all_files, arrays['train'] + arrays['test'])
  contents = {}
  for split, files in split_files.items():
    contents[NPZ_ARRAYS[split]] = np.stack(arrays[split])
    contents[f'{split}_files'] = np.array([os.path.relpath(f, roots[split]) for f in files])
  with checkpoints.atomic_write(output_path) as f:
    np.savez(f, **contents)
  counts = {split: len(files) for split, files in split_files.items()}
  shape = contents['train'].shape[1:]
  logging.info('Wrote %s: %d training and %d test images of %d x %d x %d.', output_path, counts['train'],
               counts['test'], *shape)
  return counts


def _tfds_builder(name, config):
  """A tfds builder reading from `config.data.data_dir` ('' = the tfds default directory)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  data_dir = config.data.get('data_dir', '')
  if not isinstance(data_dir, str):
    raise ValueError(f'config.data.data_dir={data_dir!r} must be a string (a directory, or \'\' for the tfds '
                     'default).')
  if data_dir and not utils.is_remote(data_dir):
    # tfds creates a missing directory when it prepares a data set; anything else there must be a directory.
    utils.check_input_path(data_dir, 'config.data.data_dir', expected='directory', missing_ok=True)
  return tfds.builder(name, data_dir=data_dir or None)


def _prepare_tfds(builder, config):
  """Downloads and prepares a tfds data set if needed; a failure is one `RuntimeError` naming `data.data_dir`."""
  try:
    builder.download_and_prepare()
  except Exception as e:  # tfds raises many kinds; all mean "the data are not there"
    raise RuntimeError(
        f'tfds could not prepare {builder.name!r} (data.dataset={config.data.dataset!r}) in '
        f'config.data.data_dir={config.data.get("data_dir", "")!r}: {e}. Without network, prepare the data '
        'with tfds elsewhere and point config.data.data_dir at the directory.') from e


# The tfds data sets read into memory for training (CIFAR-10: 184 MB of uint8 images, SVHN: 305 MB; not ImageNet
# 32x32: 3.9 GB, nor CelebA or LSUN), so that their batch order is a function of the seed and a resumed run is the
# same run (`ImageData.train_batches`).
TFDS_IN_MEMORY = ('CIFAR10', 'SVHN')


def _tfds_in_memory(config):
  """The uint8 images of the training and eval splits of a `TFDS_IN_MEMORY` data set, in the files' order, and
  the function that maps a batch of them to float32 images of the configured size; None for another data set."""
  if config.data.dataset not in TFDS_IN_MEMORY:
    return None
  tf = import_tensorflow()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  builder, train_split, eval_split, op = _image_resize_ops(config)
  _prepare_tfds(builder, config)
  images = {}
  for split, name in (('train', train_split), ('eval', eval_split)):
    ds = builder.as_dataset(split=name, shuffle_files=False).map(lambda d: d['image']).batch(4096)
    images[split] = np.concatenate(list(tfds.as_numpy(ds)))
  resize_batch = tf.function(lambda batch: tf.map_fn(op, batch, fn_output_signature=tf.float32))
  return images, lambda batch: resize_batch(tf.constant(batch)).numpy()


def _image_resize_ops(config):
  """Score SDE's per-dataset source and resizing, for the tfds and TFRecords datasets.

  Returns:
    `(source, train_split, eval_split, op)`: the tfds builder (or the `TFRecordDataset`), the split names, and
    `op`, which maps a raw image to a float32 image in [0, 1] of the configured size (None for the TFRecords,
    which are stored at their final size).
  """
  tf = import_tensorflow()
  dataset = config.data.dataset
  image_size = utils.config_value(config, 'data.image_size')

  def resize_op(img):
    img = tf.image.convert_image_dtype(img, tf.float32)
    return tf.image.resize(img, [image_size, image_size], antialias=True)

  if dataset == 'CIFAR10':
    return _tfds_builder('cifar10', config), 'train', 'test', resize_op
  if dataset == 'SVHN':
    return _tfds_builder('svhn_cropped', config), 'train', 'test', resize_op
  if dataset == 'IMAGENET32':
    # Not in Score SDE. Its images are 32 x 32 already; resized like CIFAR-10 if image_size differs.
    return _tfds_builder('downsampled_imagenet/32x32', config), 'train', 'validation', resize_op
  if dataset == 'CELEBA':
    def celeba_op(img):
      img = tf.image.convert_image_dtype(img, tf.float32)
      img = central_crop(img, 140)
      return resize_small(img, image_size)
    return _tfds_builder('celeb_a', config), 'train', 'validation', celeba_op
  if dataset == 'LSUN':
    category = config.data.get('category', None)
    if not isinstance(category, str) or not category:
      raise ValueError(f'config.data.category={category!r} must name an LSUN category for data.dataset=\'LSUN\' '
                       "(e.g. 'bedroom', 'church_outdoor').")
    if image_size == 128:
      def lsun_op(img):
        img = tf.image.convert_image_dtype(img, tf.float32)
        img = resize_small(img, image_size)
        return central_crop(img, image_size)
    else:
      def lsun_op(img):
        img = crop_resize(img, image_size)
        return tf.image.convert_image_dtype(img, tf.float32)
    return _tfds_builder(f'lsun/{category}', config), 'train', 'validation', lsun_op
  if dataset in ('FFHQ', 'CelebAHQ'):
    path = config.data.get('tfrecords_path', None)
    if not isinstance(path, str) or not path:
      raise ValueError(f'config.data.tfrecords_path={path!r} must name the TFRecords file of data.dataset='
                       f'{dataset!r}.')
    if utils.is_remote(path):  # e.g. gs://, read by tf.io.gfile
      if not tf.io.gfile.exists(path):
        raise FileNotFoundError(f'config.data.tfrecords_path={path!r}: no such file (data.dataset={dataset!r}).')
    else:
      utils.check_input_path(path, 'config.data.tfrecords_path')
    # One file, no held-out split: Score SDE evaluates on the training images.
    return tf.data.TFRecordDataset(path), 'train', 'train', None
  raise AssertionError(f'unhandled dataset {dataset!r}')  # get_dataset validated it


def get_dataset(config, uniform_dequantization=False, evaluation=False, *, drop_remainder=True):
  """Creates the training and evaluation data pipelines (Score SDE's semantics).

  Images are float32 in [0, 1], NHWC, batches of `training.batch_size` (`eval.batch_size` when `evaluation`)
  with the last partial batch dropped (unless `drop_remainder=False`). The batch is per process: Score SDE
  divides it over its JAX devices, here `torch.nn.DataParallel` splits it (run_lib's data set objects split
  the global batch over torchrun's ranks instead, `ImageData`). While training (`evaluation=False`) both
  datasets repeat forever and `data.random_flip` flips images left-right at random; for evaluation they are one
  epoch, never flipped. Both are shuffled, as in Score SDE.

  Args:
    config: the config; reads `data.dataset`, `data.image_size`, `data.num_channels`, `data.random_flip`,
      `data.data_dir` (tfds), `data.category` (LSUN), `data.tfrecords_path` (FFHQ, CelebAHQ), `data.path`
      (NPZ), and the batch size.
    uniform_dequantization: if `True`, images become (255 x + u) / 256 with u ~ U[0, 1) per pixel ((16 x + u) /
      17 for 'DIGITS', whose images are level / 16).
    evaluation: if `True`, one epoch without random flips and with `eval.batch_size`.
    drop_remainder: keyword only, not in Score SDE; `False` keeps the last partial batch, so that one epoch
      covers every image (dataset statistics for FID).

  Returns:
    `(train_ds, eval_ds, dataset_builder)`. Iterating a dataset yields dicts with `'image'` (float32, shape
    (B, H, W, C)) and `'label'` (None where the data have no labels). `dataset_builder` is the tfds builder,
    the `TFRecordDataset` for FFHQ/CelebAHQ, or None for NPZ, DIGITS and TOY.
  """
  dataset = _dataset_name(config)
  if dataset == 'TOY':
    if uniform_dequantization:
      raise ValueError('config.data.uniform_dequantization=True is not allowed for config.data.dataset=\'TOY\': '
                       'the toy points are continuous, with no 8-bit levels to dequantize.')
    import toy  # pylint: disable=g-import-not-at-top
    train_ds, eval_ds = toy.get_toy_datasets(config, evaluation=evaluation)
    return train_ds, eval_ds, None
  random_flip = utils.config_value(config, 'data.random_flip')
  return _image_pipelines(config, batch_size=_batch_size(config, evaluation), evaluation=evaluation,
                          flip=random_flip and not evaluation, uniform_dequantization=uniform_dequantization,
                          drop_remainder=drop_remainder)


def _image_pipelines(config, *, batch_size, evaluation, flip, uniform_dequantization, drop_remainder,
                     shuffle_seed=None, keep=None):
  """The train and eval tf.data pipelines of an image dataset (`get_dataset`'s, with more control).

  Args:
    config: the config (`get_dataset` lists what it reads).
    batch_size: images per batch.
    evaluation: one epoch (True) or repeat forever (False).
    flip: random left-right flips (Score SDE: while training only).
    uniform_dequantization: (255 x + u) / 256 per pixel, u ~ U[0, 1) (L levels: ((L - 1) x + u) / L).
    drop_remainder: drop the last partial batch.
    shuffle_seed: None shuffles differently on every start (Score SDE); an int makes the order a function of
      it (the file order of tfds data sets too).
    keep: None, or `(offset, count, period)`: of every `period` consecutive elements of the shuffled stream,
      keep those at positions offset..offset+count-1 (this rank's share of each global batch; `batch_size`
      must then be `count`). Elements are dropped before they are decoded.

  Returns:
    `(train_ds, eval_ds, dataset_builder)`.
  """
  dataset = config.data.dataset
  image_size = utils.config_value(config, 'data.image_size')
  num_channels = utils.config_value(config, 'data.num_channels')
  if dataset == 'NPZ':
    # Validate the file before TensorFlow is imported: a bad file should fail fast.
    npz_arrays = load_npz_dataset(config.data.path, image_size, num_channels)
  elif dataset == 'DIGITS':
    npz_arrays = _digits_arrays(image_size, num_channels)
  else:
    # Every other image data set is RGB.
    utils.check_field('data.num_channels', num_channels, allowed=(3,))

  tf = import_tensorflow()
  num_epochs = 1 if evaluation else None
  levels = float(num_levels(dataset))

  def finish(img):
    """Random flip and uniform dequantization, shared by every image dataset."""
    if flip:
      img = tf.image.random_flip_left_right(img)
    if uniform_dequantization:
      img = (tf.random.uniform(tf.shape(img), dtype=tf.float32) + img * (levels - 1.)) / levels
    return img

  if dataset in ('NPZ', 'DIGITS'):
    dataset_builder = None
    train_split_name, eval_split_name = 'train', 'test'

    def preprocess_fn(d):
      # Level k of L becomes k / (L - 1): 0 and 1 are black and white, as for 8-bit images.
      image = (tf.image.convert_image_dtype(d['image'], tf.float32) if dataset == 'NPZ'
               else tf.cast(d['image'], tf.float32) / (levels - 1.))
      return dict(image=finish(image), label=None)
  else:
    dataset_builder, train_split_name, eval_split_name, resize_op = _image_resize_ops(config)
    if dataset in ('FFHQ', 'CelebAHQ'):
      path = config.data.tfrecords_path

      def preprocess_fn(d):
        sample = tf.io.parse_single_example(d, features={
            'shape': tf.io.FixedLenFeature([3], tf.int64),
            'data': tf.io.FixedLenFeature([], tf.string)})
        data = tf.reshape(tf.io.decode_raw(sample['data'], tf.uint8), sample['shape'])
        data = tf.transpose(data, (1, 2, 0))  # stored CHW
        # The records are stored at one resolution and are not resized: a mismatch is a config error.
        check = tf.debugging.assert_equal(
            tf.shape(data, out_type=tf.int64), tf.constant([image_size, image_size, 3], tf.int64),
            message=f'{path}: images do not match config.data.image_size={image_size} with 3 channels')
        with tf.control_dependencies([check]):
          data = tf.ensure_shape(data, [image_size, image_size, 3])
        return dict(image=finish(tf.image.convert_image_dtype(data, tf.float32)), label=None)
    else:
      def preprocess_fn(d):
        return dict(image=finish(resize_op(d['image'])), label=d.get('label', None))

  def create_dataset(split):
    options = tf.data.Options()
    options.experimental_optimization.map_parallelization = True
    options.threading.private_threadpool_size = min(_MAX_PRIVATE_THREADPOOL_SIZE, os.cpu_count() or 1)
    options.threading.max_intra_op_parallelism = 1
    if dataset in ('NPZ', 'DIGITS'):
      ds = tf.data.Dataset.from_tensor_slices({'image': npz_arrays[split]}).with_options(options)
    elif not isinstance(dataset_builder, tf.data.Dataset):  # a tfds builder
      import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
      _prepare_tfds(dataset_builder, config)
      ds = dataset_builder.as_dataset(split=split, shuffle_files=True,
                                      read_config=tfds.ReadConfig(options=options, shuffle_seed=shuffle_seed))
    else:
      ds = dataset_builder.with_options(options)
    ds = ds.repeat(count=num_epochs)
    ds = ds.shuffle(SHUFFLE_BUFFER_SIZE, seed=shuffle_seed)
    if keep is not None:
      offset, count, period = keep
      ds = ds.enumerate().filter(lambda i, _: (i % period >= offset) & (i % period < offset + count))
      ds = ds.map(lambda _, d: d)
    ds = ds.map(preprocess_fn, num_parallel_calls=tf.data.experimental.AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return ds.prefetch(tf.data.experimental.AUTOTUNE)

  if dataset == 'NPZ':
    for split in (train_split_name, eval_split_name):
      if evaluation and drop_remainder and len(npz_arrays[split]) < batch_size:
        logging.warning('%s: the %r split has %d images, fewer than one batch of %d: it yields no batch.',
                        config.data.path, split, len(npz_arrays[split]), batch_size)
  train_ds = create_dataset(train_split_name)
  eval_ds = create_dataset(eval_split_name)
  return train_ds, eval_ds, dataset_builder


# ------------------------------------------------------------------------------------------------------------
# Data set objects: what run_lib needs of a data set, so that no code outside this module and toy.py asks which
# kind of data it trains on.
# ------------------------------------------------------------------------------------------------------------


class ImageData:
  """An image data set (every `data.dataset` but 'TOY') as run_lib uses it.

  Training batches of a data set held in memory (`in_memory`) come in an order that is a function of
  (`config.seed`, epoch), the others from the tf.data pipelines of `get_dataset`, in an order that is a function
  of `config.seed` and of the step a training run starts at (`train_batches`); random flips and uniform
  dequantization are drawn in torch, for the global batch, from generators seeded by the step, so that a batch
  is the same however it is split over ranks. Samples are 8-bit images (uint8 NHWC in `samples_{r}.npz`),
  scored by FID/IS/KID of Inception features against the data set's statistics file; bits/dim are Score SDE's:
  dequantized data, Rademacher trace estimator, the 8-bit offset (the offset of `num_levels` levels:
  `DigitsData`).
  """

  # Whether bits/dim are computed on dequantized data.
  bpd_dequantize = True

  def __init__(self, config):
    self.config = config
    self.dataset = _dataset_name(config)
    self.num_levels = num_levels(self.dataset)
    self.image_size = utils.config_value(config, 'data.image_size')
    self.num_channels = utils.config_value(config, 'data.num_channels')
    self.scaler = get_data_scaler(config)
    self.inverse_scaler = get_data_inverse_scaler(config)
    self.random_flip = utils.config_value(config, 'data.random_flip')
    self.uniform_dequantization = utils.config_value(config, 'data.uniform_dequantization')
    self.seed = utils.config_value(config, 'seed')
    self.train_batch_size = _batch_size(config, evaluation=False)
    self.eval_batch_size = _batch_size(config, evaluation=True)
    self.device = torch.device(config.device)
    self._inception = None
    self._inceptionv3 = False
    self._in_memory = False  # not read yet (`in_memory`)

  @property
  def likelihood_options(self):
    """The `likelihood.get_likelihood_fn` options: Score SDE's Rademacher estimator, bits/dim of the data's
    levels."""
    return {'hutchinson_type': 'Rademacher', 'discrete_data': True, 'num_levels': self.num_levels}

  def sample_shape(self, batch_size):
    """Shape (B, C, H, W) of a batch as the model sees it."""
    return (batch_size, self.num_channels, self.image_size, self.image_size)

  def to_model_input(self, images, flip=None, dequantization_noise=None):
    """A batch of images (NHWC in [0, 1], numpy or tf) as the model's input: NCHW on the device, scaled.

    Args:
      images: the batch.
      flip: optional bool tensor (B,): which images to flip left-right.
      dequantization_noise: optional u ~ U[0, 1) of the batch's NCHW shape: images become (255 x + u) / 256
        (L levels: ((L - 1) x + u) / L, each level's bin of width 1 / L, as `likelihood.discrete_offset` counts).
    """
    # A copy: tf.data's arrays are read-only, which torch.from_numpy warns about.
    x = torch.from_numpy(np.array(images, dtype=np.float32)).to(self.device).permute(0, 3, 1, 2)
    if flip is not None:
      x = torch.where(flip.reshape(-1, 1, 1, 1), x.flip(-1), x)
    if dequantization_noise is not None:
      x = (x * (self.num_levels - 1.) + dequantization_noise) / self.num_levels
    return self.scaler(x)

  def _global_draws(self, shape, tag, index, ctx, flip, dequantize):
    """This rank's slice of the flips and dequantization noise of global batch `index` of `shape`."""
    if not (flip or dequantize):
      return None, None
    generator = torch.Generator(device=self.device)
    generator.manual_seed(utils.seed_for(self.seed, tag, index))
    flips = torch.rand(shape[0], generator=generator, device=self.device) < 0.5 if flip else None
    noise = torch.rand(shape, generator=generator, device=self.device) if dequantize else None
    part = distributed.share(shape[0], ctx)
    return (None if flips is None else flips[part]), (None if noise is None else noise[part])

  def _stream(self, split, global_batch, start, ctx, tag):
    """This rank's share of each global batch of an endless shuffled stream, as model input."""
    part = distributed.share(global_batch, ctx)
    local = part.stop - part.start
    keep = (part.start, local, global_batch) if ctx.distributed else None
    train_ds, eval_ds, _ = _image_pipelines(
        self.config, batch_size=local, evaluation=False, flip=False, uniform_dequantization=False,
        drop_remainder=True, shuffle_seed=utils.seed_for(self.seed, tag, start), keep=keep)
    shape = self.sample_shape(global_batch)
    for index, batch in enumerate(train_ds if split == 'train' else eval_ds, start=start):
      flip, noise = self._global_draws(shape, tag, index, ctx, self.random_flip, self.uniform_dequantization)
      yield self.to_model_input(batch['image'], flip, noise)

  def in_memory(self):
    """`(images, to_float)` where the data set is held in memory, else None (read once, then kept).

    `images` maps 'train' and 'eval' to the split's uint8 NHWC images, in a fixed order; `to_float` maps a
    batch of them to float32 images in [0, 1] of the configured size. In memory: 'NPZ', 'DIGITS' and the tfds
    data sets of `TFDS_IN_MEMORY` (CIFAR-10, SVHN). Streamed: the others.
    """
    if self._in_memory is False:
      if self.dataset == 'NPZ':
        arrays = load_npz_dataset(self.config.data.path, self.image_size, self.num_channels)
        self._in_memory = ({'train': arrays['train'], 'eval': arrays['test']},
                           lambda x: x.astype(np.float32) * np.float32(1. / 255.))  # as tf.image.convert_image_dtype
      elif self.dataset == 'DIGITS':
        arrays = _digits_arrays(self.image_size, self.num_channels)
        self._in_memory = ({'train': arrays['train'], 'eval': arrays['test']},
                           lambda x: x.astype(np.float32) / np.float32(self.num_levels - 1.))
      else:
        self._in_memory = _tfds_in_memory(self.config)
    return self._in_memory

  def _epoch_order(self, tag, epoch, n):
    """The order of the n images of a split in epoch `epoch` of the stream `tag`: a function of (seed, epoch)."""
    return np.random.default_rng(utils.seed_for(self.seed, tag, 'epoch', epoch)).permutation(n)

  def _memory_stream(self, split, start, ctx, tag):
    """This rank's share of each training-size batch of a split held in memory, from batch `start` on.

    The epochs are fresh permutations of the split (`_epoch_order`), laid end to end; batch k is the images at
    positions k B .. (k + 1) B - 1, so the stream can start at any batch and stays the same stream.
    """
    images, to_float = self.in_memory()
    images = images[split]
    n, global_batch = len(images), self.train_batch_size
    part = distributed.share(global_batch, ctx)
    shape = self.sample_shape(global_batch)

    def batches():
      orders = {}
      for index in itertools.count(start):
        epochs, offsets = np.divmod(np.arange(index * global_batch, (index + 1) * global_batch)[part], n)
        orders = {e: orders[e] if e in orders else self._epoch_order(tag, e, n) for e in np.unique(epochs)}
        indices = np.empty_like(offsets)
        for epoch, order in orders.items():
          indices[epochs == epoch] = order[offsets[epochs == epoch]]
        flip, noise = self._global_draws(shape, tag, index, ctx, self.random_flip, self.uniform_dequantization)
        yield self.to_model_input(to_float(images[indices]), flip, noise)

    return batches()

  def train_batches(self, start_step, ctx):
    """This rank's share of the training batch of every step from `start_step` on (an endless iterator).

    For a data set held in memory (`in_memory`) the order is a function of (seed, epoch) and the flips and noise
    of (seed, step): a run resumed at step s trains on exactly the batches of the uninterrupted run. A streamed
    data set shuffles anew from (seed, start_step), as Score SDE's tf.data pipeline does on every start: a
    resumed run sees the images in another order.
    """
    if self.in_memory() is not None:
      return self._memory_stream('train', start_step, ctx, 'train')
    return self._stream('train', self.train_batch_size, start_step, ctx, 'train')

  def eval_stream(self, ctx):
    """Batches of the eval split for the training loop's periodic eval step (Score SDE: of the training batch
    size, repeated, flipped and dequantized like the training data)."""
    if self.in_memory() is not None:
      return self._memory_stream('eval', 0, ctx, 'eval_stream')
    return self._stream('eval', self.train_batch_size, 0, ctx, 'eval_stream')

  def eval_batches(self, split, dequantize=None, repeat=0, only=None):
    """One epoch of a split in batches of `eval.batch_size`, in a fixed order: `(index, model input)` pairs.

    Args:
      split: 'train' or 'test' (the data set's held-out split).
      dequantize: uniformly dequantize, with noise that is a function of (seed, split, repeat, index); None:
        as the training data (`data.uniform_dequantization`).
      repeat: which pass over the split this is (a new dequantization per pass).
      only: optional predicate on the batch index: the other batches are yielded as `(index, None)`, not
        converted (a rank's share of the evaluation; every rank still sees every index).
    """
    if dequantize is None:
      dequantize = self.uniform_dequantization
    train_ds, eval_ds, _ = _image_pipelines(
        self.config, batch_size=self.eval_batch_size, evaluation=True, flip=False, uniform_dequantization=False,
        drop_remainder=True, shuffle_seed=utils.seed_for(self.seed, 'eval_order'))
    count = 0
    for index, batch in enumerate(train_ds if split == 'train' else eval_ds):
      count += 1
      if only is not None and not only(index):
        yield index, None
        continue
      noise = None
      if dequantize:
        images = np.asarray(batch['image'])
        generator = torch.Generator(device=self.device)
        generator.manual_seed(utils.seed_for(self.seed, 'dequantize', split, repeat, index))
        noise = torch.rand(self.sample_shape(images.shape[0]), generator=generator, device=self.device)
      yield index, self.to_model_input(batch['image'], dequantization_noise=noise)
    if not count:
      # Every rank sees the same (empty) split, so every rank stops here, not only the one writing results.
      raise ValueError(f'The {split!r} split of config.data.dataset={self.dataset!r} yields no full batch of '
                       f'config.eval.batch_size={self.eval_batch_size}: it has fewer examples. Lower '
                       'eval.batch_size.')

  def split_size(self, split):
    """How many images the 'train' or 'test' split holds, or None where that is not known without reading it
    (TFRecords; a tfds data set not prepared yet)."""
    if self.dataset == 'DIGITS':
      return len(load_digits_splits()[split][0])
    if self.dataset == 'NPZ':  # the headers, checked against the config: a bad file stops the run here
      return check_npz_headers(self.config.data.path, self.image_size, self.num_channels)[split]
    if self.dataset in ('FFHQ', 'CelebAHQ'):
      return None  # one TFRecords file: counting its records means reading it
    try:
      builder, train_split, eval_split, _ = _image_resize_ops(self.config)
      count = int(builder.info.splits[train_split if split == 'train' else eval_split].num_examples)
    except Exception:  # pylint: disable=broad-except  (an unprepared tfds data set has no split info yet)
      return None
    return count or None

  def num_eval_batches(self, split):
    """How many batches `eval_batches(split)` yields, or None where tf.data cannot tell without reading."""
    train_ds, eval_ds, _ = _image_pipelines(
        self.config, batch_size=self.eval_batch_size, evaluation=True, flip=False, uniform_dequantization=False,
        drop_remainder=True)
    count = int((train_ds if split == 'train' else eval_ds).cardinality())
    return count if count >= 0 else None

  # Samples ------------------------------------------------------------------------------------------------

  def sample_arrays(self, samples):
    """Samples (NCHW in [0, 1], torch) as Score SDE saves them: uint8 NHWC."""
    return np.clip(samples.permute(0, 2, 3, 1).cpu().numpy() * 255., 0, 255).astype(np.uint8)

  def save_snapshot(self, samples, directory, step):
    """Score SDE's snapshot files: `sample.np` (uint8 NHWC, `np.save`) and `sample.png` (a grid)."""
    del step
    from torchvision.utils import make_grid, save_image  # pylint: disable=g-import-not-at-top
    nrow = int(np.sqrt(samples.shape[0]))
    with open(os.path.join(directory, 'sample.np'), 'wb') as fout:
      np.save(fout, self.sample_arrays(samples))
    save_image(make_grid(samples, nrow, padding=2), os.path.join(directory, 'sample.png'))

  def prepare_sample_quality(self):
    """Loads the Inception network and checks the statistics file, before any sampling."""
    self._inceptionv3 = evaluation.inceptionv3_from_config(self.config)
    self._inception = evaluation.get_inception_model(inceptionv3=self._inceptionv3, config=self.config)
    # The statistics file must exist before hours of sampling, not after.
    evaluation.load_dataset_stats(self.config)

  def sample_statistics(self, arrays):
    """Inception features of a round of samples (`statistics_{r}.npz`): `pool_3`, and `logits` (not for v3)."""
    # Garbage-collect before and after TensorFlow's Inception network, as Score SDE does.
    gc.collect()
    latents = evaluation.run_inception_distributed(arrays, self._inception, inceptionv3=self._inceptionv3)
    gc.collect()
    stats = {'pool_3': latents['pool_3']}
    if not self._inceptionv3:
      stats['logits'] = latents['logits']
    return stats

  def sample_quality(self, rounds, num_samples):
    """FID, IS and KID of the first `num_samples` samples against the data set's statistics.

    Args:
      rounds: per round, `(arrays, statistics)`.
      num_samples: how many samples count.

    Returns:
      A dict of floats `{'IS', 'fid', 'kid'}` (Score SDE's `report_{ckpt}.npz` names).
    """
    pools = np.concatenate([stats['pool_3'] for _, stats in rounds], axis=0)[:num_samples]
    logits = None
    if not self._inceptionv3:
      logits = np.concatenate([stats['logits'] for _, stats in rounds], axis=0)[:num_samples]
    data_pools = evaluation.load_dataset_stats(self.config)['pool_3']
    metrics = evaluation.sample_quality_metrics(data_pools, pools, logits)
    return {'IS': metrics['is'], 'fid': metrics['fid'], 'kid': metrics['kid']}


def compute_dataset_stats(config, output_path, inception_model=None, max_images=None, overwrite=False):
  """Computes a dataset's Inception statistics file (Score SDE's format) from its training split.

  Images come from `get_dataset(config, evaluation=True, drop_remainder=False)` (one epoch, every image, no
  flips, batches of `eval.batch_size`), are mapped to uint8 as Score SDE feeds samples, and go through the
  Inception network (`evaluation.py`). `evaluation.load_dataset_stats` reads the file back.

  Args:
    config: the config (data fields, `eval.batch_size`, `eval.inception_model`).
    output_path: the `.npz` file to write: `pool_3` (N, D) as Score SDE's files, plus `mu` and `sigma` (mean
      and unbiased covariance of `pool_3`).
    inception_model: an already loaded module, or None to load it from `config.eval.inception_model`.
    max_images: stop after at least this many images (None: the whole split).
    overwrite: replace an existing `output_path`. By default an existing file (e.g. Score SDE's published
      CIFAR-10 statistics) is never replaced: `FileExistsError`, before any work.

  Returns:
    The pool_3 features, (N, D).
  """
  if os.path.exists(output_path) and not overwrite:
    raise FileExistsError(f'The statistics file {output_path} exists; delete it to recompute it, or write '
                          'elsewhere with config.eval.stats_path.')
  inceptionv3 = evaluation.inceptionv3_from_config(config)
  if inception_model is None:
    inception_model = evaluation.get_inception_model(inceptionv3=inceptionv3, config=config)
  train_ds, _, _ = get_dataset(config, uniform_dequantization=False, evaluation=True, drop_remainder=False)
  pools = []
  num_images = 0
  num_batches = int(train_ds.cardinality())  # negative where tf.data cannot tell
  progress = utils.Progress(num_batches if num_batches >= 0 else None, 'Inception statistics', unit='batch')
  for batch_index, batch in enumerate(train_ds):
    images = evaluation.images_to_uint8(batch['image'])
    if images.shape[-1] != 3:
      raise ValueError(f'The Inception network needs RGB images; config.data.num_channels='
                       f'{config.data.num_channels}.')
    pools.append(evaluation.run_inception_distributed(images, inception_model, inceptionv3=inceptionv3)
                 [evaluation.INCEPTION_FINAL_POOL])
    num_images += images.shape[0]
    logging.info('Inception statistics: %d images (%s).', num_images, progress.status(batch_index + 1))
    if max_images is not None and num_images >= max_images:
      break
  progress.close()
  if num_images < 2:
    raise ValueError(f'The training split of config.data.dataset={config.data.dataset!r} gave {num_images} images; '
                     'statistics need at least 2.')
  pool_3 = np.concatenate(pools, axis=0)
  mu, sigma = evaluation.activation_statistics(pool_3)
  # Atomic: a failure never leaves a truncated stats file behind.
  with checkpoints.atomic_write(output_path) as f:
    np.savez_compressed(f, pool_3=pool_3, mu=mu, sigma=sigma)
  logging.info('Wrote the Inception statistics of %d images to %s.', pool_3.shape[0], output_path)
  return pool_3


def pixel_mmd(a, b, bandwidth):
  """Unbiased squared maximum mean discrepancy of two sets of images, RBF kernel exp(-|x-y|^2 / (2 h^2)).

  Args:
    a, b: arrays (N, ...) and (M, ...) of at least 2 images each; compared as flat vectors.
    bandwidth: the kernel's bandwidth h.

  Returns:
    A float; its expectation is 0 when a and b come from the same distribution (so it can be slightly negative).
  """
  a = np.asarray(a, dtype=np.float64).reshape(len(a), -1)
  b = np.asarray(b, dtype=np.float64).reshape(len(b), -1)

  def mean_kernel(x, y, same):
    sq = np.maximum((x * x).sum(1)[:, None] + (y * y).sum(1)[None, :] - 2. * x @ y.T, 0.)
    k = np.exp(-sq / (2. * bandwidth ** 2))
    if same:  # drop the diagonal, k(x, x) = 1
      return (k.sum() - len(x)) / (len(x) * (len(x) - 1))
    return k.mean()

  return float(mean_kernel(a, a, True) + mean_kernel(b, b, True) - 2. * mean_kernel(a, b, False))


class DigitsData(ImageData):
  """scikit-learn's 8 x 8 digits (`data.dataset = 'DIGITS'`): 17 grey levels, a fixed split (`load_digits_splits`).

  Images are level / 16 in [0, 1]; dequantized, level k becomes (k + u) / 17, so bits/dim are those of 17 levels
  (`likelihood.discrete_offset`). Inception features mean nothing for 8 x 8 grey digits, and need a download:
  samples are scored offline, against the test images, by `pixel_mmd` (bandwidth: the median distance between
  training images) and by a digit score, exp(E KL(p(y|x) || p(y))) of a logistic-regression classifier fit on the
  training images (the Inception score's formula; 10 for confident, balanced digits, 1 for noise it cannot tell
  apart).
  """

  def __init__(self, config):
    super().__init__(config)
    _digits_arrays(self.image_size, self.num_channels)  # validates the shape fields now, not at the first batch
    self._classifier = None
    self._bandwidth = None

  def prepare_sample_quality(self):
    """Fits the digit classifier and the MMD bandwidth on the training images."""
    from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
    images, labels = load_digits_splits()['train']
    x = images.reshape(len(images), -1) / (self.num_levels - 1.)
    self._classifier = LogisticRegression(max_iter=2000).fit(x, labels)
    sq = np.maximum((x * x).sum(1)[:, None] + (x * x).sum(1)[None, :] - 2. * x @ x.T, 0.)
    self._bandwidth = float(np.sqrt(np.median(sq[np.triu_indices(len(x), 1)])))

  def sample_statistics(self, arrays):
    """No per-round statistics: the metrics need the images themselves."""
    del arrays
    return None

  def sample_quality(self, rounds, num_samples):
    """`{'mmd', 'digit_score'}` of the first `num_samples` samples (uint8 NHWC) against the test images."""
    if self._classifier is None:
      self.prepare_sample_quality()
    samples = np.concatenate([arrays for arrays, _ in rounds], axis=0)[:num_samples]
    x = samples.reshape(len(samples), -1).astype(np.float64) / 255.
    test = load_digits_splits()['test'][0]
    mmd = pixel_mmd(x, test.reshape(len(test), -1) / (self.num_levels - 1.), self._bandwidth)
    p = np.clip(self._classifier.predict_proba(x), 1e-12, 1.)
    kl = (p * (np.log(p) - np.log(p.mean(0, keepdims=True)))).sum(1)
    return {'mmd': mmd, 'digit_score': float(np.exp(kl.mean()))}


def get_data(config):
  """The data set object of `config.data.dataset`: `toy.ToyData` for 'TOY', `DigitsData` for 'DIGITS', else
  `ImageData`."""
  dataset = _dataset_name(config)
  if dataset == 'TOY':
    import toy  # pylint: disable=g-import-not-at-top
    return toy.ToyData(config)
  if dataset == 'DIGITS':
    return DigitsData(config)
  return ImageData(config)
