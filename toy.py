"""2-D toy densities for the embedded demo: data pipelines, sample-quality metrics and figures.

The toy data are first-class datasets (`config.data.dataset = 'TOY'`, `config.data.toy` names the density). A
2-D point is shaped as a 1x1 "image" with 2 channels, so batches look like image batches (NHWC, shape
(B, 1, 1, 2)) and the models, losses, samplers and likelihoods need no special case. Points are sampled on the
fly with numpy, seeded from `config.seed`, and are not in [0, 1]: the toy configs set `data.centered = False`,
which makes the data scaler the identity.

Every density is scaled to lie roughly in [-2.7, 2.7]^2 with a per-coordinate standard deviation between 0.95
and 1.45, so the VP SDE's N(0, I) prior fits and one VE `sigma_max` (see `configs/toy/default_toy_configs.py`)
suits all of them.
"""

import logging
import math
import os

import numpy as np
import torch

import distributed
import utils

TOY_DENSITIES = ('checkerboard', 'gmm', 'swissroll', 'rings')


def _toy_name(name):
  """`name`, the value of `config.data.toy`, validated: one of `TOY_DENSITIES` (every reader asks here)."""
  return utils.check_choice('data.toy', name, TOY_DENSITIES)

# Sample-quality defaults. The RBF bandwidth is on the scale of the densities' finest structure (checkerboard
# squares of side 1, mixture components of std 0.15, rings 0.5 apart): a much larger bandwidth would only compare
# the overall mean and spread, a much smaller one would measure sampling noise.
MMD_BANDWIDTH = 0.25
SWD_NUM_PROJECTIONS = 128

# Seed streams, so that training data, evaluation data and reference samples are independent of each other
# and each is reproducible from `config.seed` alone.
_TRAIN_STREAM, _EVAL_STREAM, _EVAL_TRAIN_STREAM, _REFERENCE_STREAM = 0, 1, 2, 3


def _checkerboard(n, rng):
  # 8 unit squares of a 4x4 board on [-2, 2]^2, alternating colours.
  x = rng.uniform(-2., 2., size=n)
  y = rng.uniform(0., 1., size=n) + 2. * rng.integers(0, 2, size=n) - 2.
  y = y + (np.floor(x) % 2)
  return np.stack([x, y], axis=1)


# 8 equally weighted Gaussians of std 0.15, centred on the circle of radius 2.
_GMM_COMPONENTS, _GMM_RADIUS, _GMM_STD = 8, 2., 0.15


def _gmm_centers():
  angles = 2. * math.pi * np.arange(_GMM_COMPONENTS) / _GMM_COMPONENTS
  return _GMM_RADIUS * np.stack([np.cos(angles), np.sin(angles)], axis=1)


def _gmm(n, rng):
  centers = _gmm_centers()[rng.integers(0, _GMM_COMPONENTS, size=n)]
  return centers + _GMM_STD * rng.standard_normal((n, 2))


def _swissroll(n, rng):
  # The 2-D Swiss roll (t cos t, t sin t), t in [1.5 pi, 4.5 pi], scaled into [-2, 2]^2, with a little noise.
  t = 1.5 * math.pi * (1. + 2. * rng.uniform(size=n))
  points = np.stack([t * np.cos(t), t * np.sin(t)], axis=1) / 7.
  return points + 0.05 * rng.standard_normal((n, 2))


def _rings(n, rng):
  # 4 concentric circles of radii 0.5, 1, 1.5, 2, each point's circle chosen in proportion to its length.
  radii = np.array([0.5, 1., 1.5, 2.])
  radius = rng.choice(radii, size=n, p=radii / radii.sum())
  angles = rng.uniform(0., 2. * math.pi, size=n)
  points = radius[:, None] * np.stack([np.cos(angles), np.sin(angles)], axis=1)
  return points + 0.04 * rng.standard_normal((n, 2))


_SAMPLERS = {'checkerboard': _checkerboard, 'gmm': _gmm, 'swissroll': _swissroll, 'rings': _rings}


def sample_toy(name, n, rng):
  """Draws points from a toy density.

  Args:
    name: one of `TOY_DENSITIES`.
    n: number of points.
    rng: a `numpy.random.Generator`.

  Returns:
    A float32 array of shape (n, 2).
  """
  _toy_name(name)
  return _SAMPLERS[name](n, rng).astype(np.float32)


def _rng(config, stream):
  seed = utils.config_value(config, 'seed')
  return np.random.default_rng([seed, stream])


