"""NCSN (Song & Ermon, 2019) and NCSNv2 (Song & Ermon, 2020): RefineNet score networks, as in Score SDE.

Score SDE's versions read `config.data.channels` (absent from every config: a crash), passed an
unconditional normalization to NCSN's conditional blocks, and gave dilated convolutions padding 1 (feature
maps shrank until a residual sum failed). Here they build and run; module names, hence state_dict keys, are
Score SDE's.
"""

import functools

import torch
import torch.nn as nn

import utils

from . import utils as mutils
from .layers import (CondRefineBlock, ConditionalResidualBlock, RefineBlock, ResidualBlock, get_act,
                     ncsn_conv3x3)
from .normalization import CONDITIONAL_NORMALIZATIONS, NORMALIZATIONS, get_normalization, normalization_name

CondResidualBlock = ConditionalResidualBlock
conv3x3 = ncsn_conv3x3


def get_network(config):
  """The NCSNv2 architecture suited to `config.data.image_size`."""
  image_size = utils.config_value(config, 'data.image_size', high=256)
  if image_size < 96:
    return functools.partial(NCSNv2, config=config)
  if image_size <= 128:
    return functools.partial(NCSNv2_128, config=config)
  return functools.partial(NCSNv2_256, config=config)


def _check_image_size(config, num_halvings):
  # Each non-dilated 'down' block mean-pools 2x2, which needs even sizes.
  image_size = utils.config_value(config, 'data.image_size')
  factor = 2 ** num_halvings
  if image_size % factor:
    raise ValueError(f'config.data.image_size={image_size!r} must be a multiple of {factor} for '
                     f'config.model.name={config.model.name!r} ({num_halvings} 2x downsamplings).')
  return image_size


def _common_fields(config):
  nf = utils.config_value(config, 'model.nf')
  num_scales = utils.config_value(config, 'model.num_scales')
  channels = utils.config_value(config, 'data.num_channels')
  centered = utils.config_value(config, 'data.centered')
  return nf, num_scales, channels, centered


class _NCSNv2Base(nn.Module):
  """Shared forward pass of the NCSNv2 networks: residual stages down, RefineNet blocks up."""

  # Attribute names of the residual stages (input to bottleneck) and of the refine blocks, in the order
  # they are applied; refine block i fuses stage -(i+1) with the previous refine output.
  _res_names = ()
  _refine_names = ()

  def _build_common(self, config):
    self.centered = config.data.centered
    # nn.GroupNorm needs a group count that NCSN's blocks do not pass (Score SDE fails there with a TypeError).
    normalization_name(config, tuple(n for n in NORMALIZATIONS if n != 'GroupNorm'))
    self.norm = get_normalization(config)
    self.nf, _, channels, _ = _common_fields(config)
    self.act = get_act(config)
    # Persistent, as in Score SDE's NCSNv2 (a registered float64 buffer): its state_dicts hold 'sigmas' (first
    # key), so its checkpoints load here with strict=True. NCSN (v1) has no sigmas at all, in both.
    self.register_buffer('sigmas', torch.tensor(mutils.get_sigmas(config)))
    self.config = config
    self.begin_conv = nn.Conv2d(channels, self.nf, 3, stride=1, padding=1)
    self.normalizer = self.norm(self.nf, config.model.num_scales)
    self.end_conv = nn.Conv2d(self.nf, channels, 3, stride=1, padding=1)

  def _block(self, in_dim, out_dim, down=False, **kwargs):
    return ResidualBlock(in_dim, out_dim, resample='down' if down else None, act=self.act,
                         normalization=self.norm, **kwargs)

  def _stage(self, in_dim, out_dim, **kwargs):
    return nn.ModuleList([self._block(in_dim, out_dim, down=True, **kwargs),
                          self._block(out_dim, out_dim, dilation=kwargs.get('dilation', 1))])

  def forward(self, x, y):
    """Score for images x (B, C, H, W) at noise-level indices y (B,) (long)."""
    h = x if self.centered else 2 * x - 1.
    h = self.begin_conv(h)
    feats = []
    for name in self._res_names:
      for block in getattr(self, name):
        h = block(h)
      feats.append(h)
    ref = None
    for i, name in enumerate(self._refine_names):
      skip = feats[-(i + 1)]
      inputs = [skip] if ref is None else [skip, ref]
      ref = getattr(self, name)(inputs, skip.shape[2:])
    output = self.end_conv(self.act(self.normalizer(ref)))
    # The sigmas are float64 (numpy's, as in Score SDE): keep the output in the input's dtype.
    used_sigmas = self.sigmas[y].to(output.dtype).view(x.shape[0], *([1] * len(x.shape[1:])))
    return output / used_sigmas


