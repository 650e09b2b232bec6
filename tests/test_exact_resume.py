"""Exact resume (issue 24, item 8): a run stopped at step k and resumed trains to bitwise the same weights as the
uninterrupted run, for every data set held in memory: NPZ, DIGITS, TOY, and a small tfds set (CIFAR-10, mocked)."""

import contextlib
import os

import pytest
import torch

import checkpoints
import datasets
import distributed
import run_lib
from tests import configs_tiny
from tests import helpers


def _config(kind, tmp_path):
  if kind == 'TOY':
    config = configs_tiny.get_toy_config()
  else:
    config = configs_tiny.get_config()
    # 6 training images in batches of 4: batches straddle epochs, so a reshuffle on resume would show.
    config.data.path = helpers.write_npz(tmp_path / 'data.npz', num_train=6)
    config.data.random_flip = True
    config.data.uniform_dequantization = True
    config.training.alpha = config.training.beta = 0.  # the FP terms' draws are tested elsewhere; keep it quick
  if kind == 'DIGITS':
    config.data.dataset = 'DIGITS'
    config.data.num_channels = 1
  if kind == 'CIFAR10':
    config.data.dataset = 'CIFAR10'
    config.data.image_size = 32
    config.training.batch_size = 2
    config.model.attn_resolutions = (16,)
  config.training.snapshot_sampling = True  # a snapshot draws from the global generator between steps
  config.training.snapshot_freq = 2
  config.training.eval_freq = 1
  return config


def _mock(kind):
  if kind != 'CIFAR10':
    return contextlib.nullcontext()
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  return tfds.testing.mock_data(num_examples=3)


def _train(config, workdir, n_iters):
  config.training.n_iters = n_iters
  run_lib.train(config, workdir)
  return checkpoints.load_checkpoint_file(os.path.join(workdir, 'checkpoints-meta', 'checkpoint.pth'))


@pytest.mark.parametrize('kind, n_iters, stop', [('NPZ', 5, 3), ('DIGITS', 4, 1), ('TOY', 4, 3),
                                                 ('CIFAR10', 3, 1)])
def test_a_resumed_run_is_the_uninterrupted_run(kind, n_iters, stop, tmp_path):
  with _mock(kind):
    straight = _train(_config(kind, tmp_path), str(tmp_path / 'straight'), n_iters)
    _train(_config(kind, tmp_path), str(tmp_path / 'resumed'), stop)
    resumed = _train(_config(kind, tmp_path), str(tmp_path / 'resumed'), n_iters)
  assert int(resumed['step']) == int(straight['step']) == n_iters
  for part in ('model', 'ema', 'optimizer'):
    helpers.assert_bitwise_equal(straight[part], resumed[part], part)


@pytest.mark.parametrize('start', [0, 1, 2, 5])
def test_the_batches_of_in_memory_images_start_anywhere_in_one_stream(start, tmp_path):
  config = _config('NPZ', tmp_path)
  data = datasets.get_data(config)
  ctx = distributed.Context()
  whole = data.train_batches(0, ctx)
  expected = [next(whole) for _ in range(start + 4)][start:]
  resumed = data.train_batches(start, ctx)
  for batch in expected:
    torch.testing.assert_close(next(resumed), batch, rtol=0, atol=0)


def test_each_epoch_shows_every_image_once(tmp_path):
  config = _config('NPZ', tmp_path)
  config.data.random_flip = config.data.uniform_dequantization = False
  config.training.batch_size = 3
  data = datasets.get_data(config)
  stream = data.train_batches(0, distributed.Context())
  images, _ = data.in_memory()
  for _ in range(3):  # three epochs of 6 images, 2 batches each
    epoch = torch.cat([next(stream), next(stream)])
    levels = torch.round(data.inverse_scaler(epoch) * 255.).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    assert sorted(x.tobytes() for x in levels) == sorted(x.tobytes() for x in images['train'])