def _as_batch(points):
  """Shapes (B, 2) points as an image batch: NHWC (B, 1, 1, 2), with zero labels."""
  return {'image': points.reshape(-1, 1, 1, 2), 'label': np.zeros(points.shape[0], dtype=np.int32)}


class ToyStream:
  """An endless stream of fresh batches, reproducible from the seed: each `iter()` restarts it at `start`.

  Batch k is drawn from its own seed `(*seed_sequence, k)`, so a stream can start at any batch in O(1):
  a training run resumed at step s continues with batch s (`from_batch`) instead of replaying batches 0, 1, ...
  that it has already trained on.
  """

  def __init__(self, name, batch_size, seed_sequence, start=0):
    self.name = name
    self.batch_size = batch_size
    self.seed_sequence = list(seed_sequence)
    self.start = utils.check_number('start', start, low=0, integer=True)

  def from_batch(self, k):
    """The same stream, starting at batch k."""
    return ToyStream(self.name, self.batch_size, self.seed_sequence, start=k)

  def __iter__(self):
    k = self.start
    while True:
      rng = np.random.default_rng(self.seed_sequence + [k])
      yield _as_batch(sample_toy(self.name, self.batch_size, rng))
      k += 1


class ToySet:
  """A fixed, finite set of batches (drawn once from the seed); iterates over it once, or forever with
  `repeat=True` (as tf.data's `repeat()`)."""

  def __init__(self, name, batch_size, num_batches, seed_sequence, repeat=False):
    rng = np.random.default_rng(seed_sequence)
    self.points = sample_toy(name, batch_size * num_batches, rng)
    self.batch_size = batch_size
    self.repeat = repeat

  def __len__(self):
    return self.points.shape[0] // self.batch_size

  def __iter__(self):
    while True:
      for i in range(len(self)):
        yield _as_batch(self.points[i * self.batch_size:(i + 1) * self.batch_size])
      if not self.repeat:
        return


def get_toy_datasets(config, evaluation=False):
  """Toy-data counterparts of Score SDE's tf.data pipelines (`datasets.get_dataset` dispatches here).

  Iterating a dataset yields dicts `{'image': float32 (B, 1, 1, 2), 'label': int32 zeros (B,)}`.

  - Training (`evaluation=False`): the train dataset is an endless stream of fresh samples; the eval dataset
    is the fixed evaluation set of `config.data.toy_eval_batches` batches of `eval.batch_size`, repeated
    forever (Score SDE repeats its datasets while training, and `run_lib` draws eval batches with `next`).
  - Evaluation (`evaluation=True`): both are fixed finite sets with a length (Score SDE's evaluation reads one
    epoch): `data.toy_eval_batches` batches of `eval.batch_size` each, drawn with different seeds, so the
    "train" set is held apart from the "test" set as in the image datasets.

  Args:
    config: the config; reads `data.toy`, `data.image_size`, `data.num_channels`, `data.toy_eval_batches`,
      `training.batch_size`, `eval.batch_size` and `seed`.
    evaluation: whether the datasets are for evaluation.

  Returns:
    `(train_ds, eval_ds)`.
  """
  name = _toy_name(config.data.toy)
  # The points are not in [0, 1]: the scaler must be the identity (a centered scaler would train on 2 x - 1
  # and shift every NLL by 1 bit/dim).
  utils.config_value(config, 'data.centered', allowed=(False,))
  utils.config_value(config, 'data.image_size', allowed=(1,))
  utils.config_value(config, 'data.num_channels', allowed=(2,))
  num_eval_batches = utils.check_number('data.toy_eval_batches', config.data.toy_eval_batches, low=1,
                                        integer=True)
  train_batch = utils.config_value(config, 'training.batch_size')
  eval_batch = utils.config_value(config, 'eval.batch_size')
  seed = utils.config_value(config, 'seed')
  eval_ds = ToySet(name, eval_batch, num_eval_batches, [seed, _EVAL_STREAM], repeat=not evaluation)
  if evaluation:
    train_ds = ToySet(name, eval_batch, num_eval_batches, [seed, _EVAL_TRAIN_STREAM])
  else:
    train_ds = ToyStream(name, train_batch, [seed, _TRAIN_STREAM])
  return train_ds, eval_ds