@mutils.register_model(name='ncsnv2_64')
class NCSNv2(_NCSNv2Base):
  """NCSNv2 for images up to 64 px."""

  _res_names = ('res1', 'res2', 'res3', 'res4')
  _refine_names = ('refine1', 'refine2', 'refine3', 'refine4')

  def __init__(self, config):
    super().__init__()
    _check_image_size(config, 1)
    self._build_common(config)
    nf, act = self.nf, self.act
    self.res1 = nn.ModuleList([self._block(nf, nf), self._block(nf, nf)])
    self.res2 = self._stage(nf, 2 * nf)
    self.res3 = self._stage(2 * nf, 2 * nf, dilation=2)
    # Score SDE passes adjust_padding for 28 px images; it has no effect on a dilated block.
    self.res4 = self._stage(2 * nf, 2 * nf, dilation=4, adjust_padding=config.data.image_size == 28)
    self.refine1 = RefineBlock([2 * nf], 2 * nf, act=act, start=True)
    self.refine2 = RefineBlock([2 * nf, 2 * nf], 2 * nf, act=act)
    self.refine3 = RefineBlock([2 * nf, 2 * nf], nf, act=act)
    self.refine4 = RefineBlock([nf, nf], nf, act=act, end=True)


@mutils.register_model(name='ncsnv2_128')
class NCSNv2_128(_NCSNv2Base):
  """NCSNv2 model architecture for 128px images."""

  _res_names = ('res1', 'res2', 'res3', 'res4', 'res5')
  _refine_names = ('refine1', 'refine2', 'refine3', 'refine4', 'refine5')

  def __init__(self, config):
    super().__init__()
    _check_image_size(config, 2)
    self._build_common(config)
    nf, act = self.nf, self.act
    self.res1 = nn.ModuleList([self._block(nf, nf), self._block(nf, nf)])
    self.res2 = self._stage(nf, 2 * nf)
    self.res3 = self._stage(2 * nf, 2 * nf)
    self.res4 = self._stage(2 * nf, 4 * nf, dilation=2)
    self.res5 = self._stage(4 * nf, 4 * nf, dilation=4)
    self.refine1 = RefineBlock([4 * nf], 4 * nf, act=act, start=True)
    self.refine2 = RefineBlock([4 * nf, 4 * nf], 2 * nf, act=act)
    self.refine3 = RefineBlock([2 * nf, 2 * nf], 2 * nf, act=act)
    self.refine4 = RefineBlock([2 * nf, 2 * nf], nf, act=act)
    self.refine5 = RefineBlock([nf, nf], nf, act=act, end=True)


