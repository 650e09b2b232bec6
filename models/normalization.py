"""Normalization layers of NCSN/NCSNv2 (Song & Ermon, 2019, 2020), as in Score SDE."""

import functools

import torch
import torch.nn as nn

import utils

NORMALIZATIONS = ('InstanceNorm', 'InstanceNorm++', 'VarianceNorm', 'GroupNorm')


def normalization_name(config, allowed=NORMALIZATIONS):
  """`config.model.normalization`, validated: one of `allowed`, the subset of `NORMALIZATIONS` that the caller's
  network supports (every module that reads the field asks here)."""
  return utils.check_choice('model.normalization', config.model.normalization, allowed)


def get_normalization(config, conditional=False):
  """Obtain normalization modules from the config file.

  Args:
    config: the config; reads `config.model.normalization` (and `config.model.num_classes` if conditional).
    conditional: whether to return a noise-conditional normalization (only 'InstanceNorm++').

  Returns:
    The normalization class (or a partial with `num_classes` bound, if conditional).
  """
  if conditional:
    norm = normalization_name(config, tuple(CONDITIONAL_NORMALIZATIONS))
    num_classes = utils.check_number('model.num_classes', config.model.num_classes, low=1, integer=True)
    return functools.partial(CONDITIONAL_NORMALIZATIONS[norm], num_classes=num_classes)
  norm = normalization_name(config)
  return {
      'InstanceNorm': nn.InstanceNorm2d,
      'InstanceNorm++': InstanceNorm2dPlus,
      'VarianceNorm': VarianceNorm2d,
      'GroupNorm': nn.GroupNorm,
  }[norm]


def _normalized_channel_means(x):
  """Per-image channel means, standardized across channels (the '++' term of InstanceNorm++)."""
  means = torch.mean(x, dim=(2, 3))
  m = torch.mean(means, dim=-1, keepdim=True)
  v = torch.var(means, dim=-1, keepdim=True)
  return (means - m) / torch.sqrt(v + 1e-5)


class ConditionalBatchNorm2d(nn.Module):
  """Batch norm with a per-class scale (and bias)."""

  def __init__(self, num_features, num_classes, bias=True):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.bn = nn.BatchNorm2d(num_features, affine=False)
    self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
    self.embed.weight.data[:, :num_features].uniform_()
    if bias:
      self.embed.weight.data[:, num_features:].zero_()

  def forward(self, x, y):
    out = self.bn(x)
    if self.bias:
      gamma, beta = self.embed(y).chunk(2, dim=1)
      return gamma[:, :, None, None] * out + beta[:, :, None, None]
    return self.embed(y)[:, :, None, None] * out


class ConditionalInstanceNorm2d(nn.Module):
  """Instance norm with a per-class scale (and bias)."""

  def __init__(self, num_features, num_classes, bias=True):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
    self.embed.weight.data[:, :num_features].uniform_()
    if bias:
      self.embed.weight.data[:, num_features:].zero_()

  def forward(self, x, y):
    h = self.instance_norm(x)
    if self.bias:
      gamma, beta = self.embed(y).chunk(2, dim=-1)
      return gamma[:, :, None, None] * h + beta[:, :, None, None]
    return self.embed(y)[:, :, None, None] * h


class ConditionalVarianceNorm2d(nn.Module):
  """Divides each channel by its standard deviation, then scales it per class."""

  def __init__(self, num_features, num_classes, bias=False):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.embed = nn.Embedding(num_classes, num_features)
    self.embed.weight.data.normal_(1, 0.02)

  def forward(self, x, y):
    h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + 1e-5)
    return self.embed(y)[:, :, None, None] * h


class VarianceNorm2d(nn.Module):
  """Divides each channel by its standard deviation, then scales it."""

  def __init__(self, num_features, bias=False):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.alpha = nn.Parameter(torch.zeros(num_features))
    self.alpha.data.normal_(1, 0.02)

  def forward(self, x):
    h = x / torch.sqrt(torch.var(x, dim=(2, 3), keepdim=True) + 1e-5)
    return self.alpha[None, :, None, None] * h


class ConditionalNoneNorm2d(nn.Module):
  """No normalization; a per-class scale (and bias) only."""

  def __init__(self, num_features, num_classes, bias=True):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.embed = nn.Embedding(num_classes, num_features * 2 if bias else num_features)
    self.embed.weight.data[:, :num_features].uniform_()
    if bias:
      self.embed.weight.data[:, num_features:].zero_()

  def forward(self, x, y):
    if self.bias:
      gamma, beta = self.embed(y).chunk(2, dim=-1)
      return gamma[:, :, None, None] * x + beta[:, :, None, None]
    return self.embed(y)[:, :, None, None] * x


class NoneNorm2d(nn.Module):
  """Identity."""

  def __init__(self, num_features, bias=True):
    super().__init__()

  def forward(self, x):
    return x


class InstanceNorm2dPlus(nn.Module):
  """InstanceNorm++ (Song & Ermon, 2019): instance norm that keeps the channel means' relative offsets."""

  def __init__(self, num_features, bias=True):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    self.alpha = nn.Parameter(torch.zeros(num_features))
    self.gamma = nn.Parameter(torch.zeros(num_features))
    self.alpha.data.normal_(1, 0.02)
    self.gamma.data.normal_(1, 0.02)
    if bias:
      self.beta = nn.Parameter(torch.zeros(num_features))

  def forward(self, x):
    means = _normalized_channel_means(x)
    h = self.instance_norm(x) + means[..., None, None] * self.alpha[..., None, None]
    out = self.gamma[None, :, None, None] * h
    if self.bias:
      out = out + self.beta[None, :, None, None]
    return out


class ConditionalInstanceNorm2dPlus(nn.Module):
  """Noise-conditional InstanceNorm++: gamma, alpha (and beta) are looked up per noise level."""

  def __init__(self, num_features, num_classes, bias=True):
    super().__init__()
    self.num_features = num_features
    self.bias = bias
    self.instance_norm = nn.InstanceNorm2d(num_features, affine=False, track_running_stats=False)
    self.embed = nn.Embedding(num_classes, num_features * 3 if bias else num_features * 2)
    self.embed.weight.data[:, :2 * num_features].normal_(1, 0.02)  # scales start at N(1, 0.02)
    if bias:
      self.embed.weight.data[:, 2 * num_features:].zero_()  # biases start at 0

  def forward(self, x, y):
    means = _normalized_channel_means(x)
    if self.bias:
      gamma, alpha, beta = self.embed(y).chunk(3, dim=-1)
    else:
      gamma, alpha = self.embed(y).chunk(2, dim=-1)
    h = self.instance_norm(x) + means[..., None, None] * alpha[..., None, None]
    out = gamma[:, :, None, None] * h
    if self.bias:
      out = out + beta[:, :, None, None]
    return out


# Noise-conditional counterparts of the normalizations above (NCSN conditions every normalization on the
# noise level).
CONDITIONAL_NORMALIZATIONS = {
    'InstanceNorm': ConditionalInstanceNorm2d,
    'InstanceNorm++': ConditionalInstanceNorm2dPlus,
    'VarianceNorm': ConditionalVarianceNorm2d,
}