def _as_points(samples):
  samples = np.asarray(samples, dtype=np.float64)
  if samples.ndim < 2 or math.prod(samples.shape[1:]) != 2:
    raise ValueError(f'Expected N 2-D points, shaped (N, 2), (N, 2, 1, 1) or (N, 1, 1, 2); got shape '
                     f'{samples.shape}.')
  return samples.reshape(samples.shape[0], 2)


def sliced_wasserstein(a, b, num_projections=SWD_NUM_PROJECTIONS):
  """Sliced 2-Wasserstein distance between two equally sized 2-D point sets.

  SW_2(a, b) = sqrt(mean_k W_2^2(<a, theta_k>, <b, theta_k>)), where the 1-D distances come from sorting. The
  directions theta_k are evenly spaced on the half circle rather than random, so the number is deterministic;
  for a translation, SW_2(a, a + delta) = |delta| / sqrt(2) exactly (mean of cos^2 over the directions).

  Args:
    a, b: arrays of N points each (see `sample_quality` for accepted shapes).
    num_projections: number of directions (at least 2).

  Returns:
    A float.
  """
  a, b = _as_points(a), _as_points(b)
  if a.shape[0] != b.shape[0]:
    raise ValueError(f'sliced_wasserstein needs equally sized sets; got {a.shape[0]} and {b.shape[0]} points.')
  if num_projections < 2:
    raise ValueError(f'num_projections={num_projections} must be at least 2.')
  angles = math.pi * np.arange(num_projections) / num_projections
  directions = np.stack([np.cos(angles), np.sin(angles)], axis=0)  # (2, K)
  pa = np.sort(a @ directions, axis=0)
  pb = np.sort(b @ directions, axis=0)
  return float(np.sqrt(np.mean((pa - pb) ** 2)))


def mmd_rbf(a, b, bandwidth=MMD_BANDWIDTH):
  """Unbiased estimate of the squared maximum mean discrepancy with the RBF kernel exp(-|x-y|^2 / (2 h^2)).

  MMD^2 = mean_{i != j} k(a_i, a_j) + mean_{i != j} k(b_i, b_j) - 2 mean_{i, j} k(a_i, b_j). Its expectation is 0
  when a and b come from the same density, so estimates can be slightly negative.

  Args:
    a, b: arrays of at least 2 points each (see `sample_quality` for accepted shapes).
    bandwidth: the kernel's bandwidth h.

  Returns:
    A float.
  """
  a, b = _as_points(a), _as_points(b)
  if min(a.shape[0], b.shape[0]) < 2:
    raise ValueError('mmd_rbf needs at least 2 points in each set.')

  def kernel_sum(x, y):
    # Differences per coordinate rather than |x|^2 + |y|^2 - 2 x.y, which cancels badly away from the origin.
    sq = (x[:, None, 0] - y[None, :, 0]) ** 2 + (x[:, None, 1] - y[None, :, 1]) ** 2
    return np.exp(-sq / (2. * bandwidth ** 2)).sum()

  n, m = a.shape[0], b.shape[0]
  # The diagonal of k(x, x) is exactly 1 (zero distance), so it is removed by subtracting n.
  kaa = (kernel_sum(a, a) - n) / (n * (n - 1))
  kbb = (kernel_sum(b, b) - m) / (m * (m - 1))
  kab = kernel_sum(a, b) / (n * m)
  return float(kaa + kbb - 2. * kab)


def reference_samples(config, n):
  """n fresh points of the true density `config.data.toy`, the same ones for a given `config.seed`."""
  name = _toy_name(config.data.toy)
  return sample_toy(name, n, _rng(config, _REFERENCE_STREAM))


def sample_quality(samples, config):
  """Sample-quality metrics of model samples against as many fresh samples of the true density.

  Args:
    samples: model samples in data space, shaped (N, 2), (N, 2, 1, 1) (NCHW) or (N, 1, 1, 2) (NHWC).
    config: the config; reads `data.toy` and `seed` (the reference samples are reproducible).

  Returns:
    A dict of floats: `'swd'` (sliced 2-Wasserstein distance, `SWD_NUM_PROJECTIONS` directions) and `'mmd'`
    (unbiased squared MMD, RBF kernel of bandwidth `MMD_BANDWIDTH`). Lower is better for both; non-finite
    samples (a diverged sampler) give NaN.
  """
  points = _as_points(samples)
  if not np.all(np.isfinite(points)):
    logging.warning('sample_quality: %d of %d samples are not finite.',
                    int((~np.isfinite(points).all(1)).sum()), points.shape[0])
    return {'swd': float('nan'), 'mmd': float('nan')}
  reference = reference_samples(config, points.shape[0])
  return {'swd': sliced_wasserstein(points, reference), 'mmd': mmd_rbf(points, reference)}


