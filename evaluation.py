"""The Inception network of TF-GAN, FID / Inception Score / KID, and dataset statistics (as Score SDE).

FID, KID and IS are computed with TF-GAN's functions on the TF-GAN Inception module's `pool_3` features and
`logits`, exactly as Score SDE does, so the numbers are comparable with Score SDE's and FP-Diffusion's. The
module's location is `config.eval.inception_model`: the TF-Hub handle by default, or a local directory holding
the SavedModel (e.g. a copy of the TF-Hub cache) on machines without network.

TensorFlow runs on the CPU only (`tf_cpu.import_tensorflow` hides the GPUs from it) and is imported lazily,
inside the functions that need it. This module reads no data set: the data objects of `datasets.py` score their
samples with it, and `datasets.compute_dataset_stats` writes the statistics files it reads.
"""

import logging
import os

import numpy as np
from scipy import linalg

import tf_cpu
import utils

INCEPTION_TFHUB = 'https://tfhub.dev/tensorflow/tfgan/eval/inception/1'
INCEPTION_V3_TFHUB = 'https://tfhub.dev/google/imagenet/inception_v3/feature_vector/4'
INCEPTION_OUTPUT = 'logits'
INCEPTION_FINAL_POOL = 'pool_3'
INCEPTION_DEFAULT_IMAGE_SIZE = 299
# Images per call of the network. Score SDE splits a batch over its accelerators; here the network runs on the
# CPU, and chunks bound its memory (a 1024-image batch at 299 x 299 needs tens of GB of activations).
INCEPTION_MAX_CHUNK = 100

# Score SDE's statistics files live in assets/stats/ of the repository.
STATS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), 'assets', 'stats')

# tf.function objects, built on first use so that importing this module does not import TensorFlow.
_TF_FUNCTIONS = {}


def inceptionv3_from_config(config):
  """Whether Score SDE uses Inception-v3 features (images of 256 pixels and more) instead of TF-GAN's module."""
  image_size = utils.config_value(config, 'data.image_size')
  return image_size >= 256


def get_inception_model(inceptionv3=False, *, config=None):
  """Loads the Inception network.

  Score SDE's signature (`get_inception_model(inceptionv3=False)`); `config` is keyword-only, after it.

  Args:
    inceptionv3: if `True`, the Inception-v3 feature-vector module (Score SDE's choice for images of 256 pixels
      and more: pool features only, no logits); otherwise TF-GAN's Inception module (`pool_3` and `logits`).
    config: if given, `config.eval.inception_model` gives the module's location: a TF-Hub handle or a local
      directory holding the SavedModel. When it is the default TF-GAN handle and `inceptionv3` is `True`, the
      Inception-v3 handle is used; any other value is used as given. Without a config, the TF-Hub handles.

  Returns:
    The loaded module: calling it on a batch of images returns a dict with `pool_3` and `logits` (TF-GAN's
    module) or the pool features (Inception-v3).

  Raises:
    RuntimeError: when the module cannot be loaded; the message names `config.eval.inception_model`.
  """
  handle = INCEPTION_TFHUB
  if config is not None:
    handle = config.eval.inception_model
    if not isinstance(handle, str) or not handle:
      raise ValueError(f'config.eval.inception_model={handle!r} must be a TF-Hub handle or a local directory '
                       'holding the Inception SavedModel.')
  if inceptionv3 and handle == INCEPTION_TFHUB:
    handle = INCEPTION_V3_TFHUB
  if not utils.is_remote(handle):
    # A local SavedModel is a directory; a FIFO or device there would block or never end TF-Hub's read. A
    # missing one is left to TF-Hub, whose error is worded below.
    utils.check_input_path(handle, 'config.eval.inception_model', expected='directory', missing_ok=True)
  tf_cpu.import_tensorflow()
  import tensorflow_hub as tfhub  # pylint: disable=g-import-not-at-top
  try:
    model = tfhub.load(handle)
  except Exception as e:  # TF-Hub raises many kinds (network, file system, format); all mean "not loadable".
    raise RuntimeError(
        f'config.eval.inception_model={handle!r}: the Inception network could not be loaded ({type(e).__name__}: '
        f'{e}). Set config.eval.inception_model to a TF-Hub handle, or, without network, to a local directory '
        f'holding the SavedModel (download {INCEPTION_TFHUB} elsewhere, e.g. from the TF-Hub cache of a machine '
        'with network).') from e
  logging.info('Loaded the Inception network from %s.', handle)
  return model


