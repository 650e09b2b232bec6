"""Common layers for defining score networks (DDPM's and NCSN/NCSNv2's), as in Score SDE."""

import functools
import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

import utils

from .normalization import ConditionalInstanceNorm2dPlus

NONLINEARITIES = ('elu', 'relu', 'lrelu', 'swish')


def get_act(config):
  """Get the activation function named by `config.model.nonlinearity`."""
  name = utils.check_choice('model.nonlinearity', str(config.model.nonlinearity).lower(), NONLINEARITIES)
  if name == 'elu':
    return nn.ELU()
  if name == 'relu':
    return nn.ReLU()
  if name == 'lrelu':
    return nn.LeakyReLU(negative_slope=0.2)
  return nn.SiLU()


def ncsn_conv1x1(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1., padding=0):
  """1x1 convolution. Same as NCSNv1/v2."""
  conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, bias=bias, dilation=dilation,
                   padding=padding)
  init_scale = 1e-10 if init_scale == 0 else init_scale
  conv.weight.data *= init_scale
  if bias:
    conv.bias.data *= init_scale
  return conv


def _compute_fans(shape, in_axis=1, out_axis=0):
  receptive_field_size = np.prod(shape) / shape[in_axis] / shape[out_axis]
  return shape[in_axis] * receptive_field_size, shape[out_axis] * receptive_field_size


def variance_scaling(scale, mode, distribution, in_axis=1, out_axis=0, dtype=torch.float32, device=None):
  """JAX's variance-scaling initializer: returns `init(shape)` drawing weights of variance scale / fan."""
  if mode not in ('fan_in', 'fan_out', 'fan_avg'):
    raise ValueError(f"invalid mode for variance scaling initializer: {mode!r}; "
                     "choose one of ('fan_in', 'fan_out', 'fan_avg').")
  if distribution not in ('normal', 'uniform'):
    raise ValueError(f"invalid distribution for variance scaling initializer: {distribution!r}; "
                     "choose one of ('normal', 'uniform').")

  def init(shape, dtype=dtype, device=device):
    fan_in, fan_out = _compute_fans(shape, in_axis, out_axis)
    denominator = {'fan_in': fan_in, 'fan_out': fan_out, 'fan_avg': (fan_in + fan_out) / 2}[mode]
    variance = scale / denominator
    if distribution == 'normal':
      return torch.randn(*shape, dtype=dtype, device=device) * np.sqrt(variance)
    return (torch.rand(*shape, dtype=dtype, device=device) * 2. - 1.) * np.sqrt(3 * variance)

  return init


def default_init(scale=1.):
  """The same initialization used in DDPM (fan-average uniform variance scaling)."""
  scale = 1e-10 if scale == 0 else scale
  return variance_scaling(scale, 'fan_avg', 'uniform')


class Dense(nn.Module):
  """Linear layer with `default_init` (a placeholder, as in Score SDE)."""


def ddpm_linear(in_features, out_features):
  """Linear layer with DDPM initialization (`default_init` weights, zero bias), as Score SDE's `nn.Dense`."""
  dense = nn.Linear(in_features, out_features)
  dense.weight.data = default_init()(dense.weight.data.shape)
  nn.init.zeros_(dense.bias)
  return dense


def ddpm_conv1x1(in_planes, out_planes, stride=1, bias=True, init_scale=1., padding=0):
  """1x1 convolution with DDPM initialization."""
  conv = nn.Conv2d(in_planes, out_planes, kernel_size=1, stride=stride, padding=padding, bias=bias)
  conv.weight.data = default_init(init_scale)(conv.weight.data.shape)
  if bias:
    nn.init.zeros_(conv.bias)
  return conv


def ncsn_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1., padding=1):
  """3x3 convolution with PyTorch initialization. Same as NCSNv1/NCSNv2."""
  init_scale = 1e-10 if init_scale == 0 else init_scale
  conv = nn.Conv2d(in_planes, out_planes, stride=stride, bias=bias, dilation=dilation, padding=padding,
                   kernel_size=3)
  conv.weight.data *= init_scale
  if bias:
    conv.bias.data *= init_scale
  return conv


