"""Layers for defining NCSN++ and DDPM++ (Song et al., 2021), as in Score SDE."""

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from . import layers
from . import up_or_down_sampling

conv1x1 = layers.ddpm_conv1x1
conv3x3 = layers.ddpm_conv3x3
NIN = layers.NIN
default_init = layers.default_init

COMBINE_METHODS = ('cat', 'sum')


def group_norm(channels):
  """NCSN++'s group normalization of `channels` channels: up to 32 groups of at least 4 channels, eps 1e-6."""
  return nn.GroupNorm(num_groups=min(channels // 4, 32), num_channels=channels, eps=1e-6)


def _skip_sum(x, h, skip_rescale):
  # Rescaling the residual sum by 1/sqrt(2) keeps its variance (NCSN++'s skip_rescale).
  return (x + h) / math.sqrt(2.) if skip_rescale else x + h


class GaussianFourierProjection(nn.Module):
  """Gaussian Fourier embeddings for noise levels."""

  def __init__(self, embedding_size=256, scale=1.0):
    super().__init__()
    # Fixed random frequencies: a (non-trainable) parameter, so it is saved in checkpoints as Score SDE.
    self.W = nn.Parameter(torch.randn(embedding_size) * scale, requires_grad=False)

  def forward(self, x):
    x_proj = x[:, None] * self.W[None, :].to(x.dtype) * 2 * np.pi
    return torch.cat([torch.sin(x_proj), torch.cos(x_proj)], dim=-1)


class Combine(nn.Module):
  """Combine information from skip connections."""

  def __init__(self, dim1, dim2, method='cat'):
    super().__init__()
    if method not in COMBINE_METHODS:
      raise ValueError(f'config.model.progressive_combine={method!r} is not allowed; '
                       f'choose one of {COMBINE_METHODS!r}.')
    self.Conv_0 = conv1x1(dim1, dim2)
    self.method = method

  def forward(self, x, y):
    h = self.Conv_0(x)
    if self.method == 'cat':
      return torch.cat([h, y], dim=1)
    return h + y


class AttnBlockpp(nn.Module):
  """Channel-wise self-attention block. Modified from DDPM."""

  def __init__(self, channels, skip_rescale=False, init_scale=0.):
    super().__init__()
    self.GroupNorm_0 = group_norm(channels)
    self.NIN_0 = NIN(channels, channels)
    self.NIN_1 = NIN(channels, channels)
    self.NIN_2 = NIN(channels, channels)
    self.NIN_3 = NIN(channels, channels, init_scale=init_scale)
    self.skip_rescale = skip_rescale

  def forward(self, x):
    h = self.GroupNorm_0(x)
    h = layers.channel_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h))
    return _skip_sum(x, self.NIN_3(h), self.skip_rescale)


class Upsample(nn.Module):
  """2x upsampling: nearest or FIR, optionally with a (fused) 3x3 conv."""

  def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1)):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    if with_conv:
      if fir:
        self.Conv2d_0 = up_or_down_sampling.Conv2d(in_ch, out_ch, kernel=3, up=True, resample_kernel=fir_kernel,
                                                   use_bias=True, kernel_init=default_init())
      else:
        self.Conv_0 = conv3x3(in_ch, out_ch)
    self.fir = fir
    self.with_conv = with_conv
    self.fir_kernel = fir_kernel
    self.out_ch = out_ch

  def forward(self, x):
    _, _, H, W = x.shape
    if not self.fir:
      h = F.interpolate(x, (H * 2, W * 2), mode='nearest')
      if self.with_conv:
        h = self.Conv_0(h)
    elif not self.with_conv:
      h = up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
    else:
      h = self.Conv2d_0(x)
    return h


