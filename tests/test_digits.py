"""scikit-learn's digits as `data.dataset = 'DIGITS'`: the fixed split, the 17 levels and their dequantization,
the configs in configs/digits/, and a shrunk DIGITS run through run_lib (train, then 17-level bits/dim and
sampling)."""

import glob
import importlib
import math
import os

import numpy as np
import pytest
import torch

import datasets
import losses
import run_lib
import sde_lib
from models import utils as mutils
from tests import configs_tiny

DIGITS_CONFIGS = ('ve_ncsnpp_continuous', 'vp_ddpmpp_continuous', 'fp_ve_ncsnpp_continuous',
                  'fp_vp_ddpmpp_continuous')


def load_digits_config(name):
  return importlib.import_module(f'configs.digits.{name}').get_config()


def test_split_is_fixed_stratified_and_covers_every_image():
  from sklearn.datasets import load_digits
  splits = datasets.load_digits_splits()
  (train, train_labels), (test, test_labels) = splits['train'], splits['test']
  assert train.shape == (1437, 8, 8, 1) and test.shape == (360, 8, 8, 1)
  assert train.dtype == test.dtype == np.uint8
  # 17 levels, 0..16, each used.
  for images in (train, test):
    assert set(np.unique(images)) == set(range(17))
  # Stratified: each digit's share of the test split is its share of the whole set, to within one image.
  counts = np.bincount(load_digits().target, minlength=10)
  assert np.all(np.abs(np.bincount(test_labels, minlength=10) - counts * 360 / 1797) < 1)
  np.testing.assert_array_equal(np.bincount(train_labels, minlength=10) + np.bincount(test_labels, minlength=10),
                                counts)
  # Together the splits are the 1797 images, each once (as multisets of images with their labels).
  everything = np.concatenate([load_digits().images.reshape(1797, 64),
                               load_digits().target[:, None]], 1).astype(np.int64)
  ours = np.concatenate([np.concatenate([train.reshape(-1, 64), train_labels[:, None]], 1),
                         np.concatenate([test.reshape(-1, 64), test_labels[:, None]], 1)]).astype(np.int64)
  np.testing.assert_array_equal(np.unique(everything, axis=0, return_counts=True)[1],
                                np.unique(ours, axis=0, return_counts=True)[1])
  # The split itself, pinned: a different scikit-learn shuffle would change these sums.
  assert int(test.astype(np.int64).sum()) == 112350 and int(train.astype(np.int64).sum()) == 449368
  assert not train.flags.writeable


def test_images_are_levels_over_16_and_dequantize_into_their_17th_of_the_unit_interval():
  config = load_digits_config('vp_ddpmpp_continuous')  # data in [-1, 1]
  config.device = torch.device('cpu')
  data = datasets.get_data(config)
  assert isinstance(data, datasets.DigitsData)
  assert data.split_size('train') == 1437 and data.split_size('test') == 360
  assert data.likelihood_options == {'hutchinson_type': 'Rademacher', 'discrete_data': True, 'num_levels': 17}
  levels = datasets.load_digits_splits()['test'][0].reshape(360, 64).astype(np.float64)
  (index, plain), = data.eval_batches('test', dequantize=False)
  (_, dequantized), = data.eval_batches('test', dequantize=True)
  assert index == 0 and plain.shape == dequantized.shape == (360, 1, 8, 8)
  x, y = (data.inverse_scaler(v).double().reshape(360, 64).numpy() for v in (plain, dequantized))
  # Level k is k / 16 (in a shuffled order: compare the images sorted) ...
  np.testing.assert_allclose(x[np.lexsort(x.T)], levels[np.lexsort(levels.T)] / 16., rtol=0, atol=1e-6)
  # ... and dequantizes to (k + u) / 17: the bin [k, k + 1) / 17, with u uniform (mean 1/2, std 1/sqrt(12)).
  u = y * 17. - np.round(x * 16.)
  assert u.min() >= -1e-5 and u.max() <= 1. + 1e-5
  assert abs(u.mean() - 0.5) < 0.01 and abs(u.std() - 1 / math.sqrt(12)) < 0.01


def test_get_dataset_dequantizes_with_17_levels():
  config = load_digits_config('ve_ncsnpp_continuous')
  config.eval.batch_size = 360
  _, eval_ds, builder = datasets.get_dataset(config, uniform_dequantization=True, evaluation=True)
  assert builder is None
  images = np.concatenate([np.asarray(batch['image']) for batch in eval_ds])
  assert images.shape == (360, 8, 8, 1)
  assert images.min() >= 0 and images.max() <= 1
  # The pipeline shuffles (as Score SDE's does), so compare order statistics: if every pixel is (k + u) / 17 with
  # u in [0, 1], the j-th smallest of 17 x lies between the j-th smallest test level and that plus 1. Per pixel
  # recovery of k is ill-posed: in float32, k + u rounds to k + 1 for u within 2^-21 of 1 (CI met one such pixel).
  levels = np.sort(datasets.load_digits_splits()['test'][0].ravel().astype(np.float64))
  offsets = np.sort(images.ravel().astype(np.float64) * 17.) - levels
  assert offsets.min() >= -1e-5 and offsets.max() <= 1 + 1e-5
  # The noise is there and uniform on average (the sum of the offsets is the sum of the u; std of the mean 0.002).
  assert abs(offsets.mean() - 0.5) < 0.02


@pytest.mark.parametrize('field, value, message', [
    ('image_size', 32, r"config.data.image_size=32 is not allowed; choose one of \(8,\)"),
    ('num_channels', 3, r"config.data.num_channels=3 is not allowed; choose one of \(1,\)"),
])
def test_digits_refuse_other_shapes(field, value, message):
  config = load_digits_config('ve_ncsnpp_continuous')
  setattr(config.data, field, value)
  with pytest.raises(ValueError, match=message):
    datasets.get_data(config)