def _dilated_conv3x3(in_planes, out_planes, dilation):
  # NCSNv2's dilated conv keeps the spatial size (padding = dilation). Score SDE's port used padding 1, so
  # its dilated blocks shrank the feature maps and the residual sums failed on shape: fixed here (the
  # parameters, hence the state_dict, are the same).
  return ncsn_conv3x3(in_planes, out_planes, dilation=dilation, padding=dilation)


def ddpm_conv3x3(in_planes, out_planes, stride=1, bias=True, dilation=1, init_scale=1., padding=1):
  """3x3 convolution with DDPM initialization."""
  conv = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=padding, dilation=dilation,
                   bias=bias)
  conv.weight.data = default_init(init_scale)(conv.weight.data.shape)
  if bias:
    nn.init.zeros_(conv.bias)
  return conv


###########################################################################
# Layers of the NCSNv1/NCSNv2 codebases (ermongroup/ncsn, ermongroup/ncsnv2).
###########################################################################


class CRPBlock(nn.Module):
  """Chained residual pooling (RefineNet)."""

  def __init__(self, features, n_stages, act=nn.ReLU(), maxpool=True):
    super().__init__()
    self.convs = nn.ModuleList([ncsn_conv3x3(features, features, stride=1, bias=False) for _ in range(n_stages)])
    self.n_stages = n_stages
    if maxpool:
      self.pool = nn.MaxPool2d(kernel_size=5, stride=1, padding=2)
    else:
      self.pool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
    self.act = act

  def forward(self, x):
    x = self.act(x)
    path = x
    for conv in self.convs:
      path = conv(self.pool(path))
      x = path + x
    return x


class CondCRPBlock(nn.Module):
  """Noise-conditional chained residual pooling."""

  def __init__(self, features, n_stages, num_classes, normalizer, act=nn.ReLU()):
    super().__init__()
    self.convs = nn.ModuleList()
    self.norms = nn.ModuleList()
    self.normalizer = normalizer
    for _ in range(n_stages):
      self.norms.append(normalizer(features, num_classes, bias=True))
      self.convs.append(ncsn_conv3x3(features, features, stride=1, bias=False))
    self.n_stages = n_stages
    self.pool = nn.AvgPool2d(kernel_size=5, stride=1, padding=2)
    self.act = act

  def forward(self, x, y):
    x = self.act(x)
    path = x
    for norm, conv in zip(self.norms, self.convs):
      path = conv(self.pool(norm(path, y)))
      x = path + x
    return x


class RCUBlock(nn.Module):
  """Residual conv units (RefineNet)."""

  def __init__(self, features, n_blocks, n_stages, act=nn.ReLU()):
    super().__init__()
    for i in range(n_blocks):
      for j in range(n_stages):
        setattr(self, f'{i + 1}_{j + 1}_conv', ncsn_conv3x3(features, features, stride=1, bias=False))
    self.stride = 1
    self.n_blocks = n_blocks
    self.n_stages = n_stages
    self.act = act

  def forward(self, x):
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        x = getattr(self, f'{i + 1}_{j + 1}_conv')(self.act(x))
      x = x + residual
    return x


class CondRCUBlock(nn.Module):
  """Noise-conditional residual conv units."""

  def __init__(self, features, n_blocks, n_stages, num_classes, normalizer, act=nn.ReLU()):
    super().__init__()
    for i in range(n_blocks):
      for j in range(n_stages):
        setattr(self, f'{i + 1}_{j + 1}_norm', normalizer(features, num_classes, bias=True))
        setattr(self, f'{i + 1}_{j + 1}_conv', ncsn_conv3x3(features, features, stride=1, bias=False))
    self.stride = 1
    self.n_blocks = n_blocks
    self.n_stages = n_stages
    self.act = act
    self.normalizer = normalizer

  def forward(self, x, y):
    for i in range(self.n_blocks):
      residual = x
      for j in range(self.n_stages):
        x = getattr(self, f'{i + 1}_{j + 1}_norm')(x, y)
        x = getattr(self, f'{i + 1}_{j + 1}_conv')(self.act(x))
      x = x + residual
    return x