def default_stats_path(config):
  """The statistics file Score SDE's naming gives the configured dataset.

  `assets/stats/cifar10_stats.npz`, `celeba_stats.npz` and `lsun_{category}_{image_size}_stats.npz` are Score
  SDE's names; other datasets follow the same pattern (`svhn_stats.npz`, `imagenet32_stats.npz`,
  `ffhq_{image_size}_stats.npz`, `celebahq_{image_size}_stats.npz`), and an `NPZ` dataset's file lies beside
  it (`<data.path without .npz>_stats.npz`).

  Args:
    config: the config; reads `data.dataset` (and `data.category`, `data.image_size`, `data.path`).

  Returns:
    The path of the statistics file.
  """
  dataset = config.data.dataset
  if dataset in ('CIFAR10', 'CELEBA', 'SVHN', 'IMAGENET32'):
    return os.path.join(STATS_DIR, f'{dataset.lower()}_stats.npz')
  if dataset == 'LSUN':
    image_size = utils.config_value(config, 'data.image_size')
    return os.path.join(STATS_DIR, f'lsun_{config.data.category}_{image_size}_stats.npz')
  if dataset in ('FFHQ', 'CelebAHQ'):
    image_size = utils.config_value(config, 'data.image_size')
    return os.path.join(STATS_DIR, f'{dataset.lower()}_{image_size}_stats.npz')
  if dataset == 'NPZ':
    if not config.data.path:
      raise ValueError("config.data.path='' is empty; an NPZ dataset's statistics file is named after it (or set "
                       'config.eval.stats_path).')
    return os.path.splitext(config.data.path)[0] + '_stats.npz'
  raise ValueError(f'config.data.dataset={dataset!r} has no Inception statistics file (FID is for RGB image data '
                   "sets); allowed: 'CIFAR10', 'CELEBA', 'SVHN', 'IMAGENET32', 'LSUN', 'FFHQ', 'CelebAHQ', 'NPZ'.")


def stats_path_from_config(config):
  """The dataset's statistics file: `config.eval.stats_path` if set, else `default_stats_path(config)`."""
  path = config.eval.get('stats_path', '')
  if not isinstance(path, str):
    raise ValueError(f'config.eval.stats_path={path!r} must be a string (a path, or \'\' for the default '
                     'file under assets/stats/).')
  return path or default_stats_path(config)


def load_dataset_stats(config):
  """Loads the pre-computed Inception statistics of the dataset.

  Args:
    config: the config; `config.eval.stats_path` if set, else Score SDE's file under `assets/stats/`.

  Returns:
    The loaded `.npz` (dict-like): `pool_3` holds the dataset's pool_3 features, one row per image.

  Raises:
    FileNotFoundError: if the file does not exist; the message says how to compute it.
    ValueError: if something other than a regular file is at the path (a directory, FIFO, device), or the file
      holds no `pool_3` array.
  """
  path = stats_path_from_config(config)
  # A directory, FIFO or device there is refused before np.load opens it (a FIFO would block it).
  utils.check_input_path(path, 'config.eval.stats_path', missing_ok=True)
  if not os.path.lexists(path):
    raise FileNotFoundError(
        f'Inception statistics file {path!r} does not exist (config.eval.stats_path='
        f'{config.eval.get("stats_path", "")!r}). Compute it with datasets.compute_dataset_stats(config, '
        f'{path!r}) (the stats mode of main.py), or copy Score SDE\'s file there (only cifar10_stats.npz is '
        'published).')
  stats = np.load(path)
  if INCEPTION_FINAL_POOL not in stats.files:
    raise ValueError(f'{path}: no {INCEPTION_FINAL_POOL!r} array (it holds {sorted(stats.files)!r}); expected '
                     'the pool_3 features of the dataset, as written by datasets.compute_dataset_stats.')
  return stats


