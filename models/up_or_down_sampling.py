"""Layers used for up-sampling or down-sampling images (StyleGAN2's FIR resampling, as in Score SDE).

Many functions are ported from https://github.com/NVlabs/stylegan2. All of them run on `op.upfirdn2d`,
which is pure PyTorch and differentiable to any order.
"""

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from op import upfirdn2d


def _check_factor(factor):
  if not isinstance(factor, int) or factor < 1:
    raise ValueError(f'factor must be an integer >= 1, got {factor!r}.')


def get_weight(module, shape, weight_var='weight', kernel_init=None):
  """Get/create weight tensor for a convolution or fully-connected layer."""
  return module.param(weight_var, kernel_init, shape)


class Conv2d(nn.Module):
  """Conv2d layer with optimal upsampling and downsampling (StyleGAN2)."""

  def __init__(self, in_ch, out_ch, kernel, up=False, down=False, resample_kernel=(1, 3, 3, 1), use_bias=True,
               kernel_init=None):
    super().__init__()
    if up and down:
      raise ValueError('Conv2d: up and down cannot both be set.')
    if kernel < 1 or kernel % 2 != 1:
      raise ValueError(f'Conv2d: kernel must be a positive odd integer, got {kernel!r}.')
    self.weight = nn.Parameter(torch.zeros(out_ch, in_ch, kernel, kernel))
    if kernel_init is not None:
      self.weight.data = kernel_init(self.weight.data.shape)
    if use_bias:
      self.bias = nn.Parameter(torch.zeros(out_ch))
    self.up = up
    self.down = down
    self.resample_kernel = resample_kernel
    self.kernel = kernel
    self.use_bias = use_bias

  def forward(self, x):
    if self.up:
      x = upsample_conv_2d(x, self.weight, k=self.resample_kernel)
    elif self.down:
      x = conv_downsample_2d(x, self.weight, k=self.resample_kernel)
    else:
      x = F.conv2d(x, self.weight, stride=1, padding=self.kernel // 2)
    if self.use_bias:
      x = x + self.bias.reshape(1, -1, 1, 1)
    return x


def naive_upsample_2d(x, factor=2):
  """Nearest-neighbour upsampling by an integer factor."""
  _N, C, H, W = x.shape
  x = torch.reshape(x, (-1, C, H, 1, W, 1))
  x = x.repeat(1, 1, 1, factor, 1, factor)
  return torch.reshape(x, (-1, C, H * factor, W * factor))


def naive_downsample_2d(x, factor=2):
  """Average pooling by an integer factor."""
  _N, C, H, W = x.shape
  x = torch.reshape(x, (-1, C, H // factor, factor, W // factor, factor))
  return torch.mean(x, dim=(3, 5))


def _kernel_tensor(k, x):
  return torch.as_tensor(k, dtype=x.dtype, device=x.device)


def upsample_conv_2d(x, w, k=None, factor=2, gain=1):
  """Fused `upsample_2d()` followed by a 'SAME' `conv2d()` (StyleGAN2).

  Padding is performed only once at the beginning, not between the operations. Differentiable to any order.

  Args:
    x: Input tensor of the shape `[N, C, H, W]`.
    w: Weight tensor of the shape `[outChannels, inChannels, convH, convW]`. Grouped convolution can be
      performed by `inChannels = x.shape[1] // numGroups`.
    k: FIR filter of the shape `[firH, firW]` or `[firN]` (separable). The default is `[1] * factor`, which
      corresponds to nearest-neighbor upsampling.
    factor: Integer upsampling factor (default: 2).
    gain: Scaling factor for signal magnitude (default: 1.0).

  Returns:
    Tensor of the shape `[N, outChannels, H * factor, W * factor]`, and same datatype as `x`.
  """
  _check_factor(factor)
  if w.dim() != 4 or w.shape[2] != w.shape[3]:
    raise ValueError(f'upsample_conv_2d: w must have shape (outC, inC, k, k), got {tuple(w.shape)}.')
  outC, inC, convH, convW = w.shape
  if k is None:
    k = [1] * factor
  k = setup_kernel(k) * (gain * (factor ** 2))
  p = (k.shape[0] - factor) - (convW - 1)
  num_groups = x.shape[1] // inC

  # The transposed conv implements upsampling + convolution: its weight is the spatially flipped conv
  # weight with in/out channels swapped, per group. (Score SDE flipped with `w[..., ::-1, ::-1]`, which
  # PyTorch rejects: that code path crashed; torch.flip is the same flip.)
  w = torch.reshape(w, (num_groups, -1, inC, convH, convW))
  w = torch.flip(w, [3, 4]).permute(0, 2, 1, 3, 4)
  w = torch.reshape(w, (num_groups * inC, -1, convH, convW))
  x = F.conv_transpose2d(x, w, stride=factor, padding=0, groups=num_groups)
  return upfirdn2d(x, _kernel_tensor(k, x), pad=((p + 1) // 2 + factor - 1, p // 2 + 1))


def conv_downsample_2d(x, w, k=None, factor=2, gain=1):
  """Fused `conv2d()` followed by `downsample_2d()` (StyleGAN2).

  Padding is performed only once at the beginning, not between the operations. Differentiable to any order.

  Args:
    x: Input tensor of the shape `[N, C, H, W]`.
    w: Weight tensor of the shape `[outChannels, inChannels, convH, convW]`.
    k: FIR filter of the shape `[firH, firW]` or `[firN]` (separable). The default is `[1] * factor`, which
      corresponds to average pooling.
    factor: Integer downsampling factor (default: 2).
    gain: Scaling factor for signal magnitude (default: 1.0).

  Returns:
    Tensor of the shape `[N, outChannels, H // factor, W // factor]`, and same datatype as `x`.
  """
  _check_factor(factor)
  _outC, _inC, convH, convW = w.shape
  if convH != convW:
    raise ValueError(f'conv_downsample_2d: w must be square, got {tuple(w.shape)}.')
  if k is None:
    k = [1] * factor
  k = setup_kernel(k) * gain
  p = (k.shape[0] - factor) + (convW - 1)
  x = upfirdn2d(x, _kernel_tensor(k, x), pad=((p + 1) // 2, p // 2))
  return F.conv2d(x, w, stride=factor, padding=0)


def setup_kernel(k):
  """The FIR kernel `k` as a normalized, square 2-D float32 numpy array (1-D kernels are made separable)."""
  k = np.asarray(k, dtype=np.float32)
  if k.ndim == 1:
    k = np.outer(k, k)
  k /= np.sum(k)
  if k.ndim != 2 or k.shape[0] != k.shape[1]:
    raise ValueError(f'FIR kernel must be 1-D or square 2-D, got shape {k.shape}.')
  return k


def _shape(x, dim):
  return x.shape[dim]


def upsample_2d(x, k=None, factor=2, gain=1):
  r"""Upsample a batch of 2D images with the given filter.

  Accepts a batch of 2D images of the shape `[N, C, H, W]` and upsamples each image with the given filter.
  The filter is normalized so that if the input pixels are constant, they will be scaled by the specified
  `gain`. Pixels outside the image are assumed to be zero, and the filter is padded with zeros so that its
  shape is a multiple of the upsampling factor.

  Args:
    x: Input tensor of the shape `[N, C, H, W]`.
    k: FIR filter of the shape `[firH, firW]` or `[firN]` (separable). The default is `[1] * factor`, which
      corresponds to nearest-neighbor upsampling.
    factor: Integer upsampling factor (default: 2).
    gain: Scaling factor for signal magnitude (default: 1.0).

  Returns:
    Tensor of the shape `[N, C, H * factor, W * factor]`
  """
  _check_factor(factor)
  if k is None:
    k = [1] * factor
  k = setup_kernel(k) * (gain * (factor ** 2))
  p = k.shape[0] - factor
  return upfirdn2d(x, _kernel_tensor(k, x), up=factor, pad=((p + 1) // 2 + factor - 1, p // 2))


def downsample_2d(x, k=None, factor=2, gain=1):
  r"""Downsample a batch of 2D images with the given filter.

  Accepts a batch of 2D images of the shape `[N, C, H, W]` and downsamples each image with the given
  filter. The filter is normalized so that if the input pixels are constant, they will be scaled by the
  specified `gain`. Pixels outside the image are assumed to be zero, and the filter is padded with zeros so
  that its shape is a multiple of the downsampling factor.

  Args:
    x: Input tensor of the shape `[N, C, H, W]`.
    k: FIR filter of the shape `[firH, firW]` or `[firN]` (separable). The default is `[1] * factor`, which
      corresponds to average pooling.
    factor: Integer downsampling factor (default: 2).
    gain: Scaling factor for signal magnitude (default: 1.0).

  Returns:
    Tensor of the shape `[N, C, H // factor, W // factor]`
  """
  _check_factor(factor)
  if k is None:
    k = [1] * factor
  k = setup_kernel(k) * gain
  p = k.shape[0] - factor
  return upfirdn2d(x, _kernel_tensor(k, x), down=factor, pad=((p + 1) // 2, p // 2))