class MSFBlock(nn.Module):
  """Multi-resolution fusion (RefineNet)."""

  def __init__(self, in_planes, features):
    super().__init__()
    if not isinstance(in_planes, (list, tuple)):
      raise TypeError(f'in_planes must be a list or tuple, got {in_planes!r}.')
    self.convs = nn.ModuleList([ncsn_conv3x3(c, features, stride=1, bias=True) for c in in_planes])
    self.features = features

  def forward(self, xs, shape):
    sums = 0.
    for conv, x in zip(self.convs, xs):
      sums = sums + F.interpolate(conv(x), size=shape, mode='bilinear', align_corners=True)
    return sums


class CondMSFBlock(nn.Module):
  """Noise-conditional multi-resolution fusion."""

  def __init__(self, in_planes, features, num_classes, normalizer):
    super().__init__()
    if not isinstance(in_planes, (list, tuple)):
      raise TypeError(f'in_planes must be a list or tuple, got {in_planes!r}.')
    self.convs = nn.ModuleList()
    self.norms = nn.ModuleList()
    self.features = features
    self.normalizer = normalizer
    for c in in_planes:
      self.convs.append(ncsn_conv3x3(c, features, stride=1, bias=True))
      self.norms.append(normalizer(c, num_classes, bias=True))

  def forward(self, xs, y, shape):
    sums = 0.
    for conv, norm, x in zip(self.convs, self.norms, xs):
      sums = sums + F.interpolate(conv(norm(x, y)), size=shape, mode='bilinear', align_corners=True)
    return sums


class RefineBlock(nn.Module):
  """RefineNet block: adapt each input, fuse them, pool, output convs."""

  def __init__(self, in_planes, features, act=nn.ReLU(), start=False, end=False, maxpool=True):
    super().__init__()
    if not isinstance(in_planes, (list, tuple)):
      raise TypeError(f'in_planes must be a list or tuple, got {in_planes!r}.')
    self.n_blocks = n_blocks = len(in_planes)
    self.adapt_convs = nn.ModuleList([RCUBlock(in_planes[i], 2, 2, act) for i in range(n_blocks)])
    self.output_convs = RCUBlock(features, 3 if end else 1, 2, act)
    if not start:
      self.msf = MSFBlock(in_planes, features)
    self.crp = CRPBlock(features, 2, act, maxpool=maxpool)

  def forward(self, xs, output_shape):
    hs = [adapt(x) for adapt, x in zip(self.adapt_convs, xs)]
    h = self.msf(hs, output_shape) if self.n_blocks > 1 else hs[0]
    return self.output_convs(self.crp(h))


class CondRefineBlock(nn.Module):
  """Noise-conditional RefineNet block."""

  def __init__(self, in_planes, features, num_classes, normalizer, act=nn.ReLU(), start=False, end=False):
    super().__init__()
    if not isinstance(in_planes, (list, tuple)):
      raise TypeError(f'in_planes must be a list or tuple, got {in_planes!r}.')
    self.n_blocks = n_blocks = len(in_planes)
    self.adapt_convs = nn.ModuleList(
        [CondRCUBlock(in_planes[i], 2, 2, num_classes, normalizer, act) for i in range(n_blocks)])
    self.output_convs = CondRCUBlock(features, 3 if end else 1, 2, num_classes, normalizer, act)
    if not start:
      self.msf = CondMSFBlock(in_planes, features, num_classes, normalizer)
    self.crp = CondCRPBlock(features, 2, num_classes, normalizer, act)

  def forward(self, xs, y, output_shape):
    hs = [adapt(x, y) for adapt, x in zip(self.adapt_convs, xs)]
    h = self.msf(hs, y, output_shape) if self.n_blocks > 1 else hs[0]
    return self.output_convs(self.crp(h, y), y)


def _mean_pool_2x2(x):
  return (x[:, :, ::2, ::2] + x[:, :, 1::2, ::2] + x[:, :, ::2, 1::2] + x[:, :, 1::2, 1::2]) / 4.


class ConvMeanPool(nn.Module):
  """Convolution followed by 2x2 mean pooling."""

  def __init__(self, input_dim, output_dim, kernel_size=3, biases=True, adjust_padding=False):
    super().__init__()
    conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
    # adjust_padding (28 px images) pads one row/column before, so the pooled size rounds up.
    self.conv = nn.Sequential(nn.ZeroPad2d((1, 0, 1, 0)), conv) if adjust_padding else conv

  def forward(self, inputs):
    return _mean_pool_2x2(self.conv(inputs))


