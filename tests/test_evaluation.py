"""Tests of evaluation.py: Frechet distance against closed forms, TF-GAN's FID/KID/IS against numpy, and the
Inception path (loading, features, dataset statistics, FID) against a tiny SavedModel with the TF-Hub module's
interface."""
import inspect
import os
import subprocess
import sys

import numpy as np
import pytest
from scipy import stats as scipy_stats

import datasets
import evaluation
from configs import default_cifar10_configs

tf = datasets.import_tensorflow()

# The tiny network's logits weights: (6 features) -> 4 classes.
_LOGIT_WEIGHTS = np.linspace(-1., 1., 24, dtype=np.float32).reshape(6, 4)


class TinyInception(tf.Module):
  """TF-Hub Inception's call interface: images in [-1, 1] -> {'pool_3': (B, 1, 1, D), 'logits': (B, K)}."""

  @tf.function(input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  def __call__(self, images):
    features = tf.concat([tf.reduce_mean(images, axis=[1, 2]), tf.reduce_mean(images ** 2, axis=[1, 2])], 1)
    return {'pool_3': features[:, None, None, :], 'logits': tf.matmul(features, _LOGIT_WEIGHTS)}


def _expected_features(images_uint8):
  """numpy version of TinyInception on uint8 images, after Score SDE's scaling to [-1, 1]."""
  x = (images_uint8.astype(np.float64) - 127.5) / 127.5
  features = np.concatenate([x.mean(axis=(1, 2)), (x ** 2).mean(axis=(1, 2))], axis=1)
  return features, features @ _LOGIT_WEIGHTS.astype(np.float64)


@pytest.fixture(scope='module')
def tiny_inception_dir(tmp_path_factory):
  path = str(tmp_path_factory.mktemp('inception') / 'tiny_inception')
  tf.saved_model.save(TinyInception(), path)
  return path


def _config(**eval_fields):
  config = default_cifar10_configs.get_default_configs()
  for key, value in eval_fields.items():
    setattr(config.eval, key, value)
  return config


def _random_spd(rng, d):
  a = rng.normal(size=(d, d))
  return a @ a.T + 0.1 * np.eye(d)


# Frechet distance: closed forms.

def test_frechet_distance_one_dimensional():
  # Between N(m1, s1^2) and N(m2, s2^2): (m1 - m2)^2 + (s1 - s2)^2.
  assert evaluation.frechet_distance([1.], [[4.]], [-2.], [[9.]]) == pytest.approx(9. + 1., rel=1e-12)


def test_frechet_distance_diagonal_covariances():
  rng = np.random.default_rng(0)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  v1, v2 = rng.uniform(0.1, 3., size=5), rng.uniform(0.1, 3., size=5)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  assert evaluation.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)) == pytest.approx(expected, rel=1e-10)


def test_frechet_distance_commuting_covariances():
  # Same eigenvectors Q: tr(S1 + S2 - 2 (S1 S2)^{1/2}) = sum_i (sqrt(a_i) - sqrt(b_i))^2.
  rng = np.random.default_rng(1)
  q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
  a, b = rng.uniform(0.1, 4., size=6), rng.uniform(0.1, 4., size=6)
  sigma1, sigma2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
  mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
  expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  assert evaluation.frechet_distance(mu1, sigma1, mu2, sigma2) == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_rank_deficient_commuting():
  rng = np.random.default_rng(2)
  q, _ = np.linalg.qr(rng.normal(size=(4, 4)))
  a, b = np.array([0., 1., 2., 3.]), np.array([2., 0., 1., 5.])
  mu = rng.normal(size=4)
  expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
  got = evaluation.frechet_distance(mu, q @ np.diag(a) @ q.T, mu, q @ np.diag(b) @ q.T)
  assert got == pytest.approx(expected, abs=1e-5)


def test_frechet_distance_general_covariances():
  rng = np.random.default_rng(3)
  s1, s2 = _random_spd(rng, 5), _random_spd(rng, 5)
  mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
  assert evaluation.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0., abs=1e-8)
  d12 = evaluation.frechet_distance(mu1, s1, mu2, s2)
  assert d12 == pytest.approx(evaluation.frechet_distance(mu2, s2, mu1, s1), rel=1e-9)
  # tr (S1 S2)^{1/2} = tr (S1^{1/2} S2 S1^{1/2})^{1/2}, from eigen-decompositions only.
  w, v = np.linalg.eigh(s1)
  root1 = v @ np.diag(np.sqrt(w)) @ v.T
  cross = np.sum(np.sqrt(np.linalg.eigvalsh(root1 @ s2 @ root1)))
  expected = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2. * cross
  assert d12 == pytest.approx(expected, rel=1e-9)


