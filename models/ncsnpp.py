"""NCSN++ and DDPM++ (Song et al., 2021): one U-Net family, chosen by config as in Score SDE.

The module layout (a flat `all_modules` list, plus a `sigmas` buffer) is Score SDE's, so that its
released checkpoints load with `strict=True`.
"""

import functools
import math

import torch
import torch.nn as nn

import utils

from . import layers, layerspp, normalization
from . import utils as mutils

ResnetBlockDDPM = layerspp.ResnetBlockDDPMpp
ResnetBlockBigGAN = layerspp.ResnetBlockBigGANpp
Combine = layerspp.Combine
conv3x3 = layerspp.conv3x3
conv1x1 = layerspp.conv1x1
get_act = layers.get_act
get_normalization = normalization.get_normalization
default_initializer = layers.default_init

PROGRESSIVE = ('none', 'output_skip', 'residual')
PROGRESSIVE_INPUT = ('none', 'input_skip', 'residual')
RESBLOCK_TYPES = ('ddpm', 'biggan')
EMBEDDING_TYPES = utils.CONFIG_FIELDS['model.embedding_type']['allowed']


def check_resolutions(config, num_resolutions, attn_resolutions):
  """Raises `ValueError` unless the image size halves cleanly `num_resolutions - 1` times and every
  attention resolution is one of the U-Net's resolutions. Returns the list of resolutions."""
  image_size = utils.config_value(config, 'data.image_size')
  factor = 2 ** (num_resolutions - 1)
  if image_size % factor:
    raise ValueError(f'config.data.image_size={image_size!r} cannot be halved {num_resolutions - 1} times '
                     f'(len(config.model.ch_mult)={num_resolutions}); it must be a multiple of {factor}.')
  all_resolutions = [image_size // (2 ** i) for i in range(num_resolutions)]
  for res in attn_resolutions:
    if res not in all_resolutions:
      raise ValueError(f'config.model.attn_resolutions={tuple(attn_resolutions)!r}: resolution {res!r} is '
                       f'never reached; the U-Net resolutions are {tuple(all_resolutions)!r}.')
  return all_resolutions


def check_unet_config(config):
  """Validates the fields shared by the DDPM and NCSN++ U-Nets; returns (nf, ch_mult, num_res_blocks,
  attn_resolutions, dropout, all_resolutions)."""
  model = config.model
  nf = utils.config_value(config, 'model.nf')
  ch_mult = tuple(model.ch_mult)
  if not ch_mult:
    raise ValueError('config.model.ch_mult=() must list at least one channel multiplier.')
  for m in ch_mult:
    utils.check_number('model.ch_mult', m, low=1, integer=True)
  num_res_blocks = utils.check_number('model.num_res_blocks', model.num_res_blocks, low=1, integer=True)
  attn_resolutions = tuple(model.attn_resolutions)
  dropout = utils.check_number('model.dropout', model.dropout, low=0, high=1, high_open=True)
  utils.check_bool('model.resamp_with_conv', model.resamp_with_conv)
  utils.check_bool('model.conditional', model.conditional)
  utils.config_value(config, 'model.scale_by_sigma')
  utils.config_value(config, 'data.centered')
  utils.config_value(config, 'data.num_channels')
  # These U-Nets hard-code GroupNorm (as Score SDE); any other value would be silently ignored.
  normalization.normalization_name(config, ('GroupNorm',))
  all_resolutions = check_resolutions(config, len(ch_mult), attn_resolutions)
  return nf, ch_mult, num_res_blocks, attn_resolutions, dropout, all_resolutions


@mutils.register_model(name='ncsnpp')
class NCSNpp(nn.Module):
  """NCSN++ model (DDPM++ with `resblock_type='ddpm'`, no FIR, positional embedding)."""

  def __init__(self, config):
    super().__init__()
    self.config = config
    model = config.model
    self.act = act = get_act(config)
    self.register_buffer('sigmas', torch.tensor(mutils.get_sigmas(config)))

    nf, ch_mult, num_res_blocks, attn_resolutions, dropout, all_resolutions = check_unet_config(config)
    self.nf = nf
    self.num_res_blocks = num_res_blocks
    self.attn_resolutions = attn_resolutions
    self.num_resolutions = num_resolutions = len(ch_mult)
    self.all_resolutions = all_resolutions
    resamp_with_conv = model.resamp_with_conv
    self.conditional = conditional = model.conditional  # noise-conditional
    fir = utils.check_bool('model.fir', model.fir)
    fir_kernel = tuple(model.fir_kernel)
    self.skip_rescale = skip_rescale = utils.check_bool('model.skip_rescale', model.skip_rescale)
    self.resblock_type = resblock_type = utils.check_choice(
        'model.resblock_type', str(model.resblock_type).lower(), RESBLOCK_TYPES)
    self.progressive = progressive = utils.check_choice(
        'model.progressive', str(model.progressive).lower(), PROGRESSIVE)
    self.progressive_input = progressive_input = utils.check_choice(
        'model.progressive_input', str(model.progressive_input).lower(), PROGRESSIVE_INPUT)
    # Case-insensitive, as Score SDE's NCSN++.
    self.embedding_type = embedding_type = utils.check_field('model.embedding_type',
                                                             str(model.embedding_type).lower())
    combine_method = utils.check_choice(
        'model.progressive_combine', str(model.progressive_combine).lower(), layerspp.COMBINE_METHODS)
    init_scale = utils.check_number('model.init_scale', model.init_scale, low=0)
    # Score SDE reads neither field: only these values are implemented.
    utils.check_choice('model.attention_type', model.get('attention_type', 'ddpm'), ('ddpm',))
    utils.check_choice('model.conv_size', model.get('conv_size', 3), (3,))
    self.scale_by_sigma = model.scale_by_sigma
    self.centered = config.data.centered
    combiner = functools.partial(Combine, method=combine_method)

    modules = []
    # timestep/noise_level embedding
    if embedding_type == 'fourier':
      # Gaussian Fourier features of log(sigma): they need continuous noise levels.
      if not config.training.continuous:
        raise ValueError("config.model.embedding_type='fourier' needs config.training.continuous=True "
                         '(Fourier features are only used for continuous training).')
      fourier_scale = utils.config_value(config, 'model.fourier_scale')
      modules.append(layerspp.GaussianFourierProjection(embedding_size=nf, scale=fourier_scale))
      embed_dim = 2 * nf
    else:
      embed_dim = nf

    if conditional:
      for dim_in in (embed_dim, nf * 4):
        modules.append(layers.ddpm_linear(dim_in, nf * 4))

    AttnBlock = functools.partial(layerspp.AttnBlockpp, init_scale=init_scale, skip_rescale=skip_rescale)
    Upsample = functools.partial(layerspp.Upsample, with_conv=resamp_with_conv, fir=fir, fir_kernel=fir_kernel)
    if progressive == 'output_skip':
      self.pyramid_upsample = layerspp.Upsample(fir=fir, fir_kernel=fir_kernel, with_conv=False, in_ch=None)
    elif progressive == 'residual':
      pyramid_upsample = functools.partial(layerspp.Upsample, fir=fir, fir_kernel=fir_kernel, with_conv=True)
    Downsample = functools.partial(layerspp.Downsample, with_conv=resamp_with_conv, fir=fir,
                                   fir_kernel=fir_kernel)
    if progressive_input == 'input_skip':
      self.pyramid_downsample = layerspp.Downsample(fir=fir, fir_kernel=fir_kernel, with_conv=False, in_ch=None)
    elif progressive_input == 'residual':
      pyramid_downsample = functools.partial(layerspp.Downsample, fir=fir, fir_kernel=fir_kernel,
                                             with_conv=True)

    temb_dim = nf * 4 if conditional else None
    if resblock_type == 'ddpm':
      ResnetBlock = functools.partial(ResnetBlockDDPM, act=act, dropout=dropout, init_scale=init_scale,
                                      skip_rescale=skip_rescale, temb_dim=temb_dim)
    else:
      ResnetBlock = functools.partial(ResnetBlockBigGAN, act=act, dropout=dropout, fir=fir,
                                      fir_kernel=fir_kernel, init_scale=init_scale, skip_rescale=skip_rescale,
                                      temb_dim=temb_dim)

    # Downsampling block
    channels = config.data.num_channels
    input_pyramid_ch = channels
    modules.append(conv3x3(channels, nf))
    hs_c = [nf]
    # Whether each level has attention after its residual blocks (fixed by the image size).
    self._attn_at_level = [res in attn_resolutions for res in all_resolutions]

    in_ch = nf
    for i_level in range(num_resolutions):
      for _ in range(num_res_blocks):
        out_ch = nf * ch_mult[i_level]
        modules.append(ResnetBlock(in_ch=in_ch, out_ch=out_ch))
        in_ch = out_ch
        if self._attn_at_level[i_level]:
          modules.append(AttnBlock(channels=in_ch))
        hs_c.append(in_ch)

      if i_level != num_resolutions - 1:
        if resblock_type == 'ddpm':
          modules.append(Downsample(in_ch=in_ch))
        else:
          modules.append(ResnetBlock(down=True, in_ch=in_ch))
        if progressive_input == 'input_skip':
          modules.append(combiner(dim1=input_pyramid_ch, dim2=in_ch))
          if combine_method == 'cat':
            in_ch *= 2
        elif progressive_input == 'residual':
          modules.append(pyramid_downsample(in_ch=input_pyramid_ch, out_ch=in_ch))
          input_pyramid_ch = in_ch
        hs_c.append(in_ch)

    in_ch = hs_c[-1]
    modules.append(ResnetBlock(in_ch=in_ch))
    modules.append(AttnBlock(channels=in_ch))
    modules.append(ResnetBlock(in_ch=in_ch))

    pyramid_ch = 0
    # Upsampling block
    for i_level in reversed(range(num_resolutions)):
      for _ in range(num_res_blocks + 1):
        out_ch = nf * ch_mult[i_level]
        modules.append(ResnetBlock(in_ch=in_ch + hs_c.pop(), out_ch=out_ch))
        in_ch = out_ch

      if self._attn_at_level[i_level]:
        modules.append(AttnBlock(channels=in_ch))

      if progressive != 'none':
        if i_level == num_resolutions - 1:
          modules.append(layerspp.group_norm(in_ch))
          if progressive == 'output_skip':
            modules.append(conv3x3(in_ch, channels, init_scale=init_scale))
            pyramid_ch = channels
          else:
            modules.append(conv3x3(in_ch, in_ch, bias=True))
            pyramid_ch = in_ch
        else:
          if progressive == 'output_skip':
            modules.append(layerspp.group_norm(in_ch))
            modules.append(conv3x3(in_ch, channels, bias=True, init_scale=init_scale))
            pyramid_ch = channels
          else:
            modules.append(pyramid_upsample(in_ch=pyramid_ch, out_ch=in_ch))
            pyramid_ch = in_ch

      if i_level != 0:
        if resblock_type == 'ddpm':
          modules.append(Upsample(in_ch=in_ch))
        else:
          modules.append(ResnetBlock(in_ch=in_ch, up=True))

    assert not hs_c  # the skip connections are consumed exactly

    if progressive != 'output_skip':
      modules.append(layerspp.group_norm(in_ch))
      modules.append(conv3x3(in_ch, channels, init_scale=init_scale))

    self.all_modules = nn.ModuleList(modules)

  def forward(self, x, time_cond):
    """Score-network output for images x (B, C, H, W) at noise levels / time labels `time_cond` (B,)."""
    modules = self.all_modules
    m_idx = 0
    if self.embedding_type == 'fourier':
      # Gaussian Fourier features embeddings of log(sigma).
      used_sigmas = time_cond
      temb = modules[m_idx](torch.log(used_sigmas))
      m_idx += 1
    else:
      # Sinusoidal positional embeddings of the (discrete or continuous) time label.
      timesteps = time_cond
      used_sigmas = self.sigmas[time_cond.long()] if self.scale_by_sigma else None
      temb = layers.get_timestep_embedding(timesteps, self.nf)

    if self.conditional:
      temb = modules[m_idx](temb)
      m_idx += 1
      temb = modules[m_idx](self.act(temb))
      m_idx += 1
    else:
      temb = None

    if not self.centered:
      # If input data is in [0, 1]
      x = 2 * x - 1.

    # Downsampling block
    input_pyramid = x if self.progressive_input != 'none' else None
    hs = [modules[m_idx](x)]
    m_idx += 1
    for i_level in range(self.num_resolutions):
      for _ in range(self.num_res_blocks):
        h = modules[m_idx](hs[-1], temb)
        m_idx += 1
        if self._attn_at_level[i_level]:
          h = modules[m_idx](h)
          m_idx += 1
        hs.append(h)

      if i_level != self.num_resolutions - 1:
        if self.resblock_type == 'ddpm':
          h = modules[m_idx](hs[-1])
        else:
          h = modules[m_idx](hs[-1], temb)
        m_idx += 1

        if self.progressive_input == 'input_skip':
          input_pyramid = self.pyramid_downsample(input_pyramid)
          h = modules[m_idx](input_pyramid, h)
          m_idx += 1
        elif self.progressive_input == 'residual':
          input_pyramid = modules[m_idx](input_pyramid)
          m_idx += 1
          if self.skip_rescale:
            input_pyramid = (input_pyramid + h) / math.sqrt(2.)
          else:
            input_pyramid = input_pyramid + h
          h = input_pyramid
        hs.append(h)

    h = hs[-1]
    h = modules[m_idx](h, temb)
    h = modules[m_idx + 1](h)
    h = modules[m_idx + 2](h, temb)
    m_idx += 3

    pyramid = None
    # Upsampling block
    for i_level in reversed(range(self.num_resolutions)):
      for _ in range(self.num_res_blocks + 1):
        h = modules[m_idx](torch.cat([h, hs.pop()], dim=1), temb)
        m_idx += 1

      if self._attn_at_level[i_level]:
        h = modules[m_idx](h)
        m_idx += 1

      if self.progressive != 'none':
        if i_level == self.num_resolutions - 1:
          pyramid = self.act(modules[m_idx](h))
          pyramid = modules[m_idx + 1](pyramid)
          m_idx += 2
        elif self.progressive == 'output_skip':
          pyramid = self.pyramid_upsample(pyramid)
          pyramid_h = self.act(modules[m_idx](h))
          pyramid_h = modules[m_idx + 1](pyramid_h)
          m_idx += 2
          pyramid = pyramid + pyramid_h
        else:
          pyramid = modules[m_idx](pyramid)
          m_idx += 1
          if self.skip_rescale:
            pyramid = (pyramid + h) / math.sqrt(2.)
          else:
            pyramid = pyramid + h
          h = pyramid

      if i_level != 0:
        if self.resblock_type == 'ddpm':
          h = modules[m_idx](h)
        else:
          h = modules[m_idx](h, temb)
        m_idx += 1

    if self.progressive == 'output_skip':
      h = pyramid
    else:
      h = self.act(modules[m_idx](h))
      h = modules[m_idx + 1](h)
      m_idx += 2

    assert m_idx == len(modules)  # every module used exactly once
    if self.scale_by_sigma:
      # The `sigmas` buffer is float64 (as in Score SDE's checkpoints); dividing by it must not promote the
      # output to float64, or the next sampler step meets a float32 conv with a float64 input.
      used_sigmas = used_sigmas.to(h.dtype).reshape((x.shape[0], *([1] * len(x.shape[1:]))))
      h = h / used_sigmas
    return h
