"""Tests of the 2-D toy data (`toy.py`), its metrics and figures, and the MLP score model (`models/mlp.py`)."""

import math
import os

import numpy as np
import pytest
import torch

import sde_lib
import toy
from configs.toy import default_toy_configs, ve_dsm, vp_dsm
from models import utils as mutils


def _config(**data):
  config = default_toy_configs.get_default_configs()
  config.training.batch_size = 64
  config.eval.batch_size = 50
  config.data.toy_eval_batches = 3
  for key, value in data.items():
    setattr(config.data, key, value)
  return config


@pytest.mark.parametrize('name', toy.TOY_DENSITIES)
def test_batches_are_nhwc_images_and_reproducible(name):
  config = _config(toy=name)
  train_ds, eval_ds = toy.get_toy_datasets(config)
  batch = next(iter(train_ds))
  image = np.asarray(batch['image'])
  assert image.shape == (64, 1, 1, 2) and image.dtype == np.float32
  assert np.array_equal(batch['label'], np.zeros(64))
  # Densities are scaled to about [-2, 2]^2 (configs rely on it for sigma_max and the VP prior).
  assert np.abs(image).max() < 2.6
  assert 0.6 < image.reshape(-1, 2).std(0).min() and image.reshape(-1, 2).std(0).max() < 1.6
  # Same seed, same stream; another seed, other points.
  assert np.array_equal(next(iter(toy.get_toy_datasets(config)[0]))['image'], image)
  config.seed = 7
  assert not np.array_equal(next(iter(toy.get_toy_datasets(config)[0]))['image'], image)
  # The training stream is fresh: consecutive batches differ.
  it = iter(train_ds)
  assert not np.array_equal(next(it)['image'], next(it)['image'])


def test_stream_starts_at_any_batch():
  train_ds, _ = toy.get_toy_datasets(_config())
  it = iter(train_ds)
  first = [next(it)['image'] for _ in range(5)]
  resumed = iter(train_ds.from_batch(3))
  assert np.array_equal(next(resumed)['image'], first[3]) and np.array_equal(next(resumed)['image'], first[4])


@pytest.mark.parametrize('field, value, message', [
    ('centered', True, r'config.data.centered=True is not allowed; choose one of \(False,\)'),
])
def test_toy_data_refuse_a_centering_scaler(field, value, message):
  config = _config()
  setattr(config.data, field, value)
  with pytest.raises(ValueError, match=message):
    toy.get_toy_datasets(config)


def test_toy_data_refuse_dequantization():
  import datasets
  with pytest.raises(ValueError, match=r"uniform_dequantization=True is not allowed for config.data.dataset='TOY'"):
    datasets.get_dataset(_config(), uniform_dequantization=True)


def test_checkerboard_edges_belong_to_their_squares():
  # Float32 rounding can put a sample exactly on an edge or corner of its square.
  on_edges = np.array([[-2., -2.], [0., 0.], [1., 0.5], [-1., -1.5], [2., 1.], [1.5, 2.]])
  assert np.all(np.isfinite(toy.log_density('checkerboard', on_edges)))
  off = np.array([[0.5, -0.5], [0.5, 2.], [2.5, 0.5], [-2., 2.5]])  # white squares and their edges, off the board
  assert np.all(np.isinf(toy.log_density('checkerboard', off)))


def test_eval_sets_are_finite_fixed_and_disjoint_from_train():
  config = _config()
  train_ds, eval_ds = toy.get_toy_datasets(config, evaluation=True)
  assert len(eval_ds) == 3 and len(train_ds) == 3
  batches = [b['image'] for b in eval_ds]
  assert len(batches) == 3 and all(b.shape == (50, 1, 1, 2) for b in batches)
  assert np.array_equal(np.concatenate(batches), np.concatenate([b['image'] for b in eval_ds]))
  assert not np.array_equal(batches[0], next(iter(train_ds))['image'])
  # While training, the eval set repeats forever (run_lib draws it with next()), same points as evaluation.
  _, eval_repeating = toy.get_toy_datasets(config, evaluation=False)
  it = iter(eval_repeating)
  repeated = [next(it)['image'] for _ in range(4)]
  assert np.array_equal(repeated[3], batches[0]) and np.array_equal(repeated[1], batches[1])


def test_checkerboard_fills_black_squares_only():
  points = toy.sample_toy('checkerboard', 20000, np.random.default_rng(0))
  cells = np.floor(points).astype(int)
  # Filled squares are those whose integer coordinates have an even sum (8 of the 16 squares on [-2, 2]^2).
  assert np.all((cells[:, 0] + cells[:, 1]) % 2 == 0)
  assert len({tuple(c) for c in cells}) == 8