def log_density(name, points):
  """Exact log-density of a toy density, where it has a closed form.

  Args:
    name: `'checkerboard'` (uniform on 8 unit squares: log(1/8) on them, -inf elsewhere) or `'gmm'`.
    points: 2-D points (see `sample_quality` for accepted shapes).

  Returns:
    A float64 array of shape (N,), in nats.

  Raises:
    NotImplementedError: for `'swissroll'` and `'rings'` (curves blurred by noise: no closed form).
  """
  _toy_name(name)
  x = _as_points(points)
  if name == 'checkerboard':
    return np.where(_on_black_square(x), -math.log(8.), -np.inf)
  if name == 'gmm':
    sq = ((x[:, None, :] - _gmm_centers()[None]) ** 2).sum(-1)
    log_components = (-sq / (2 * _GMM_STD ** 2) - math.log(2 * math.pi * _GMM_STD ** 2) -
                      math.log(_GMM_COMPONENTS))
    top = log_components.max(1)
    return top + np.log(np.exp(log_components - top[:, None]).sum(1))
  raise NotImplementedError(f'The {name!r} density has no closed-form log-density.')


def _on_black_square(x):
  """Whether each point lies on one of the checkerboard's 8 closed unit squares (edges included: a sample
  rounded to float32 can land exactly on an edge of its square)."""
  inside = np.zeros(x.shape[0], dtype=bool)
  for shift_x in (0., 1.):
    for shift_y in (0., 1.):
      # A coordinate on a grid line belongs to the cells on both sides of it.
      cx = np.floor(x[:, 0]) - shift_x * (x[:, 0] == np.floor(x[:, 0]))
      cy = np.floor(x[:, 1]) - shift_y * (x[:, 1] == np.floor(x[:, 1]))
      on_board = (cx >= -2) & (cx <= 1) & (cy >= -2) & (cy <= 1)
      inside |= on_board & ((cx + cy) % 2 == 0)
  return inside


def pyplot():
  """matplotlib's `pyplot` with the Agg backend (figures to files, no display needed), for every figure of the
  demo and the study."""
  # Imported lazily: only the figure helpers need matplotlib.
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  return plt