def test_frechet_distance_shape_mismatch():
  with pytest.raises(ValueError, match='shapes do not match'):
    evaluation.frechet_distance(np.zeros(3), np.eye(3), np.zeros(3), np.eye(2))


# TF-GAN's metrics against numpy.

@pytest.mark.parametrize('dtype', [np.float32, np.float64])
def test_tfgan_fid_equals_numpy(dtype):
  rng = np.random.default_rng(4)
  a = rng.normal(size=(40, 5)).astype(dtype)
  b = (rng.normal(size=(30, 5)) * 1.5 + 0.3).astype(dtype)
  expected = evaluation.frechet_distance(*evaluation.activation_statistics(a),
                                         *evaluation.activation_statistics(b))
  assert evaluation.fid_from_activations(a, b) == pytest.approx(expected, rel=1e-5 if dtype == np.float32 else 1e-9)
  assert evaluation.fid_from_activations(a, a) == pytest.approx(0., abs=1e-5)


def test_tfgan_kid_equals_numpy_unbiased_mmd():
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(20, 4)), rng.normal(size=(15, 4)) + 0.5

  def kernel(u, v):
    return (u @ v.T / u.shape[1] + 1.) ** 3

  kxx, kyy, kxy = kernel(x, x), kernel(y, y), kernel(x, y)
  m, n = len(x), len(y)
  expected = ((kxx.sum() - np.trace(kxx)) / (m * (m - 1)) + (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
              - 2. * kxy.mean())
  assert evaluation.kid_from_activations(x, y) == pytest.approx(expected, rel=1e-9)


def test_inception_score_known_values():
  # Uniform predictions: p(y|x) = p(y), KL = 0, IS = 1.
  assert evaluation.inception_score_from_logits(np.zeros((10, 7), np.float32)) == pytest.approx(1., abs=1e-6)
  # Confident, distinct classes, equally often: IS = number of classes.
  logits = 100. * np.tile(np.eye(5, dtype=np.float32), (3, 1))
  assert evaluation.inception_score_from_logits(logits) == pytest.approx(5., rel=1e-5)
  # General logits: exp(E_x KL(p(y|x) || p(y))).
  logits = np.random.default_rng(6).normal(size=(12, 4))
  p = np.exp(logits - logits.max(1, keepdims=True))
  p /= p.sum(1, keepdims=True)
  expected = np.exp(np.mean(scipy_stats.entropy(p.T, p.mean(0)[:, None])))
  assert evaluation.inception_score_from_logits(logits) == pytest.approx(expected, rel=1e-9)


def test_sample_quality_metrics():
  rng = np.random.default_rng(7)
  data, samples = rng.normal(size=(30, 4)).astype(np.float32), rng.normal(size=(20, 4)).astype(np.float32)
  logits = rng.normal(size=(20, 3)).astype(np.float32)
  metrics = evaluation.sample_quality_metrics(data, samples, logits)
  assert metrics == {'fid': evaluation.fid_from_activations(data, samples),
                     'is': evaluation.inception_score_from_logits(logits),
                     'kid': evaluation.kid_from_activations(data, samples)}
  assert evaluation.sample_quality_metrics(data, samples)['is'] == -1.


# The Inception path with a tiny SavedModel in place of the TF-Hub module.

def test_inception_features_from_local_savedmodel(tiny_inception_dir, monkeypatch):
  model = evaluation.get_inception_model(config=_config(inception_model=tiny_inception_dir))
  images = np.random.default_rng(8).integers(0, 256, size=(7, 5, 5, 3), dtype=np.uint8)
  monkeypatch.setattr(evaluation, 'INCEPTION_MAX_CHUNK', 3)  # chunks of 3, 3, 1
  latents = evaluation.run_inception_distributed(images, model)
  pool, logits = _expected_features(images)
  assert latents['pool_3'].shape == (7, 6) and latents['logits'].shape == (7, 4)
  np.testing.assert_allclose(latents['pool_3'], pool, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(latents['logits'], logits, rtol=1e-5, atol=1e-6)
  # Float input in [0, 255] gives the same features as uint8, as Score SDE feeds either.
  jit = evaluation.run_inception_jit(images.astype(np.float32), model)
  np.testing.assert_allclose(np.asarray(jit['pool_3']), pool, rtol=1e-5, atol=1e-6)


def test_module_without_logits_is_rejected():
  def pool_only(images):
    return {'pool_3': tf.reduce_mean(images, axis=[1, 2])}

  with pytest.raises(ValueError, match=r"without \['logits'\].*config\.eval\.inception_model"):
    evaluation.run_inception_distributed(np.zeros((2, 3, 3, 3), np.uint8), pool_only)


def test_inception_load_errors_name_the_setting(tmp_path):
  missing = str(tmp_path / 'no_such_module')
  with pytest.raises(RuntimeError, match=r'config\.eval\.inception_model=.*no_such_module'):
    evaluation.get_inception_model(config=_config(inception_model=missing))
  empty = tmp_path / 'empty'
  empty.mkdir()
  with pytest.raises(RuntimeError, match=r'config\.eval\.inception_model=.*empty'):
    evaluation.get_inception_model(config=_config(inception_model=str(empty)))
  with pytest.raises(ValueError, match=r"config\.eval\.inception_model=''"):
    evaluation.get_inception_model(config=_config(inception_model=''))


def test_inceptionv3_handle_choice(monkeypatch):
  import tensorflow_hub
  loaded = []
  monkeypatch.setattr(tensorflow_hub, 'load', lambda handle: loaded.append(handle) or 'model')
  evaluation.get_inception_model(inceptionv3=True, config=_config())
  evaluation.get_inception_model(inceptionv3=False, config=_config())
  evaluation.get_inception_model(True, config=_config(inception_model='/local/v3'))
  evaluation.get_inception_model(inceptionv3=False)
  evaluation.get_inception_model(True)  # Score SDE's positional call
  assert loaded == [evaluation.INCEPTION_V3_TFHUB, evaluation.INCEPTION_TFHUB, '/local/v3',
                    evaluation.INCEPTION_TFHUB, evaluation.INCEPTION_V3_TFHUB]


def test_get_inception_model_keeps_score_sdes_signature():
  # Score SDE: get_inception_model(inceptionv3=False). Additions are keyword-only and come after it.
  params = list(inspect.signature(evaluation.get_inception_model).parameters.values())
  assert [(p.name, p.kind, p.default) for p in params[:1]] == [
      ('inceptionv3', inspect.Parameter.POSITIONAL_OR_KEYWORD, False)]
  assert [p.name for p in params[1:]] == ['config']
  assert all(p.kind is inspect.Parameter.KEYWORD_ONLY and p.default is None for p in params[1:])


def _stats_config(**data):
  config = _config()
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


def test_default_stats_paths():
  path = evaluation.stats_path_from_config
  stats_dir = evaluation.STATS_DIR
  assert path(_stats_config()) == os.path.join(stats_dir, 'cifar10_stats.npz')
  assert path(_stats_config(dataset='CELEBA')) == os.path.join(stats_dir, 'celeba_stats.npz')
  lsun = _stats_config(dataset='LSUN', image_size=256, category='church_outdoor')
  assert path(lsun) == os.path.join(stats_dir, 'lsun_church_outdoor_256_stats.npz')
  assert path(_stats_config(dataset='IMAGENET32')) == os.path.join(stats_dir, 'imagenet32_stats.npz')
  assert path(_stats_config(dataset='FFHQ', image_size=1024)) == os.path.join(stats_dir, 'ffhq_1024_stats.npz')
  assert path(_stats_config(dataset='NPZ', path='/d/faces.npz')) == '/d/faces_stats.npz'
  config = _stats_config()
  config.eval.stats_path = '/x/mine.npz'
  assert path(config) == '/x/mine.npz'
  with pytest.raises(ValueError, match=r"config\.data\.dataset='TOY'"):
    path(_stats_config(dataset='TOY'))


def test_load_dataset_stats_errors(tmp_path):
  config = _config(stats_path=str(tmp_path / 'absent_stats.npz'))
  with pytest.raises(FileNotFoundError, match=r'absent_stats\.npz.*compute_dataset_stats'):
    evaluation.load_dataset_stats(config)
  bad = str(tmp_path / 'bad_stats.npz')
  np.savez(bad, mu=np.zeros(3))
  with pytest.raises(ValueError, match=r"bad_stats\.npz: no 'pool_3'"):
    evaluation.load_dataset_stats(_config(stats_path=bad))


def test_dataset_stats_and_fid_end_to_end(tiny_inception_dir, tmp_path):
  rng = np.random.default_rng(9)
  train = rng.integers(0, 256, size=(8, 6, 6, 3), dtype=np.uint8)
  test = np.clip(rng.normal(100., 40., size=(8, 6, 6, 3)), 0, 255).astype(np.uint8)
  data_path = str(tmp_path / 'data.npz')
  np.savez(data_path, train=train, test=test)
  # Batches of 3: the last, partial batch (2 images) is kept, so the statistics cover all 8 images.
  config = _config(inception_model=tiny_inception_dir, batch_size=3)
  config.data.dataset, config.data.path, config.data.image_size = 'NPZ', data_path, 6
  out = str(tmp_path / 'stats' / 'data_stats.npz')

  datasets.compute_dataset_stats(config, out)
  # An existing statistics file is never replaced unless asked.
  before = open(out, 'rb').read()
  with pytest.raises(FileExistsError, match='data_stats.npz exists'):
    datasets.compute_dataset_stats(config, out)
  assert open(out, 'rb').read() == before
  expected_train, _ = _expected_features(train)
  with np.load(out) as f:
    pool_3, mu, sigma = f['pool_3'], f['mu'], f['sigma']
  assert pool_3.shape == (8, 6)
  # Every training image once (the pipeline shuffles): compare rows sorted the same way.
  order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
  np.testing.assert_allclose(order(pool_3), order(expected_train), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(mu, expected_train.mean(0), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(sigma, np.cov(expected_train, rowvar=False), rtol=1e-4, atol=1e-6)
  assert os.listdir(os.path.dirname(out)) == ['data_stats.npz']  # no temporary file left behind

  # FID of the test images against the written statistics, as run_lib computes it.
  config.eval.stats_path = out
  data_pools = evaluation.load_dataset_stats(config)['pool_3']
  model = evaluation.get_inception_model(config=config)
  sample_pools = evaluation.run_inception_distributed(test, model)['pool_3']
  expected_test, _ = _expected_features(test)
  expected_fid = evaluation.frechet_distance(*evaluation.activation_statistics(expected_train),
                                             *evaluation.activation_statistics(expected_test))
  assert expected_fid > 0.01
  assert evaluation.fid_from_activations(data_pools, sample_pools) == pytest.approx(expected_fid, rel=1e-3)


def test_images_to_uint8_is_exact_for_8bit_data():
  pixels = np.arange(256, dtype=np.uint8)
  as_float = tf.image.convert_image_dtype(pixels, tf.float32).numpy()  # what the data pipeline yields
  np.testing.assert_array_equal(evaluation.images_to_uint8(as_float), pixels)
  np.testing.assert_array_equal(evaluation.images_to_uint8(np.array([-0.5, 1.5])), [0, 255])


def test_import_does_not_import_tensorflow():
  root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  code = ('import sys, evaluation, datasets; '
          'assert not any(m.startswith("tensorflow") for m in sys.modules), "tensorflow imported"')
  subprocess.run([sys.executable, '-c', code], cwd=root, check=True)


def test_module_of_the_wrong_kind_is_named():
  def tfgan_like(images):
    pool = tf.reduce_mean(images, axis=[1, 2])
    return {'pool_3': pool, 'logits': pool}

  def feature_vector(images):
    return tf.reduce_mean(images, axis=[1, 2])

  images = np.zeros((2, 3, 3, 3), np.uint8)
  with pytest.raises(ValueError, match=r"config\.eval\.inception_model: the module returned a dict \['logits', "
                                       r"'pool_3'\]; expected the Inception-v3 feature vector"):
    evaluation.run_inception_distributed(images, tfgan_like, inceptionv3=True)
  with pytest.raises(ValueError, match=r'config\.eval\.inception_model: the module returned a .*, not a dict; '
                                       r"expected TF-GAN's Inception module"):
    evaluation.run_inception_distributed(images, feature_vector, inceptionv3=False)