class MeanPoolConv(nn.Module):
  """2x2 mean pooling followed by a convolution."""

  def __init__(self, input_dim, output_dim, kernel_size=3, biases=True):
    super().__init__()
    self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)

  def forward(self, inputs):
    return self.conv(_mean_pool_2x2(inputs))


class UpsampleConv(nn.Module):
  """Nearest-neighbour 2x upsampling (by pixel shuffle) followed by a convolution."""

  def __init__(self, input_dim, output_dim, kernel_size=3, biases=True):
    super().__init__()
    self.conv = nn.Conv2d(input_dim, output_dim, kernel_size, stride=1, padding=kernel_size // 2, bias=biases)
    self.pixelshuffle = nn.PixelShuffle(upscale_factor=2)

  def forward(self, inputs):
    return self.conv(self.pixelshuffle(torch.cat([inputs] * 4, dim=1)))


def _check_resample(resample):
  if resample not in ('down', None):
    raise ValueError(f"resample={resample!r} is not allowed; choose one of ('down', None).")


def _residual_convs(input_dim, output_dim, resample, dilation, adjust_padding, make_norm):
  """The convolutions and inner normalization of NCSN's and NCSNv2's residual blocks.

  Both blocks of Score SDE build the same layers; they differ only in the normalization's signature (NCSN's
  is conditional on the noise level). The modules are created in Score SDE's order (conv1, normalize2,
  conv2), so a seeded initialization draws the same weights.

  Args:
    input_dim: Channels in.
    output_dim: Channels out.
    resample: 'down' (downsample by 2) or None.
    dilation: Dilation of the 3x3 convolutions; 1 for none.
    adjust_padding: Passed to `ConvMeanPool` (NCSNv2's padding for odd sizes).
    make_norm: `make_norm(channels)` returns the normalization module.

  Returns:
    `(conv1, normalize2, conv2, conv_shortcut)`, where `conv_shortcut(input_dim, output_dim)` builds the
    shortcut convolution when the block needs one.
  """
  if resample == 'down':
    if dilation > 1:
      conv1 = _dilated_conv3x3(input_dim, input_dim, dilation)
      normalize2 = make_norm(input_dim)
      conv2 = _dilated_conv3x3(input_dim, output_dim, dilation)
      conv_shortcut = functools.partial(_dilated_conv3x3, dilation=dilation)
    else:
      conv1 = ncsn_conv3x3(input_dim, input_dim)
      normalize2 = make_norm(input_dim)
      conv2 = ConvMeanPool(input_dim, output_dim, 3, adjust_padding=adjust_padding)
      conv_shortcut = functools.partial(ConvMeanPool, kernel_size=1, adjust_padding=adjust_padding)
  elif dilation > 1:
    conv_shortcut = functools.partial(_dilated_conv3x3, dilation=dilation)
    conv1 = _dilated_conv3x3(input_dim, output_dim, dilation)
    normalize2 = make_norm(output_dim)
    conv2 = _dilated_conv3x3(output_dim, output_dim, dilation)
  else:
    # Score SDE's NCSN block used a bare nn.Conv2d (no kernel size: a crash); a 1x1 conv as in NCSNv2's.
    conv_shortcut = ncsn_conv1x1
    conv1 = ncsn_conv3x3(input_dim, output_dim)
    normalize2 = make_norm(output_dim)
    conv2 = ncsn_conv3x3(output_dim, output_dim)
  return conv1, normalize2, conv2, conv_shortcut


class ConditionalResidualBlock(nn.Module):
  """NCSN's noise-conditional residual block."""

  def __init__(self, input_dim, output_dim, num_classes, resample=None, act=nn.ELU(),
               normalization=ConditionalInstanceNorm2dPlus, adjust_padding=False, dilation=None):
    super().__init__()
    _check_resample(resample)
    # Score SDE's default dilation=None crashed on `dilation > 1`; None means no dilation.
    dilation = 1 if dilation is None else dilation
    self.non_linearity = act
    self.input_dim = input_dim
    self.output_dim = output_dim
    self.resample = resample
    self.normalization = normalization
    self.conv1, self.normalize2, self.conv2, conv_shortcut = _residual_convs(
        input_dim, output_dim, resample, dilation, adjust_padding,
        lambda channels: normalization(channels, num_classes))

    if output_dim != input_dim or resample is not None:
      self.shortcut = conv_shortcut(input_dim, output_dim)
    self.normalize1 = normalization(input_dim, num_classes)

  def forward(self, x, y):
    output = self.conv1(self.non_linearity(self.normalize1(x, y)))
    output = self.conv2(self.non_linearity(self.normalize2(output, y)))
    if self.output_dim == self.input_dim and self.resample is None:
      shortcut = x
    else:
      shortcut = self.shortcut(x)
    return shortcut + output


class ResidualBlock(nn.Module):
  """NCSNv2's residual block."""

  def __init__(self, input_dim, output_dim, resample=None, act=nn.ELU(), normalization=nn.InstanceNorm2d,
               adjust_padding=False, dilation=1):
    super().__init__()
    _check_resample(resample)
    dilation = 1 if dilation is None else dilation
    self.non_linearity = act
    self.input_dim = input_dim
    self.output_dim = output_dim
    self.resample = resample
    self.normalization = normalization
    self.conv1, self.normalize2, self.conv2, conv_shortcut = _residual_convs(
        input_dim, output_dim, resample, dilation, adjust_padding, normalization)

    if output_dim != input_dim or resample is not None:
      self.shortcut = conv_shortcut(input_dim, output_dim)
    self.normalize1 = normalization(input_dim)

  def forward(self, x):
    output = self.conv1(self.non_linearity(self.normalize1(x)))
    output = self.conv2(self.non_linearity(self.normalize2(output)))
    if self.output_dim == self.input_dim and self.resample is None:
      shortcut = x
    else:
      shortcut = self.shortcut(x)
    return shortcut + output


###########################################################################
# Layers of the DDPM codebase (hojonathanho/diffusion, diffusion_tf/nn.py).
###########################################################################


def get_timestep_embedding(timesteps, embedding_dim, max_positions=10000):
  """Sinusoidal embedding of (possibly fractional) time steps, shape (B,) -> (B, embedding_dim)."""
  if timesteps.dim() != 1:
    raise ValueError(f'timesteps must have shape (B,), got {tuple(timesteps.shape)}.')
  # Keep float64 in float64 (gradient checks); everything else is embedded in float32, as Score SDE.
  dtype = timesteps.dtype if timesteps.dtype == torch.float64 else torch.float32
  half_dim = embedding_dim // 2
  # magic number 10000 is from transformers
  emb = math.log(max_positions) / (half_dim - 1)
  emb = torch.exp(torch.arange(half_dim, dtype=dtype, device=timesteps.device) * -emb)
  emb = timesteps.to(dtype)[:, None] * emb[None, :]
  emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
  if embedding_dim % 2 == 1:  # zero pad
    emb = F.pad(emb, (0, 1), mode='constant')
  return emb


def _einsum(a, b, c, x, y):
  return torch.einsum(f"{''.join(a)},{''.join(b)}->{''.join(c)}", x, y)


def contract_inner(x, y):
  """tensordot(x, y, 1): contracts the last axis of x with the first axis of y."""
  return torch.tensordot(x, y, dims=1)


class NIN(nn.Module):
  """Network-in-network: a 1x1 convolution with weights `W` (in_dim, num_units) and bias `b`."""

  def __init__(self, in_dim, num_units, init_scale=0.1):
    super().__init__()
    self.W = nn.Parameter(default_init(scale=init_scale)((in_dim, num_units)), requires_grad=True)
    self.b = nn.Parameter(torch.zeros(num_units), requires_grad=True)

  def forward(self, x):
    return torch.einsum('bchw,cd->bdhw', x, self.W) + self.b[None, :, None, None]


def channel_attention(q, k, v):
  """Self-attention over the H * W positions, with channels as features: (B, C, H, W) each -> (B, C, H, W).

  Written with batched matmuls (not fused attention kernels) so that it is differentiable to any order.
  """
  B, C, H, W = q.shape
  q, k, v = q.reshape(B, C, H * W), k.reshape(B, C, H * W), v.reshape(B, C, H * W)
  w = torch.bmm(q.transpose(1, 2), k) * (int(C) ** (-0.5))  # (B, HW query, HW key)
  w = F.softmax(w, dim=-1)
  return torch.bmm(v, w.transpose(1, 2)).reshape(B, C, H, W)


class AttnBlock(nn.Module):
  """Channel-wise self-attention block."""

  def __init__(self, channels):
    super().__init__()
    self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6)
    self.NIN_0 = NIN(channels, channels)
    self.NIN_1 = NIN(channels, channels)
    self.NIN_2 = NIN(channels, channels)
    self.NIN_3 = NIN(channels, channels, init_scale=0.)

  def forward(self, x):
    h = self.GroupNorm_0(x)
    h = channel_attention(self.NIN_0(h), self.NIN_1(h), self.NIN_2(h))
    return x + self.NIN_3(h)