@pytest.mark.parametrize('field, value, message', [
    ('toy', 'moons', 'config.data.toy'),
    ('image_size', 32, 'config.data.image_size'),
    ('num_channels', 3, 'config.data.num_channels'),
    ('toy_eval_batches', 0, 'config.data.toy_eval_batches'),
])
def test_config_validation(field, value, message):
  with pytest.raises(ValueError, match=message):
    toy.get_toy_datasets(_config(**{field: value}))


def test_sliced_wasserstein_known_values():
  rng = np.random.default_rng(0)
  a = rng.standard_normal((500, 2))
  assert toy.sliced_wasserstein(a, a) == 0.
  assert toy.sliced_wasserstein(a, a[::-1]) == pytest.approx(0., abs=1e-12)  # order does not matter
  delta = np.array([0.3, -0.4])
  # Evenly spaced directions average cos^2 to exactly 1/2: SW_2(a, a + delta) = |delta| / sqrt(2).
  assert toy.sliced_wasserstein(a, a + delta) == pytest.approx(0.5 / math.sqrt(2), rel=1e-12)
  # A scaling x -> c x moves each projected order statistic by (c - 1) x_(i).
  expected = math.sqrt(np.mean((np.sort(a @ np.stack([np.cos(np.pi * np.arange(128) / 128),
                                                        np.sin(np.pi * np.arange(128) / 128)]), 0)) ** 2))
  assert toy.sliced_wasserstein(a, 2. * a) == pytest.approx(expected, rel=1e-10)
  with pytest.raises(ValueError, match='equally sized'):
    toy.sliced_wasserstein(a, a[:10])


def test_mmd_known_values():
  h = toy.MMD_BANDWIDTH
  d = 0.3
  a = np.array([[0., 0.], [d, 0.]])
  k = math.exp(-d ** 2 / (2 * h ** 2))
  # Two identical 2-point sets: k + k - 2 (1 + k) / 2 = k - 1 (the unbiased estimate drops the diagonal).
  assert toy.mmd_rbf(a, a) == pytest.approx(k - 1., rel=1e-12)
  far = a + 100.
  # Far apart sets: the cross term vanishes.
  assert toy.mmd_rbf(a, far) == pytest.approx(2 * k, rel=1e-12)
  # The (N, 2, 1, 1) and (N, 1, 1, 2) shapes mean the same points.
  assert toy.mmd_rbf(a.reshape(2, 2, 1, 1), far.reshape(2, 1, 1, 2)) == pytest.approx(2 * k, rel=1e-12)


def test_sample_quality_small_for_same_density_large_for_shifted():
  config = _config(toy='gmm')
  rng = np.random.default_rng(123)
  same = toy.sample_toy('gmm', 1000, rng)
  shifted = same + np.array([0.5, 0.], dtype=np.float32)
  good, bad = toy.sample_quality(same, config), toy.sample_quality(shifted.reshape(-1, 2, 1, 1), config)
  assert set(good) == {'swd', 'mmd'}
  # With 1000 points, SW_2 between two samples of one density is about 0.05-0.15 (mixture weights fluctuate).
  assert good['swd'] < 0.2 and abs(good['mmd']) < 2e-3
  # A shift by 0.5 gives SW_2 near 0.5 / sqrt(2) = 0.35 plus sampling noise.
  assert 0.3 < bad['swd'] < 0.5 and bad['mmd'] > 0.05
  # Reproducible from config.seed.
  assert toy.sample_quality(same, config) == good
  nan = toy.sample_quality(np.full((10, 2), np.nan), config)
  assert math.isnan(nan['swd']) and math.isnan(nan['mmd'])
  with pytest.raises(ValueError, match='shape'):
    toy.sample_quality(np.zeros((10, 3)), config)


def test_figures_are_written(tmp_path):
  residual = str(tmp_path / 'residual.png')
  toy.plot_residual_vs_time({'DSM': ([0.1, 0.5, 1.], [1., 2., 3.]), 'FP': ([0.1, 0.5, 1.], [.5, 1., 1.])},
                            residual, title='VE')
  samples = str(tmp_path / 'samples.png')
  rng = np.random.default_rng(0)
  toy.plot_samples(rng.standard_normal((100, 2)), {'DSM': rng.standard_normal((100, 1, 1, 2))}, samples)
  for path in (residual, samples):
    with open(path, 'rb') as f:
      assert f.read(8) == b'\x89PNG\r\n\x1a\n'
    assert os.path.getsize(path) > 1000