def _flatten_batch(x):
  """(B, ...) -> (B, prod(...)): TF-GAN's module returns pool_3 of shape (B, 1, 1, 2048) in some versions."""
  tf = tf_cpu.import_tensorflow()
  return tf.reshape(x, [tf.shape(x)[0], -1])


def classifier_fn_from_tfhub(output_fields, inception_model, return_tensor=False):
  """Returns a TF-GAN classifier function that calls an already loaded module.

  TF-GAN's own version loads the module on every call; this one reuses `inception_model`.

  Args:
    output_fields: a string, a list of strings, or `None`. If present, the module returns a dict and these
      fields are kept.
    inception_model: the loaded module (`get_inception_model`).
    return_tensor: if `True`, return the single selected output rather than a dict.

  Returns:
    A function from an image tensor to the (flattened) outputs.
  """
  if isinstance(output_fields, str):
    output_fields = [output_fields]

  def _classifier_fn(images):
    tf = tf_cpu.import_tensorflow()
    output = inception_model(images)
    if output_fields is not None:
      output = {x: output[x] for x in output_fields}
    if return_tensor:
      if len(output) != 1:
        raise ValueError(f'return_tensor=True needs exactly one output field; got {sorted(output)!r}.')
      output = list(output.values())[0]
    return tf.nest.map_structure(_flatten_batch, output)

  return _classifier_fn


def _run_inception(inputs, inception_model, num_batches, inceptionv3):
  """The body of `run_inception_jit` (traced by tf.function)."""
  tf = tf_cpu.import_tensorflow()
  import tensorflow_gan as tfgan  # pylint: disable=g-import-not-at-top
  if not inceptionv3:
    # TF-GAN's module expects images in [-1, 1] (it resizes them to 299 x 299 itself).
    inputs = (tf.cast(inputs, tf.float32) - 127.5) / 127.5
  else:
    inputs = tf.cast(inputs, tf.float32) / 255.
  dtypes = None if inceptionv3 else {INCEPTION_OUTPUT: tf.float32, INCEPTION_FINAL_POOL: tf.float32}
  return tfgan.eval.run_classifier_fn(inputs, num_batches=num_batches,
                                      classifier_fn=classifier_fn_from_tfhub(None, inception_model),
                                      dtypes=dtypes)


def run_inception_jit(inputs, inception_model, num_batches=1, inceptionv3=False):
  """Runs the Inception network (a tf.function) on images in [0, 255].

  Args:
    inputs: uint8 or float images of shape (B, H, W, 3), values in [0, 255].
    inception_model: the loaded module (`get_inception_model`).
    num_batches: the number of batches TF-GAN splits `inputs` into (must divide B).
    inceptionv3: whether `inception_model` is the Inception-v3 feature vector module.

  Returns:
    TF-GAN's module: a dict of tensors `pool_3` (B, 2048) and `logits` (B, 1008). Inception-v3: the pool
    features (B, 2048).
  """
  if 'run_inception' not in _TF_FUNCTIONS:
    tf = tf_cpu.import_tensorflow()
    _TF_FUNCTIONS['run_inception'] = tf.function(_run_inception)
  return _TF_FUNCTIONS['run_inception'](inputs, inception_model, num_batches, inceptionv3)