class Upsample(nn.Module):
  """Nearest-neighbour 2x upsampling, optionally followed by a 3x3 conv."""

  def __init__(self, channels, with_conv=False):
    super().__init__()
    if with_conv:
      self.Conv_0 = ddpm_conv3x3(channels, channels)
    self.with_conv = with_conv

  def forward(self, x):
    _, _, H, W = x.shape
    h = F.interpolate(x, (H * 2, W * 2), mode='nearest')
    if self.with_conv:
      h = self.Conv_0(h)
    return h


class Downsample(nn.Module):
  """2x downsampling: a stride-2 3x3 conv (TF 'SAME' padding) or 2x2 average pooling."""

  def __init__(self, channels, with_conv=False):
    super().__init__()
    if with_conv:
      self.Conv_0 = ddpm_conv3x3(channels, channels, stride=2, padding=0)
    self.with_conv = with_conv

  def forward(self, x):
    if self.with_conv:
      # Emulate TF's 'SAME' padding of a stride-2 conv: one row/column after.
      return self.Conv_0(F.pad(x, (0, 1, 0, 1)))
    return F.avg_pool2d(x, kernel_size=2, stride=2, padding=0)


def ddpm_resnet_paths(block, x, temb=None):
  """The shortcut and residual paths of DDPM's ResNet block, before they are summed.

  DDPM's block and DDPM++'s (`layerspp.ResnetBlockDDPMpp`) run the same layers, under the same attribute
  names (Score SDE's checkpoint keys), and differ only in how the two paths are summed.

  Args:
    block: A `ResnetBlockDDPM` or `layerspp.ResnetBlockDDPMpp`.
    x: Input of shape (B, in_ch, H, W).
    temb: Time embedding of shape (B, temb_dim), or None for an unconditional block.

  Returns:
    `(shortcut, residual)`, each of shape (B, out_ch, H, W).
  """
  h = block.Conv_0(block.act(block.GroupNorm_0(x)))
  # Add bias to each feature map conditioned on the time embedding
  if temb is not None:
    h = h + block.Dense_0(block.act(temb))[:, :, None, None]
  h = block.Dropout_0(block.act(block.GroupNorm_1(h)))
  h = block.Conv_1(h)
  if block.in_ch != block.out_ch:
    x = block.Conv_2(x) if block.conv_shortcut else block.NIN_0(x)
  return x, h


