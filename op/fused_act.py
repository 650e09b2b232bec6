"""Fused bias + leaky ReLU (StyleGAN2's `fused_bias_act`), in pure PyTorch.

The CUDA kernel of StyleGAN2 fuses three elementwise ops for speed; written with PyTorch ops, autograd
differentiates it to any order (the CUDA op's second backward is a raw kernel, with no third order).
"""

import math

import torch
from torch import nn
import torch.nn.functional as F


def fused_leaky_relu(input, bias, negative_slope=0.2, scale=2 ** 0.5):  # pylint: disable=redefined-builtin
  """`scale * leaky_relu(input + bias)`, with `bias` of shape (C,) added along dimension 1.

  Args:
    input: tensor of shape (N, C, ...).
    bias: tensor of shape (C,).
    negative_slope: slope for negative inputs.
    scale: output gain; sqrt(2) keeps the variance of a standard normal input (He et al.).

  Returns:
    Tensor of the shape of `input`.
  """
  if bias.dim() != 1 or input.dim() < 2 or bias.shape[0] != input.shape[1]:
    raise ValueError(f'fused_leaky_relu: bias of shape {tuple(bias.shape)} does not fit input of shape '
                     f'{tuple(input.shape)} (need bias of shape (C,) for input (N, C, ...)).')
  bias = bias.reshape((1, -1) + (1,) * (input.dim() - 2)).to(input.dtype)
  return F.leaky_relu(input + bias, negative_slope=negative_slope) * scale


def fused_bias_act(x, b=None, act='lrelu', alpha=None, gain=None):
  """StyleGAN2's `fused_bias_act`: `gain * act(x + b)`, bias along dimension 1.

  Args:
    x: tensor of shape (N, C, ...).
    b: bias of shape (C,), or `None` for no bias.
    act: 'linear' or 'lrelu'.
    alpha: negative slope of 'lrelu' (default 0.2).
    gain: output gain (default 1 for 'linear', sqrt(2) for 'lrelu').

  Returns:
    Tensor of the shape of `x`.
  """
  if act not in ('linear', 'lrelu'):
    raise ValueError(f"fused_bias_act: act={act!r} is not allowed; choose one of ('linear', 'lrelu').")
  if act == 'linear':
    gain = 1. if gain is None else gain
    if b is not None:
      x = x + b.reshape((1, -1) + (1,) * (x.dim() - 2)).to(x.dtype)
    return x * gain
  alpha = 0.2 if alpha is None else alpha
  gain = math.sqrt(2.) if gain is None else gain
  if b is None:
    return F.leaky_relu(x, negative_slope=alpha) * gain
  return fused_leaky_relu(x, b, negative_slope=alpha, scale=gain)


class FusedLeakyReLU(nn.Module):
  """Leaky ReLU with a learned per-channel bias and an output gain (StyleGAN2)."""

  def __init__(self, channel, negative_slope=0.2, scale=2 ** 0.5):
    super().__init__()
    self.bias = nn.Parameter(torch.zeros(channel))
    self.negative_slope = negative_slope
    self.scale = scale

  def forward(self, input):  # pylint: disable=redefined-builtin
    return fused_leaky_relu(input, self.bias, self.negative_slope, self.scale)