def run_inception_distributed(input_tensor, inception_model, num_batches=1, inceptionv3=False):
  """Runs the Inception network on a batch of images, in chunks, and returns numpy features.

  Score SDE splits the batch over its accelerators; TensorFlow runs on the CPU here, so the batch is split
  into chunks of at most `INCEPTION_MAX_CHUNK` images to bound memory. The features do not depend on the split.

  Args:
    input_tensor: uint8 or float images of shape (B, H, W, 3), values in [0, 255] (numpy or tensor).
    inception_model: the loaded module (`get_inception_model`).
    num_batches: passed on to `run_inception_jit` for each chunk.
    inceptionv3: whether `inception_model` is the Inception-v3 feature vector module.

  Returns:
    A dict with `pool_3` (float32 array (B, 2048)) and `logits` (float32 array (B, 1008); None for
    Inception-v3).
  """
  images = np.asarray(input_tensor)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f'run_inception_distributed expects images of shape (B, H, W, 3); got {images.shape}.')
  pools, logits = [], []
  for start in range(0, images.shape[0], INCEPTION_MAX_CHUNK):
    expected = (f'the Inception-v3 feature vector ({INCEPTION_V3_TFHUB}), for images of 256 pixels or more'
                if inceptionv3 else f"TF-GAN's Inception module ({INCEPTION_TFHUB}), for images under 256 pixels")
    res = run_inception_jit(images[start:start + INCEPTION_MAX_CHUNK], inception_model,
                            num_batches=num_batches, inceptionv3=inceptionv3)
    # A module of the other kind (chosen by image size, as Score SDE) would fail later with an obscure error.
    if inceptionv3:
      if isinstance(res, dict):
        raise ValueError(f'config.eval.inception_model: the module returned a dict {sorted(res)!r}; expected '
                         f'{expected}.')
      pools.append(np.asarray(res))
    else:
      if not isinstance(res, dict):
        raise ValueError(f'config.eval.inception_model: the module returned a {type(res).__name__}, not a dict; '
                         f'expected {expected}.')
      missing = {INCEPTION_FINAL_POOL, INCEPTION_OUTPUT} - set(res)
      if missing:
        raise ValueError(f'The Inception module returned {sorted(res)!r}, without {sorted(missing)!r}; expected '
                         'the TF-GAN Inception module (config.eval.inception_model).')
      pools.append(np.asarray(res[INCEPTION_FINAL_POOL]))
      logits.append(np.asarray(res[INCEPTION_OUTPUT]))
  return {
      INCEPTION_FINAL_POOL: np.concatenate(pools, axis=0),
      INCEPTION_OUTPUT: None if inceptionv3 else np.concatenate(logits, axis=0),
  }


def images_to_uint8(images):
  """Float images in [0, 1] -> uint8 in [0, 255], rounded (exact for 8-bit data) and clipped.

  Score SDE's run_lib truncates model samples (`np.clip(x * 255., 0, 255).astype(np.uint8)`); for data, which
  are k / 255 in float32, truncation could map k to k - 1, hence rounding here.
  """
  return np.clip(np.round(np.asarray(images, dtype=np.float64) * 255.), 0, 255).astype(np.uint8)


