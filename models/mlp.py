"""A small MLP score model for low-dimensional data (the 2-D toy demo), registered as `'mlp'`.

The input (B, C, H, W) is flattened to (B, C*H*W). The time label the SDE gives (`sde.network_time_label`) is
embedded as in NCSN++:
  - `model.embedding_type = 'fourier'`: Gaussian Fourier features of log(label). For a continuously trained VE
    SDE the label is sigma(t) > 0, which spans orders of magnitude; its log is the natural coordinate.
  - `model.embedding_type = 'positional'`: sinusoidal (Transformer) features of the label itself, for VP and
    sub-VP labels 999 t.
With `model.scale_by_sigma` (VE only) the output is divided by the label sigma, as NCSN++ does, since the VE
score scales like 1 / sigma. Activations are SiLU, which is smooth: the score-FPE regularizer differentiates the
score twice in x and once in t. There is no dropout, so the score is a deterministic function, as the FP term
assumes.
"""

import math

import torch
from torch import nn

from . import utils
import utils as config_utils

EMBEDDING_TYPES = config_utils.CONFIG_FIELDS['model.embedding_type']['allowed']


def fourier_features(log_label, frequencies):
  """Gaussian Fourier features [sin(2 pi w x), cos(2 pi w x)] of x = log(label) (Tancik et al., 2020)."""
  angles = 2. * math.pi * log_label[:, None] * frequencies[None, :]
  return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


def sinusoidal_features(label, dim, max_positions=10000):
  """Transformer sinusoidal features of the label (DDPM's timestep embedding), `dim` even."""
  half = dim // 2
  freqs = torch.exp(-math.log(max_positions) * torch.arange(half, dtype=label.dtype, device=label.device) /
                    (half - 1))
  angles = label[:, None] * freqs[None, :]
  return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class ResidualBlock(nn.Module):
  """h + W2 act(W1 act(h) + U temb): a pre-activation residual block conditioned on the time embedding."""

  def __init__(self, width, temb_dim):
    super().__init__()
    self.dense_0 = nn.Linear(width, width)
    self.dense_temb = nn.Linear(temb_dim, width)
    self.dense_1 = nn.Linear(width, width)
    self.act = nn.SiLU()

  def forward(self, h, temb):
    return h + self.dense_1(self.act(self.dense_0(self.act(h)) + self.dense_temb(temb)))


@utils.register_model(name='mlp')
class MLP(nn.Module):
  """Time-conditional MLP score model: `model.nf` hidden width, `model.num_layers` residual blocks."""

  def __init__(self, config):
    """Builds the model from `config.model` (`nf`, `num_layers`, `embedding_type`, `fourier_scale`,
    `scale_by_sigma`) and `config.data` (`num_channels`, `image_size`)."""
    super().__init__()
    model = config.model
    self.nf = nf = config_utils.config_value(config, 'model.nf', low=2)
    num_layers = config_utils.check_number('model.num_layers', model.num_layers, low=0, integer=True)
    self.embedding_type = config_utils.config_value(config, 'model.embedding_type')
    self.scale_by_sigma = config_utils.config_value(config, 'model.scale_by_sigma')
    continuous = config.training.continuous is True
    if self.embedding_type == 'fourier' and not continuous:
      # Features of log(label): discrete labels are noise-level indices, and index 0 gives log(0).
      raise ValueError("config.model.embedding_type='fourier' needs config.training.continuous=True; got "
                       f'{config.training.continuous!r}.')
    sde_name = config.training.get('sde')
    if self.scale_by_sigma and (self.embedding_type != 'fourier' or str(sde_name).lower() != 'vesde'):
      # Dividing by the label only makes sense when the label is sigma: continuous VE, which also is when the
      # log-scale 'fourier' embedding applies.
      raise ValueError(f"config.model.scale_by_sigma=True needs the labels to be sigma(t): "
                       f"config.training.sde='vesde' (got {sde_name!r}), continuous, and "
                       f"config.model.embedding_type='fourier' (got {self.embedding_type!r}).")
    channels = config_utils.config_value(config, 'data.num_channels')
    size = config_utils.config_value(config, 'data.image_size')
    self.data_dim = channels * size * size
    temb_dim = 2 * nf
    if self.embedding_type == 'fourier':
      scale = config_utils.config_value(config, 'model.fourier_scale')
      # Fixed random frequencies, a buffer rather than a frozen parameter: nothing trains or averages them.
      self.register_buffer('fourier_freqs', torch.randn(nf) * scale)
    self.temb = nn.Sequential(nn.Linear(2 * nf, temb_dim), nn.SiLU(), nn.Linear(temb_dim, temb_dim))
    self.dense_in = nn.Linear(self.data_dim, nf)
    self.blocks = nn.ModuleList([ResidualBlock(nf, temb_dim) for _ in range(num_layers)])
    self.dense_out = nn.Linear(nf, self.data_dim)
    self.act = nn.SiLU()

  def forward(self, x, time_cond):
    """Args:
      x: (B, C, H, W) inputs.
      time_cond: (B,) labels from `sde.network_time_label`.

    Returns:
      (B, C, H, W): the score (VE) or the VP network output that `sde.score_from_output` turns into one.
    """
    if self.embedding_type == 'fourier':
      features = fourier_features(torch.log(time_cond), self.fourier_freqs.to(x.dtype))
    else:
      features = sinusoidal_features(time_cond.to(x.dtype), 2 * self.nf)
    temb = self.temb(features)
    h = self.dense_in(x.reshape(x.shape[0], -1))
    for block in self.blocks:
      h = block(h, temb)
    out = self.dense_out(self.act(h)).reshape(x.shape)
    if self.scale_by_sigma:
      out = out / time_cond.reshape((-1,) + (1,) * (x.dim() - 1))
    return out