class ResnetBlockDDPM(nn.Module):
  """The ResNet Blocks used in DDPM."""

  def __init__(self, act, in_ch, out_ch=None, temb_dim=None, conv_shortcut=False, dropout=0.1):
    super().__init__()
    if out_ch is None:
      out_ch = in_ch
    self.GroupNorm_0 = nn.GroupNorm(num_groups=32, num_channels=in_ch, eps=1e-6)
    self.act = act
    self.Conv_0 = ddpm_conv3x3(in_ch, out_ch)
    if temb_dim is not None:
      self.Dense_0 = ddpm_linear(temb_dim, out_ch)
    self.GroupNorm_1 = nn.GroupNorm(num_groups=32, num_channels=out_ch, eps=1e-6)
    self.Dropout_0 = nn.Dropout(dropout)
    self.Conv_1 = ddpm_conv3x3(out_ch, out_ch, init_scale=0.)
    if in_ch != out_ch:
      if conv_shortcut:
        self.Conv_2 = ddpm_conv3x3(in_ch, out_ch)
      else:
        self.NIN_0 = NIN(in_ch, out_ch)
    self.out_ch = out_ch
    self.in_ch = in_ch
    self.conv_shortcut = conv_shortcut

  def forward(self, x, temb=None):
    x, h = ddpm_resnet_paths(self, x, temb)
    return x + h