@pytest.mark.parametrize('name', DIGITS_CONFIGS)
def test_configs_validate_build_their_model_and_loss(name):
  config = load_digits_config(name)
  assert (config.data.dataset, config.data.image_size, config.data.num_channels) == ('DIGITS', 8, 1)
  sde = sde_lib.sde_from_config(config)
  loss = losses.loss_from_config(config, sde)
  model = mutils.create_model(config)
  assert config.model.fir == name.endswith('ve_ncsnpp_continuous')
  assert config.model.attn_resolutions == (4,)
  # Under a quarter of a million parameters: trains on CPU in minutes.
  assert sum(p.numel() for p in model.parameters()) < 250_000
  if name.startswith('fp_'):
    base = load_digits_config(name[3:])
    # The base's architecture and SDE (the pretrained checkpoint fits); training continues past its steps and
    # the evaluated range is the fine-tuned checkpoint.
    assert config.model.to_dict() == base.model.to_dict() and config.training.sde == base.training.sde
    assert loss.term_names == ('dsm', 'fp_vector', 'fp_scalar')
    t = config.training
    assert t.n_iters > base.training.n_iters and t.n_iters % t.snapshot_freq == 0
    assert config.eval.begin_ckpt == config.eval.end_ckpt == t.n_iters // t.snapshot_freq
    assert base.training.n_iters % t.snapshot_freq == 0  # no checkpoint is written twice
  else:
    assert loss.term_names == ('dsm',)
    assert config.training.n_iters == config.training.snapshot_freq  # checkpoint_1: the pretrained model
  x = torch.rand(2, 1, 8, 8)
  out = model(x, torch.rand(2))
  assert out.shape == x.shape


def tiny_digits_config():
  """`ve_ncsnpp_continuous` shrunk as `configs_tiny`: nf 8, 4 noise scales, 1 step of a batch of 4."""
  config = configs_tiny.tiny_schedule(load_digits_config('ve_ncsnpp_continuous'))
  config.device = torch.device('cpu')
  # DSM alone, one step, one bits/dim batch: the FP terms and the other passes are tested on NPZ data.
  config.training.alpha = config.training.beta = 0.
  config.training.n_iters = config.training.snapshot_freq = 1
  config.training.eval_freq = 1
  config.eval.begin_ckpt = config.eval.end_ckpt = 1
  config.eval.batch_size = 8
  config.eval.enable_loss = False
  config.eval.enable_fp_residual = False
  config.eval.enable_sampling = True
  config.eval.num_samples = 8
  config.eval.bpd_dataset = 'test'
  config.sampling.corrector = 'none'
  config.model.nf = 8
  return config


def test_shrunk_digits_run_trains_and_evaluates_bpd_and_samples(tmp_path, monkeypatch):
  full = datasets.load_digits_splits()
  # 16 training and 8 test images keep the run to seconds; the data set object reads its sizes from them.
  subset = {'train': tuple(a[:16] for a in full['train']), 'test': tuple(a[:8] for a in full['test'])}
  monkeypatch.setattr(datasets, 'load_digits_splits', lambda: subset)
  config = tiny_digits_config()
  workdir = str(tmp_path / 'w')
  run_lib.train(config, workdir)
  assert os.path.isfile(os.path.join(workdir, 'checkpoints', 'checkpoint_1.pth'))
  run_lib.evaluate(config, workdir)
  eval_dir = os.path.join(workdir, 'eval')
  bpds = np.load(sorted(glob.glob(os.path.join(eval_dir, 'test_ckpt_1_bpd_*.npz')))[-1])['all_bpds']
  # One batch of the 8 test images. A probability of a bin is at most 1: 17-level bits/dim are positive.
  assert bpds.shape == (8,) and np.all(np.isfinite(bpds)) and np.all(bpds > 0)
  report = np.load(os.path.join(eval_dir, 'report_1.npz'))
  assert set(report.files) == {'mmd', 'digit_score'}
  assert 1. <= float(report['digit_score']) <= 10. + 1e-9 and np.isfinite(float(report['mmd']))
  samples = np.load(os.path.join(eval_dir, 'ckpt_1', 'samples_0.npz'))['samples']
  assert samples.shape == (8, 8, 8, 1) and samples.dtype == np.uint8
  # Too large a training batch for the (patched) 16-image split is refused before anything is written.
  config.training.batch_size = 32
  with pytest.raises(ValueError, match='larger than the training split, which holds 16 images'):
    run_lib.train(config, str(tmp_path / 'w2'))


def test_pixel_mmd_is_zero_in_expectation_and_grows_with_a_shift():
  rng = np.random.default_rng(0)
  a, b = rng.random((200, 4)), rng.random((200, 4))
  same = datasets.pixel_mmd(a, b, bandwidth=1.)
  shifted = datasets.pixel_mmd(a, b + 0.5, bandwidth=1.)
  assert abs(same) < 0.01 and shifted > 0.1
  # Exact for two points per set: k(a0, a1) + k(b0, b1) - 2 mean k(a_i, b_j).
  a, b = np.array([[0.], [1.]]), np.array([[0.], [2.]])
  k = lambda d: math.exp(-d ** 2 / 2.)
  expected = k(1.) + k(2.) - 2. * (k(0.) + k(2.) + k(1.) + k(1.)) / 4.
  assert datasets.pixel_mmd(a, b, bandwidth=1.) == pytest.approx(expected)
