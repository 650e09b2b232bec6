"""Helpers shared by the tests: exact Gaussian answers for every SDE, and a tiny NCSN++.

For data N(mu, diag(s0^2)) the marginal of every SDE here is p_t = N(a(t) mu, diag(a(t)^2 s0^2 + sigma(t)^2)),
with a(t) and sigma(t) the mean coefficient and std of `marginal_prob`, so its score and log-density are known
at every t. The SDE, sampler, likelihood and controllable-generation tests check against these.

`tiny_ncsnpp_config` is the one NCSN++ configuration the model and sampler tests shrink (CPU, seconds);
`write_npz` and `save_tiny_inception` are the tiny stand-ins of a data set and of TF-GAN's Inception module;
`npy_member`, `write_zip` and `deadline` make hostile NPZ files and bound the time a refusal may take.
"""

import contextlib
import io
import math
import signal
import zipfile

import numpy as np
import torch

import sde_lib
import tf_cpu
from configs.default_cifar10_configs import get_default_configs

SDE_KINDS = ('ve', 'vp', 'subvp')


def make_sde(kind, N=1000):
  """Score SDE's default schedules (VE's sigma_max reduced to keep the toy problems well scaled)."""
  if kind == 've':
    return sde_lib.VESDE(sigma_min=0.01, sigma_max=10., N=N)
  if kind == 'vp':
    return sde_lib.VPSDE(beta_min=0.1, beta_max=20., N=N)
  return sde_lib.subVPSDE(beta_min=0.1, beta_max=20., N=N)


def mean_coeff_and_std(sde, t, data_shape):
  """a(t), broadcast to (B, *data_shape), and sigma(t), shape (B,), read from `sde.marginal_prob`."""
  ones = torch.ones((t.shape[0],) + tuple(data_shape), dtype=t.dtype)
  mean, std = sde.marginal_prob(ones, t)
  return mean, std


def _expand(c, x):
  return c.reshape(c.shape + (1,) * (x.dim() - c.dim()))


class GaussianData:
  """Data N(mu, diag(s0^2)) of any per-sample shape, and its exact marginals under an SDE."""

  def __init__(self, mu, s0):
    self.mu = torch.as_tensor(mu, dtype=torch.float64)
    self.s0 = torch.as_tensor(s0, dtype=torch.float64)
    self.shape = tuple(self.mu.shape)

  def sample(self, n, generator=None):
    z = torch.randn((n,) + self.shape, dtype=torch.float64, generator=generator)
    return self.mu + self.s0 * z

  def marginal(self, sde, t):
    """Mean and variance of p_t, each of shape (B, *shape), for t of shape (B,)."""
    a, sigma = mean_coeff_and_std(sde, t.double(), self.shape)
    return a * self.mu, a ** 2 * self.s0 ** 2 + _expand(sigma.double(), a) ** 2

  def score(self, sde, x, t):
    m, v = self.marginal(sde, t)
    return (-(x.double() - m) / v).to(x.dtype)

  def logp(self, sde, x, t):
    m, v = self.marginal(sde, t)
    lp = -0.5 * (x.double() - m) ** 2 / v - 0.5 * torch.log(2 * math.pi * v)
    return lp.reshape(lp.shape[0], -1).sum(1)


def label_to_time(sde, labels, continuous):
  """Inverts `sde.network_time_label` (the test knows the SDE classes; the library does not need to)."""
  labels = labels.double()
  if isinstance(sde, sde_lib.VESDE):
    if continuous:
      return torch.log(labels / sde.sigma_min) / math.log(sde.sigma_max / sde.sigma_min)
    return sde.T - labels / (sde.N - 1)
  return labels / 999. if continuous else labels / (sde.N - 1)


class ExactScoreModel(torch.nn.Module):
  """A "score model" whose output, after `sde.score_from_output`, is the exact score of Gaussian data.

  It goes through the same path as a network: `models.utils.get_score_fn` forms the label from t, the model
  recovers t from the label, and the output is scaled so that `score_from_output` (linear in the output)
  returns the exact score.
  """

  def __init__(self, sde, data, continuous=True):
    super().__init__()
    self.sde = sde
    self.data = data
    self.continuous = continuous
    self.calls = 0

  def forward(self, x, labels):
    self.calls += 1
    t = label_to_time(self.sde, labels, self.continuous).to(x.dtype)
    score = self.data.score(self.sde, x, t)
    unit = self.sde.score_from_output(torch.ones_like(x), x, t, self.continuous)
    return score / unit


# ---------------------------------------------------------------------------------------------------------
# A tiny NCSN++


def tiny_ncsnpp_config(sde_name='vesde', continuous=True, image_size=8, num_channels=2, **model_overrides):
  """Score SDE's NCSN++ (BigGAN blocks, FIR, output/input skips) with nf 16 and two resolutions, on CPU.

  Args:
    sde_name: `config.training.sde`.
    continuous: `config.training.continuous`.
    image_size: `config.data.image_size`; a multiple of 4 (attention runs at image_size // 2 = 4 for 8).
    num_channels: `config.data.num_channels`.
    **model_overrides: `config.model` fields to set after the defaults here (Fourier embedding, scaled by
      sigma: Score SDE's VE continuous choices).

  Returns:
    An `ml_collections.ConfigDict` on top of `configs.default_cifar10_configs`.
  """
  config = get_default_configs()
  config.training.sde = sde_name
  config.training.continuous = continuous
  config.data.image_size = image_size
  config.data.num_channels = num_channels
  model = config.model
  model.name = 'ncsnpp'
  model.scale_by_sigma = True
  model.ema_rate = 0.999
  model.normalization = 'GroupNorm'
  model.nonlinearity = 'swish'
  model.nf = 16
  model.ch_mult = (1, 2)
  model.num_res_blocks = 1
  model.attn_resolutions = (4,)
  model.resamp_with_conv = True
  model.conditional = True
  model.fir = True
  model.fir_kernel = [1, 3, 3, 1]
  model.skip_rescale = True
  model.resblock_type = 'biggan'
  model.progressive = 'output_skip'
  model.progressive_input = 'input_skip'
  model.progressive_combine = 'sum'
  model.attention_type = 'ddpm'
  model.init_scale = 0.
  model.fourier_scale = 16
  model.conv_size = 3
  model.embedding_type = 'fourier'
  model.dropout = 0.
  for key, value in model_overrides.items():
    setattr(model, key, value)
  config.device = torch.device('cpu')
  return config