class Downsample(nn.Module):
  """2x downsampling: average pooling or FIR, optionally with a (fused) 3x3 conv."""

  def __init__(self, in_ch=None, out_ch=None, with_conv=False, fir=False, fir_kernel=(1, 3, 3, 1)):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    if with_conv:
      if fir:
        self.Conv2d_0 = up_or_down_sampling.Conv2d(in_ch, out_ch, kernel=3, down=True,
                                                   resample_kernel=fir_kernel, use_bias=True,
                                                   kernel_init=default_init())
      else:
        self.Conv_0 = conv3x3(in_ch, out_ch, stride=2, padding=0)
    self.fir = fir
    self.fir_kernel = fir_kernel
    self.with_conv = with_conv
    self.out_ch = out_ch

  def forward(self, x):
    if not self.fir:
      # TF 'SAME' padding of a stride-2 conv: one row/column after (harmless for the even-size pooling).
      x = F.pad(x, (0, 1, 0, 1))
      if self.with_conv:
        return self.Conv_0(x)
      return F.avg_pool2d(x, 2, stride=2)
    if not self.with_conv:
      return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
    return self.Conv2d_0(x)


class ResnetBlockDDPMpp(nn.Module):
  """ResBlock adapted from DDPM."""

  def __init__(self, act, in_ch, out_ch=None, temb_dim=None, conv_shortcut=False, dropout=0.1,
               skip_rescale=False, init_scale=0.):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    self.GroupNorm_0 = group_norm(in_ch)
    self.Conv_0 = conv3x3(in_ch, out_ch)
    if temb_dim is not None:
      self.Dense_0 = layers.ddpm_linear(temb_dim, out_ch)
    self.GroupNorm_1 = group_norm(out_ch)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
    if in_ch != out_ch:
      if conv_shortcut:
        self.Conv_2 = conv3x3(in_ch, out_ch)
      else:
        self.NIN_0 = NIN(in_ch, out_ch)
    self.skip_rescale = skip_rescale
    self.act = act
    self.in_ch = in_ch
    self.out_ch = out_ch
    self.conv_shortcut = conv_shortcut

  def forward(self, x, temb=None):
    x, h = layers.ddpm_resnet_paths(self, x, temb)
    return _skip_sum(x, h, self.skip_rescale)


class ResnetBlockBigGANpp(nn.Module):
  """BigGAN-style residual block, with optional (FIR) up- or downsampling inside."""

  def __init__(self, act, in_ch, out_ch=None, temb_dim=None, up=False, down=False, dropout=0.1, fir=False,
               fir_kernel=(1, 3, 3, 1), skip_rescale=True, init_scale=0.):
    super().__init__()
    out_ch = out_ch if out_ch else in_ch
    self.GroupNorm_0 = group_norm(in_ch)
    self.up = up
    self.down = down
    self.fir = fir
    self.fir_kernel = fir_kernel
    self.Conv_0 = conv3x3(in_ch, out_ch)
    if temb_dim is not None:
      self.Dense_0 = layers.ddpm_linear(temb_dim, out_ch)
    self.GroupNorm_1 = group_norm(out_ch)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = conv3x3(out_ch, out_ch, init_scale=init_scale)
    if in_ch != out_ch or up or down:
      self.Conv_2 = conv1x1(in_ch, out_ch)
    self.skip_rescale = skip_rescale
    self.act = act
    self.in_ch = in_ch
    self.out_ch = out_ch

  def _resample(self, x):
    if self.up:
      if self.fir:
        return up_or_down_sampling.upsample_2d(x, self.fir_kernel, factor=2)
      return up_or_down_sampling.naive_upsample_2d(x, factor=2)
    if self.down:
      if self.fir:
        return up_or_down_sampling.downsample_2d(x, self.fir_kernel, factor=2)
      return up_or_down_sampling.naive_downsample_2d(x, factor=2)
    return x

  def forward(self, x, temb=None):
    h = self.act(self.GroupNorm_0(x))
    h = self._resample(h)
    x = self._resample(x)
    h = self.Conv_0(h)
    # Add bias to each feature map conditioned on the time embedding
    if temb is not None:
      h = h + self.Dense_0(self.act(temb))[:, :, None, None]
    h = self.Dropout_0(self.act(self.GroupNorm_1(h)))
    h = self.Conv_1(h)
    if self.in_ch != self.out_ch or self.up or self.down:
      x = self.Conv_2(x)
    return _skip_sum(x, h, self.skip_rescale)