def frechet_distance(mu1, sigma1, mu2, sigma2, eps=1e-6):
  """Frechet distance between N(mu1, sigma1) and N(mu2, sigma2), in numpy/scipy (float64).

  d^2 = |mu1 - mu2|^2 + tr(sigma1 + sigma2 - 2 (sigma1 sigma2)^{1/2}).

  Args:
    mu1, mu2: mean vectors (D,).
    sigma1, sigma2: covariance matrices (D, D).
    eps: if the product's square root is not finite (singular covariances), it is recomputed with eps * I
      added to both covariances.

  Returns:
    The squared Frechet distance, a Python float.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != mu1.shape * 2:
    raise ValueError(f'frechet_distance: shapes do not match: mu1 {mu1.shape}, mu2 {mu2.shape}, sigma1 '
                     f'{sigma1.shape}, sigma2 {sigma2.shape}.')
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    logging.warning('frechet_distance: singular covariance product; adding %g to the diagonals.', eps)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  # sqrtm of a product of PSD matrices has real eigenvalues; an imaginary part is round-off.
  covmean = np.real(covmean)
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2. * np.trace(covmean))


def activation_statistics(activations):
  """Mean and unbiased covariance (as TF-GAN's FID) of activations of shape (N, D), in float64."""
  activations = np.asarray(activations, np.float64)
  if activations.ndim != 2 or activations.shape[0] < 2:
    raise ValueError(f'activation_statistics needs activations of shape (N >= 2, D); got {activations.shape}.')
  return activations.mean(axis=0), np.cov(activations, rowvar=False)


def _same_float_dtype(a, b):
  """Both as float arrays of one dtype (TF-GAN asserts equal dtypes); float32 pools stay float32."""
  a, b = np.asarray(a), np.asarray(b)
  dtype = np.result_type(a.dtype, b.dtype, np.float32)
  return a.astype(dtype, copy=False), b.astype(dtype, copy=False)


def fid_from_activations(data_pools, sample_pools):
  """FID with TF-GAN's `frechet_classifier_distance_from_activations` (Score SDE's computation).

  Args:
    data_pools, sample_pools: pool_3 features, (N, D) and (M, D).

  Returns:
    The FID, a float. TF-GAN computes in float64 and casts the result to the features' dtype.
  """
  tf_cpu.import_tensorflow()
  import tensorflow_gan as tfgan  # pylint: disable=g-import-not-at-top
  data_pools, sample_pools = _same_float_dtype(data_pools, sample_pools)
  return float(tfgan.eval.frechet_classifier_distance_from_activations(data_pools, sample_pools))


def kid_from_activations(data_pools, sample_pools):
  """KID with TF-GAN's `kernel_classifier_distance_from_activations` (Score SDE's computation).

  Args:
    data_pools, sample_pools: pool_3 features, (N, D) and (M, D).

  Returns:
    The KID (unbiased MMD^2 with the cubic polynomial kernel, averaged over blocks of <= 1024), a float.
  """
  tf = tf_cpu.import_tensorflow()
  import tensorflow_gan as tfgan  # pylint: disable=g-import-not-at-top
  data_pools, sample_pools = _same_float_dtype(data_pools, sample_pools)
  # TF-GAN's KID reads `.shape.assert_has_rank`, which numpy arrays lack (Score SDE converts too).
  return float(tfgan.eval.kernel_classifier_distance_from_activations(tf.convert_to_tensor(data_pools),
                                                                      tf.convert_to_tensor(sample_pools)))


def inception_score_from_logits(logits):
  """Inception Score with TF-GAN's `classifier_score_from_logits` (Score SDE's computation), a float."""
  tf_cpu.import_tensorflow()
  import tensorflow_gan as tfgan  # pylint: disable=g-import-not-at-top
  return float(tfgan.eval.classifier_score_from_logits(logits))


def sample_quality_metrics(data_pools, sample_pools, sample_logits=None):
  """FID, Inception Score and KID of samples against a dataset, as Score SDE's run_lib computes them.

  Args:
    data_pools: pool_3 features of the dataset (`load_dataset_stats(config)['pool_3']`), (N, D).
    sample_pools: pool_3 features of the samples, (M, D).
    sample_logits: the samples' logits, or None (Inception-v3 has none; IS is then -1 as in Score SDE).

  Returns:
    A dict `{'fid', 'is', 'kid'}` of floats.
  """
  inception_score = -1. if sample_logits is None else inception_score_from_logits(sample_logits)
  fid = fid_from_activations(data_pools, sample_pools)
  kid = kid_from_activations(data_pools, sample_pools)
  return {'fid': fid, 'is': inception_score, 'kid': kid}