def tiny_ncsnpp_with_sde(sde_name, continuous, image_size=8, num_scales=25):
  """A tiny NCSN++ on 3-channel centered data, as `models.utils.create_model` builds it, its SDE and config.

  The weights are random (seed 0), so end-to-end tests check shapes, finiteness and the time-label paths, not
  sample quality.
  """
  from models import utils as mutils
  import models  # noqa: F401  (registers every architecture)
  # Score SDE's VE models use Fourier features of sigma; VP/sub-VP and discrete models positional ones.
  fourier = sde_name == 'vesde' and continuous
  config = tiny_ncsnpp_config(sde_name, continuous, image_size=image_size, num_channels=3,
                              num_scales=num_scales, sigma_max=5,
                              embedding_type='fourier' if fourier else 'positional',
                              scale_by_sigma=sde_name == 'vesde')
  config.data.centered = True
  torch.manual_seed(0)
  net = mutils.create_model(config)
  # Score SDE zero-initializes the output layers (init_scale = 0); perturb every weight so the output is not
  # trivially zero.
  with torch.no_grad():
    for p in net.parameters():
      p.add_(0.05 * torch.randn_like(p))
  return net, sde_lib.sde_from_config(config), config


def write_npz(path, num_train=16, num_test=4, size=8, channels=3, seed=0):
  """Writes an NPZ data set of random uint8 images (`num_train` and `num_test` of `size` x `size` x `channels`);
  returns its path as a string."""
  rng = np.random.default_rng(seed)
  np.savez(path, train=rng.integers(0, 256, (num_train, size, size, channels), dtype=np.uint8),
           test=rng.integers(0, 256, (num_test, size, size, channels), dtype=np.uint8))
  return str(path)


def npy_member(shape, dtype='|u1', data=b''):
  """The bytes of an .npy file whose header claims `shape` and `dtype`, followed by `data` (whatever it is)."""
  f = io.BytesIO()
  np.lib.format.write_array_header_1_0(f, {'descr': dtype, 'fortran_order': False, 'shape': shape})
  return f.getvalue() + data


def write_zip(path, members, compression=zipfile.ZIP_STORED):
  """Writes a zip (an .npz when its members are .npy files) of `members`, name -> bytes; returns `path`."""
  with zipfile.ZipFile(path, 'w', compression=compression) as z:
    for name, data in members.items():
      z.writestr(name, data)
  return path


@contextlib.contextmanager
def deadline(seconds):
  """Raises TimeoutError in the body after `seconds` (main thread only): a blocked open of a FIFO, or a read of
  /dev/zero, then fails its check instead of hanging it."""

  def expire(signum, frame):
    del signum, frame
    raise TimeoutError(f'still running after {seconds} s')

  previous = signal.signal(signal.SIGALRM, expire)
  signal.alarm(seconds)
  try:
    yield
  finally:
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def assert_bitwise_equal(a, b, where=''):
  """Asserts that two (nested dicts, lists or tuples of) tensors and values are bitwise equal; names the first
  tensor that is not, and by how much it differs."""
  if isinstance(a, torch.Tensor):
    assert torch.equal(a, b), f'{where}: differs by {(a.double() - b.double()).abs().max().item():.3g}'
  elif isinstance(a, dict):
    assert a.keys() == b.keys(), where
    for key in a:
      assert_bitwise_equal(a[key], b[key], f'{where}.{key}')
  elif isinstance(a, (list, tuple)):
    assert len(a) == len(b), where
    for i, (x, y) in enumerate(zip(a, b)):
      assert_bitwise_equal(x, y, f'{where}[{i}]')
  else:
    assert a == b, where


def _call_tiny_inception(module, images):
  """Stand-in for TF-GAN's Inception module: images in [-1, 1] -> `pool_3` (B, 4) and `logits` (B, 5)."""
  tf = tf_cpu.import_tensorflow()
  feats = tf.concat([tf.reduce_mean(images, axis=[1, 2]), tf.math.reduce_std(images, axis=[1, 2])], axis=1)
  logits = tf.matmul(feats, module.w)
  return {'pool_3': tf.tanh(3. * logits[:, :4]), 'logits': logits}


def save_tiny_inception(path):
  """A SavedModel with the TF-GAN Inception module's interface, loadable from `config.eval.inception_model`."""
  tf = tf_cpu.import_tensorflow()
  module = tf.Module()
  module.w = tf.Variable(np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32))
  module.__call__ = tf.function(lambda images: _call_tiny_inception(module, images),
                                input_signature=[tf.TensorSpec([None, None, None, 3], tf.float32)])
  tf.saved_model.save(module, path)
  return path