def plot_residual_vs_time(curves, path, title=None):
  """Plots the score-FPE residual as a function of t for several models on one figure.

  Args:
    curves: dict, label -> (t, residual), each a 1-D array.
    path: PNG file to write.
    title: optional figure title.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(5.5, 4))
  for label, (t, residual) in curves.items():
    ax.plot(np.asarray(t), np.asarray(residual), marker='o', markersize=3, label=label)
  ax.set_xlabel('t')
  ax.set_ylabel('score-FPE residual (RMS over x_t)')
  ax.set_yscale('log')
  ax.grid(True, which='both', alpha=0.3)
  ax.legend()
  if title:
    ax.set_title(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def plot_samples(data, samples, path, title=None, lim=3.):
  """Scatter plots of the data next to model samples, one panel each, on the same axes.

  Args:
    data: points of the true density (see `sample_quality` for accepted shapes).
    samples: dict, label -> model samples.
    path: PNG file to write.
    title: optional figure title.
    lim: the panels show [-lim, lim]^2.
  """
  plt = pyplot()
  panels = [('data', _as_points(data))] + [(label, _as_points(s)) for label, s in samples.items()]
  fig, axes = plt.subplots(1, len(panels), figsize=(3.2 * len(panels), 3.4), squeeze=False)
  for ax, (label, points) in zip(axes[0], panels):
    ax.scatter(points[:, 0], points[:, 1], s=1, alpha=0.5)
    ax.set_xlim(-lim, lim)
    ax.set_ylim(-lim, lim)
    ax.set_aspect('equal')
    ax.set_title(label)
  if title:
    fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


class ToyData:
  """A 2-D toy density (`data.dataset = 'TOY'`) as run_lib uses it (see `datasets.ImageData`).

  Points are continuous: bits/dim are the density's own (no dequantization, no 8-bit offset), with the exact
  trace (2 backward passes per ODE step, no estimator noise). Samples are float (N, 2) points, scored by
  `sample_quality` against fresh points of the true density.
  """

  likelihood_options = {'hutchinson_type': 'exact', 'discrete_data': False}
  bpd_dequantize = False

  def __init__(self, config):
    self.config = config
    if utils.config_value(config, 'data.uniform_dequantization'):
      raise ValueError('config.data.uniform_dequantization=True is not allowed for config.data.dataset=\'TOY\': '
                       'the toy points are continuous, with no 8-bit levels to dequantize.')
    # Validates data.toy, data.centered, the shapes, the batch sizes and the seed.
    get_toy_datasets(config, evaluation=True)
    self.name = config.data.toy
    self.seed = config.seed
    self.train_batch_size = config.training.batch_size
    self.eval_batch_size = config.eval.batch_size
    self.num_eval_batches_per_split = config.data.toy_eval_batches
    self.device = torch.device(config.device)
    self.scaler = lambda x: x
    self.inverse_scaler = lambda x: x

  def sample_shape(self, batch_size):
    return (batch_size, 2, 1, 1)

  def to_model_input(self, points):
    """Points (shaped (B, 2) or (B, 1, 1, 2)) as the model's input: (B, 2, 1, 1) on the device."""
    x = np.asarray(points, dtype=np.float32).reshape(-1, 1, 1, 2)
    return torch.from_numpy(x).to(self.device).permute(0, 3, 1, 2)

  def train_batches(self, start_step, ctx):
    """This rank's share of training batch `step`, for every step from `start_step` on.

    Batch k is drawn from its own seed, so a resumed run continues the stream of the uninterrupted run
    exactly, and a rank's share is a slice of the same global batch a single process would train on.
    """
    part = distributed.share(self.train_batch_size, ctx, 'training.batch_size')
    stream = ToyStream(self.name, self.train_batch_size, [self.seed, _TRAIN_STREAM], start=start_step)
    for batch in stream:
      yield self.to_model_input(batch['image'][part])

  def eval_stream(self, ctx):
    """The fixed evaluation set, repeated: this rank's share of each batch (of `eval.batch_size`)."""
    part = distributed.share(self.eval_batch_size, ctx, 'eval.batch_size')
    eval_set = ToySet(self.name, self.eval_batch_size, self.num_eval_batches_per_split,
                      [self.seed, _EVAL_STREAM], repeat=True)
    for batch in eval_set:
      yield self.to_model_input(batch['image'][part])

  def eval_batches(self, split, dequantize=None, repeat=0, only=None):
    """The fixed 'train' or 'test' evaluation set: `(index, model input)` pairs (see `ImageData`)."""
    del dequantize, repeat  # continuous points: nothing to dequantize, every pass sees the same points
    stream = _EVAL_TRAIN_STREAM if split == 'train' else _EVAL_STREAM
    for index, batch in enumerate(ToySet(self.name, self.eval_batch_size, self.num_eval_batches_per_split,
                                         [self.seed, stream])):
      yield index, (self.to_model_input(batch['image']) if only is None or only(index) else None)

  def split_size(self, split):
    """None: the training points are drawn afresh for every batch, and the evaluation sets are made of whole
    batches of `eval.batch_size` (`data.toy_eval_batches` of them), so no batch size is too large."""
    del split
    return None

  def num_eval_batches(self, split):
    """How many batches `eval_batches(split)` yields (`data.toy_eval_batches`)."""
    del split
    return self.num_eval_batches_per_split

  def sample_arrays(self, samples):
    """Samples as saved: float32 (N, 2) points."""
    return samples.reshape(samples.shape[0], -1).cpu().numpy()

  def save_snapshot(self, samples, directory, step):
    """`sample.np` (float (N, 2) points) and `sample.png` (a scatter plot next to the true density)."""
    points = self.sample_arrays(samples)
    with open(os.path.join(directory, 'sample.np'), 'wb') as fout:
      np.save(fout, points)
    plot_samples(reference_samples(self.config, points.shape[0]), {f'step {step}': points},
                 os.path.join(directory, 'sample.png'), title=f'{self.name}, step {step}')

  def prepare_sample_quality(self):
    """Nothing to load: the metrics compare with fresh points of the density."""

  def sample_statistics(self, arrays):
    """No per-round statistics: the metrics need the points themselves."""
    del arrays
    return None

  def sample_quality(self, rounds, num_samples):
    """`sample_quality` of the first `num_samples` points of the rounds `(arrays, statistics)`."""
    points = np.concatenate([arrays for arrays, _ in rounds], axis=0)[:num_samples]
    return sample_quality(points, self.config)