@mutils.register_model(name='ncsnv2_256')
class NCSNv2_256(_NCSNv2Base):
  """NCSNv2 model architecture for 256px images."""

  _res_names = ('res1', 'res2', 'res3', 'res31', 'res4', 'res5')
  _refine_names = ('refine1', 'refine2', 'refine31', 'refine3', 'refine4', 'refine5')

  def __init__(self, config):
    super().__init__()
    _check_image_size(config, 3)
    self._build_common(config)
    nf, act = self.nf, self.act
    self.res1 = nn.ModuleList([self._block(nf, nf), self._block(nf, nf)])
    self.res2 = self._stage(nf, 2 * nf)
    self.res3 = self._stage(2 * nf, 2 * nf)
    self.res31 = self._stage(2 * nf, 2 * nf)
    self.res4 = self._stage(2 * nf, 4 * nf, dilation=2)
    self.res5 = self._stage(4 * nf, 4 * nf, dilation=4)
    self.refine1 = RefineBlock([4 * nf], 4 * nf, act=act, start=True)
    self.refine2 = RefineBlock([4 * nf, 4 * nf], 2 * nf, act=act)
    self.refine3 = RefineBlock([2 * nf, 2 * nf], 2 * nf, act=act)
    self.refine31 = RefineBlock([2 * nf, 2 * nf], 2 * nf, act=act)
    self.refine4 = RefineBlock([2 * nf, 2 * nf], nf, act=act)
    self.refine5 = RefineBlock([nf, nf], nf, act=act, end=True)


@mutils.register_model(name='ncsn')
class NCSN(nn.Module):
  """NCSN (v1): RefineNet with every normalization conditioned on the noise-level index."""

  def __init__(self, config):
    super().__init__()
    _check_image_size(config, 1)
    nf, num_scales, channels, centered = _common_fields(config)
    self.centered = centered
    norm_name = normalization_name(config, tuple(CONDITIONAL_NORMALIZATIONS))
    # Conditional on the noise level, with one class per noise scale.
    self.norm = norm = CONDITIONAL_NORMALIZATIONS[norm_name]
    self.nf = nf
    self.act = act = get_act(config)
    self.config = config

    self.begin_conv = nn.Conv2d(channels, nf, 3, stride=1, padding=1)
    self.normalizer = norm(nf, num_scales)
    self.end_conv = nn.Conv2d(nf, channels, 3, stride=1, padding=1)

    block = functools.partial(ConditionalResidualBlock, num_classes=num_scales, act=act, normalization=norm)
    self.res1 = nn.ModuleList([block(nf, nf, resample=None), block(nf, nf, resample=None)])
    self.res2 = nn.ModuleList([block(nf, 2 * nf, resample='down'), block(2 * nf, 2 * nf, resample=None)])
    self.res3 = nn.ModuleList([block(2 * nf, 2 * nf, resample='down', dilation=2),
                               block(2 * nf, 2 * nf, resample=None, dilation=2)])
    self.res4 = nn.ModuleList([
        block(2 * nf, 2 * nf, resample='down', adjust_padding=config.data.image_size == 28, dilation=4),
        block(2 * nf, 2 * nf, resample=None, dilation=4)])

    self.refine1 = CondRefineBlock([2 * nf], 2 * nf, num_scales, norm, act=act, start=True)
    self.refine2 = CondRefineBlock([2 * nf, 2 * nf], 2 * nf, num_scales, norm, act=act)
    self.refine3 = CondRefineBlock([2 * nf, 2 * nf], nf, num_scales, norm, act=act)
    self.refine4 = CondRefineBlock([nf, nf], nf, num_scales, norm, act=act, end=True)

  def _compute_cond_module(self, module, x, y):
    for m in module:
      x = m(x, y)
    return x

  def forward(self, x, y):
    """Score network output for images x (B, C, H, W) at noise-level indices y (B,) (long)."""
    h = x if self.centered else 2 * x - 1.
    output = self.begin_conv(h)
    layer1 = self._compute_cond_module(self.res1, output, y)
    layer2 = self._compute_cond_module(self.res2, layer1, y)
    layer3 = self._compute_cond_module(self.res3, layer2, y)
    layer4 = self._compute_cond_module(self.res4, layer3, y)

    ref1 = self.refine1([layer4], y, layer4.shape[2:])
    ref2 = self.refine2([layer3, ref1], y, layer3.shape[2:])
    ref3 = self.refine3([layer2, ref2], y, layer2.shape[2:])
    output = self.refine4([layer1, ref3], y, layer1.shape[2:])

    output = self.normalizer(output, y)
    return self.end_conv(self.act(output))