def _tiny_mlp_config(config_module):
  config = config_module.get_config()
  config.model.nf = 8
  config.model.num_layers = 2
  config.device = torch.device('cpu')
  return config


@pytest.mark.parametrize('config_module', [ve_dsm, vp_dsm])
def test_mlp_is_registered_and_double_differentiable(config_module):
  torch.manual_seed(0)
  config = _tiny_mlp_config(config_module)
  model = mutils.create_model(config).double()
  assert isinstance(model, torch.nn.DataParallel) and type(model.module).__name__ == 'MLP'
  sde = sde_lib.sde_from_config(config)
  score_fn = mutils.get_score_fn(sde, model, train=False, continuous=True)
  x = torch.randn(3, 2, 1, 1, dtype=torch.float64, requires_grad=True)
  t = torch.tensor([0.05, 0.4, 0.9], dtype=torch.float64, requires_grad=True)
  assert score_fn(x, t).shape == x.shape
  # The FP term differentiates the score twice in x and once in t: second derivatives must be exact.
  assert torch.autograd.gradcheck(score_fn, (x, t))
  assert torch.autograd.gradgradcheck(score_fn, (x, t))


def test_mlp_ve_output_scales_like_one_over_sigma():
  torch.manual_seed(0)
  config = _tiny_mlp_config(ve_dsm)
  model = mutils.create_model(config)
  x = torch.randn(4, 2, 1, 1)
  sigma = torch.full((4,), 0.5)
  out = model(x, sigma)
  # The same weights (same seed) with scale_by_sigma = False give the network before its 1 / sigma factor.
  config.model.scale_by_sigma = False
  torch.manual_seed(0)
  unscaled = mutils.create_model(config)
  assert torch.allclose(out, unscaled(x, sigma) / 0.5)


@pytest.mark.parametrize('field, value, message', [
    ('embedding_type', 'learned', 'config.model.embedding_type'),
    ('nf', 0, 'config.model.nf'),
    ('num_layers', 1.5, 'config.model.num_layers'),
    ('scale_by_sigma', 'yes', 'config.model.scale_by_sigma'),
    ('fourier_scale', -1., 'config.model.fourier_scale'),
])
def test_mlp_config_validation(field, value, message):
  config = _tiny_mlp_config(ve_dsm)
  with config.ignore_type():
    setattr(config.model, field, value)
  with pytest.raises(ValueError, match=message):
    mutils.create_model(config)


def test_mlp_scale_by_sigma_needs_sigma_labels():
  config = _tiny_mlp_config(vp_dsm)
  config.model.scale_by_sigma = True
  with pytest.raises(ValueError, match='scale_by_sigma'):
    mutils.create_model(config)
  # VP labels are 999 t, not sigma, even with Fourier features.
  config.model.embedding_type = 'fourier'
  with pytest.raises(ValueError, match=r"scale_by_sigma=True needs .*config.training.sde='vesde' \(got 'vpsde'\)"):
    mutils.create_model(config)


def test_mlp_fourier_features_need_continuous_labels():
  config = _tiny_mlp_config(ve_dsm)
  config.training.continuous = False  # discrete labels are indices: label 0 would give log(0)
  with pytest.raises(ValueError, match="embedding_type='fourier' needs config.training.continuous=True"):
    mutils.create_model(config)


def test_log_density_closed_forms():
  rng = np.random.default_rng(0)
  board = toy.sample_toy('checkerboard', 1000, rng)
  # Uniform on 8 unit squares: -log2(1/8) / 2 = 1.5 bits per dimension, and -inf off the board.
  assert np.all(toy.log_density('checkerboard', board) == -math.log(8.))
  assert toy.log_density('checkerboard', np.array([[0.5, -0.5], [3., 0.5]])).tolist() == [-np.inf, -np.inf]
  # The mixture's density integrates to 1 (midpoint rule on a fine grid) and peaks where its samples are.
  grid = np.linspace(-3.5, 3.5, 701)
  step = grid[1] - grid[0]
  xx, yy = np.meshgrid(grid, grid)
  density = np.exp(toy.log_density('gmm', np.stack([xx.ravel(), yy.ravel()], 1)))
  assert density.sum() * step ** 2 == pytest.approx(1., abs=1e-6)
  one_component = math.log(1 / (8 * 2 * math.pi * 0.15 ** 2))
  assert toy.log_density('gmm', np.array([[2., 0.]]))[0] == pytest.approx(one_component, abs=1e-6)
  with pytest.raises(NotImplementedError):
    toy.log_density('rings', board)
